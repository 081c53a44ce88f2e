"""The recipe reference documents every key of the recipe schema."""

import re

from tests.conftest import REPO

from mmdata.recipes import Recipe


def test_every_recipe_key_is_documented():
    doc = (REPO / "docs" / "recipes.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", doc))
    missing = []
    for name, field in Recipe.model_fields.items():
        if name not in documented:
            missing.append(name)
        nested = field.annotation
        if isinstance(nested, type) and hasattr(nested, "model_fields"):
            missing += [f"{name}.{k}" for k in nested.model_fields if k not in documented]
    assert not missing, f"undocumented recipe keys: {missing}"
