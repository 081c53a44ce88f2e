"""Recipe validation: unknown keys with suggestions, overrides, built-ins, schema."""

import pytest
from tests.conftest import write_recipe

from mmdata.errors import RecipeError
from mmdata.recipes import list_recipes, load_recipe, recipe_json_schema, set_dotted

BASE = {"name": "t", "source": {"type": "csv", "path": "d.csv"}, "output": {"dir": "out"}}


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "promt": "hi"})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert str(path) in text and "'promt'" in text and "did you mean 'prompt'" in text


def test_unknown_nested_key_is_suggested(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "output": {"dir": "o", "fromat": "sharegpt"}})
    with pytest.raises(RecipeError, match=r"did you mean 'output.format'"):
        load_recipe(path)


def test_unknown_source_parameter_is_rejected(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "source": {"type": "csv", "path": "d.csv", "encodng": "x"}})
    with pytest.raises(RecipeError, match=r"source.encodng.*did you mean 'source.encoding'"):
        load_recipe(path)


def test_unknown_source_type_lists_known_types(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "source": {"type": "cvs"}})
    with pytest.raises(RecipeError, match=r"unknown source type 'cvs'.*csv"):
        load_recipe(path)


def test_wrong_type_is_reported_with_its_key(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "max_samples": "many"})
    with pytest.raises(RecipeError, match="max_samples"):
        load_recipe(path)


def test_overrides_use_dotted_keys_and_yaml_scalars(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", BASE)
    recipe = load_recipe(path, {"output.dir": "/elsewhere", "max_samples": "10", "split.val": "0.1"})
    assert recipe.output.dir == "/elsewhere" and recipe.max_samples == 10 and recipe.split.val == 0.1
    assert recipe.base_dir == str(tmp_path.resolve())


def test_set_dotted_creates_missing_levels():
    data = {}
    set_dotted(data, "images.mode", "link")
    assert data == {"images": {"mode": "link"}}


def test_set_text_is_kept_as_typed_except_flow_collections_null_and_quotes():
    """Read whole as YAML, `#` cut a prompt, `No` became false, a date a date; the model types text per field."""
    data = {}
    for key, text in [("a", "10"), ("b", "true"), ("c", "[x, y]"), ("d", "描述: 这张图"), ("e", "- not a list"),
                      ("f", "{k: v}"), ("g", "Describe # carefully"), ("h", "No"), ("i", "2024-01-01"),
                      ("j", "null"), ("k", '"quoted"'), ("l", "{text}")]:
        set_dotted(data, key, text, from_text=True)
    assert data == {"a": "10", "b": "true", "c": ["x", "y"], "d": "描述: 这张图", "e": "- not a list",
                    "f": {"k": "v"}, "g": "Describe # carefully", "h": "No", "i": "2024-01-01", "j": None,
                    "k": "quoted", "l": "{text}"}
    python = {}
    set_dotted(python, "prompt", "a # b [x]")  # a Python value is set as it is
    assert python == {"prompt": "a # b [x]"}


def test_set_texts_are_typed_by_the_recipe_and_python_strings_stay_exact(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", BASE)
    recipe = load_recipe(path, {"max_samples": "10", "split.val": "0.1", "output.overwrite": "true",
                                "prompt": "Q # {text}", "name": "123"}, from_text=True)
    assert (recipe.max_samples, recipe.split.val, recipe.output.overwrite) == (10, 0.1, True)
    assert (recipe.prompt, recipe.name) == ("Q # {text}", "123")
    assert load_recipe(path, {"prompt": "null"}).prompt == "null"  # Python: exactly the string given
    with pytest.raises(RecipeError, match="output.dir"):
        load_recipe(path, {"output.dir": ""}, from_text=True)  # it built into the current folder


def test_convert_options_need_convert_mode(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {**BASE, "images": {"max_pixels": 1000}})
    with pytest.raises(RecipeError, match="images.mode: convert"):
        load_recipe(path)


def test_builtin_recipe_by_name_and_unknown_name_suggestion():
    assert "latex_ocr_sample" in dict(list_recipes())
    assert load_recipe("latex_ocr_sample").source.type == "synthetic_latex"
    with pytest.raises(RecipeError, match="did you mean 'latex_ocr_sample'"):
        load_recipe("latex_ocr_sampel")


def test_schema_lists_top_level_keys():
    props = recipe_json_schema()["properties"]
    assert {"name", "source", "fields", "prompt", "filters", "images", "split", "output"} <= set(props)
    assert "base_dir" not in props


def test_a_key_written_twice_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t7\nname: t7b\nsource: {type: csv, path: d.csv}\noutput: {dir: a}\n")
    with pytest.raises(RecipeError, match=r"line 2: the key 'name' is written twice"):
        load_recipe(path)
    path.write_text("name: t\nsource: {type: csv, path: d.csv}\nbase: &o {dir: a}\noutput:\n  <<: *o\n")
    with pytest.raises(RecipeError, match="unknown key 'base'"):  # a merge key is no repetition
        load_recipe(path)


def test_set_indexes_lists_such_as_mixture_components():
    """source.components.0.count replaced the list with a dict ("Input should be a valid list")."""
    data = {"source": {"components": [{"count": 1}, {"count": 2}]}}
    set_dotted(data, "source.components.1.count", "5", from_text=True)
    assert data == {"source": {"components": [{"count": 1}, {"count": "5"}]}}
    with pytest.raises(RecipeError, match="source.components is a list of 2; index it with 0..1"):
        set_dotted(data, "source.components.7.count", "5")


def test_set_texts_of_counts_or_shares_and_into_scalars():
    """"1.0" became the count 1 (pydantic's int | float); a key under a list's string was a TypeError traceback."""
    with pytest.raises(RecipeError, match="split.val"):
        load_recipe_text({"split.val": "1.0"})
    assert load_recipe_text({"split.val": "4"}).split.val == 4
    data = {"source": {"data_files": ["a.csv"]}}
    with pytest.raises(RecipeError, match="source.data_files.0 is a str, not a mapping"):
        set_dotted(data, "source.data_files.0.x", "1", from_text=True)


def load_recipe_text(overrides):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    return load_recipe(write_recipe(folder / "r.yaml", BASE), overrides, from_text=True)


def test_a_folder_named_like_a_builtin_recipe_does_not_hide_it(tmp_path, monkeypatch):
    """`cd my_data && mmdata build slake` with the user's own `slake/` folder there said "recipe file not found"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slake").mkdir()
    assert load_recipe("slake").name == "slake"
    (tmp_path / "mine").mkdir()
    with pytest.raises(RecipeError, match="a folder, not a recipe file"):
        load_recipe("mine")


def test_a_source_path_override_is_the_callers_even_when_missing_and_drops_the_recipes_mirror_id(tmp_path,
                                                                                                  monkeypatch):
    """`--set source.path=./copy` is relative to the current folder (a missing one used to resolve against the
    built-in recipes' folder and go to the hub as a dataset id), and the recipe's modelscope_id, the mirror of its
    own path, no longer stands in for the path given."""
    from mmdata import build
    from mmdata.errors import SourceError

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("latex_ocr", {"source.path": "./my_copy"})
    assert recipe.source.params()["path"] == str(tmp_path / "my_copy")
    assert recipe.source.params().get("modelscope_id") is None
    assert load_recipe("latex_ocr").source.params().get("modelscope_id")  # untouched without the override
    with pytest.raises(SourceError, match=r"my_copy: local dataset copy not found"):
        build("latex_ocr", source__path="./my_copy", output__dir=str(tmp_path / "out"))
