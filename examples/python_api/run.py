"""The Python API, notebook style: each ``# %%`` cell prints what a notebook would show. Offline.

Usage: ``python run.py [OUT]`` (default ``out/python_api``): builds the built-in ``latex_ocr_sample`` recipe into
``OUT/latex`` with overrides, validates it, and shows that a typo in an override is refused with a suggestion.
"""

# %% imports and the output folder
import json
import sys
from pathlib import Path

import mmdata

out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/python_api").resolve()
print("mmdata", mmdata.__version__, "->", out)

# %% the built-in recipes: (name, description) pairs, the same list as `mmdata list`
recipes = mmdata.list_recipes()
print(len(recipes), "built-in recipes")
for name, description in recipes[:4]:
    print(f"  {name:<28} {description[:70]}")

# %% load a recipe with overrides (dotted keys), without building anything
recipe = mmdata.load_recipe("latex_ocr_sample", {"max_samples": 20, "split.val": 2, "output.dir": str(out / "latex")})
print("recipe:", recipe.name, "| source:", recipe.source.type, "| max_samples:", recipe.max_samples,
      "| split.val:", recipe.split.val, "| output.dir:", recipe.output.dir)

# %% build it: the same overrides as keyword arguments (double underscores for nesting)
result = mmdata.build("latex_ocr_sample", max_samples=20, split__val=2, output__dir=str(out / "latex"))
print("datasets:", {name: str(path.relative_to(out)) for name, path in result.datasets.items()})
print("counts:", json.dumps(result.counts))
assert result.read == result.written + result.rejected  # every row is written or listed in rejects.jsonl

# %% a second build of the same recipe is up to date: nothing is redone
again = mmdata.build("latex_ocr_sample", max_samples=20, split__val=2, output__dir=str(out / "latex"))
print("up to date:", again.up_to_date, "| written:", again.written)

# %% one record, as LLaMA-Factory will read it
first_file = sorted(result.datasets["latex_ocr_sample_train"].glob("*.jsonl"))[0]
print(first_file.read_text(encoding="utf-8").splitlines()[0])

# %% validate: the same checks as `mmdata validate`
report = mmdata.validate(str(result.dataset_info))
print("validate ok:", report.ok, "| errors:", len(report.errors), "| problems:", len(report.problems))

# %% a typo in an override is an error that names the key and suggests the right one
try:
    mmdata.load_recipe("latex_ocr_sample", {"max_sample": 20})
except mmdata.RecipeError as e:
    print("RecipeError:", e)
