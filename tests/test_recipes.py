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


def test_set_values_are_yaml_scalars_or_flow_lists_else_the_typed_string():
    data = {}
    for key, text in [("a", "10"), ("b", "true"), ("c", "[x, y]"), ("d", "描述: 这张图"), ("e", "- not a list"),
                      ("f", "{k: v}")]:
        set_dotted(data, key, text)
    assert data == {"a": 10, "b": True, "c": ["x", "y"], "d": "描述: 这张图", "e": "- not a list", "f": {"k": "v"}}


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
