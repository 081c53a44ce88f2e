"""The built-in registry: every entry validates, says where it comes from, and takes the standard overrides."""

from __future__ import annotations

import pytest

from mmdata.cli import main
from mmdata.errors import RecipeError
from mmdata.recipes import load_recipe, recipe_catalog, validate_recipe

CATALOG = {entry["name"]: entry for entry in recipe_catalog()}
HUB_RECIPES = sorted(name for name in CATALOG if load_recipe(name).source.type in ("hf", "image_join"))
EXPECTED = {"latex_ocr", "medtrinity_demo", "medtrinity_full", "vqa_rad", "path_vqa", "slake", "rocov2",
            "pubmedvision", "llava_med_zh_instruct", "llava_en_zh_2k", "pokemon_gpt4o_captions", "chartqa", "docvqa",
            "clevr_counting", "chinese_medical_dialogue", "medical_mix"}


def test_the_registry_has_the_datasets_practitioners_name():
    assert EXPECTED <= set(CATALOG)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_builtin_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_hub_recipes_carry_registry_facts_and_take_local_overrides(name, tmp_path):
    info = CATALOG[name]["info"]
    assert info.get("hub_id") or info.get("modelscope_id")
    assert info.get("license") and info.get("size")
    recipe = load_recipe(name, {"source.path": str(tmp_path), "source.subset": "x", "source.split": "test"})
    params = recipe.source.params()
    assert (params["path"], params["subset"], params["split"]) == (str(tmp_path), "x", "test")


def test_list_shows_hub_id_licence_and_size(capsys):
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in HUB_RECIPES:
        info = CATALOG[name]["info"]
        for fact in (info.get("hub_id") or info["modelscope_id"], info["license"], info["size"]):
            assert fact in lines[name]


def test_show_prints_the_recipe_with_its_english_alternative(capsys):
    assert main(["show", "latex_ocr"]) == 0
    out = capsys.readouterr().out
    assert "linxy/LaTeX_OCR" in out and "AI-ModelScope/LaTeX_OCR" in out and "hub: auto" in out
    assert "English prompt" in out and "max_samples: 1000" in out


def test_the_mixture_recipe_names_builtin_components():
    recipe = load_recipe("medical_mix")
    components = recipe.source.params()["components"]
    assert {c["recipe"] for c in components} <= set(CATALOG)


def test_info_keys_are_checked():
    with pytest.raises(RecipeError, match="info.licence"):
        validate_recipe({"name": "t", "info": {"licence": "mit"}, "source": {"type": "csv", "path": "x.csv"},
                         "output": {"dir": "o"}})
