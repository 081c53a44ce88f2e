"""mmdata: turn multimodal datasets into training-ready LLaMA-Factory fine-tuning data.

Public API (the CLI is a thin layer over exactly these functions)::

    import mmdata
    result = mmdata.build("latex_ocr_sample", max_samples=20)   # or a path to a recipe YAML
    result.datasets, result.counts
"""

from __future__ import annotations

import warnings
from typing import Any

from ._version import __version__
from .errors import BuildError, BuildWarning, DatasetInfoError, MmdataError, RecipeError, SampleError, SourceError
from .recipes import Recipe, list_recipes, load_recipe
from .sources import Source, SourceParams, register_source


def build(
    recipe: str | Recipe,
    *,
    num_proc: int | None = None,
    shard: tuple[int, int] = (0, 1),
    engine: str = "local",
    strict: bool = False,
    quiet: bool = True,
    rebuild: bool = False,
    **overrides: Any,
):
    """Build a recipe (built-in name, YAML path, or a :class:`Recipe`) and return a ``BuildResult``.

    Keyword overrides use double underscores for nesting: ``build("latex_ocr", output__dir="out", max_samples=10)``;
    dotted keys work through ``overrides={"output.dir": ...}`` style dicts too (``**{"output.dir": "out"}``).
    ``rebuild=True`` redoes every record even when the build is up to date (images edited in place).

    A build that wrote nothing (``result.problem``) or rejected many rows (``result.warnings``) says so with a
    :class:`BuildWarning`; the CLI prints the same and exits non-zero when nothing was written.
    """
    from .pipeline import build_recipe

    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise RecipeError(f"num_proc={num_proc!r}: a number of worker processes, 1 or more")
    if not isinstance(recipe, (str, Recipe)) and not hasattr(recipe, "__fspath__"):
        # A pandas.DataFrame or datasets.Dataset (a notebook): a recipe around it, name "dataset" unless name= says.
        # `_data` keeps the object referenced until the build is done (the source registry holds it weakly).
        from .sources.memory import recipe_for_data

        _data, recipe = recipe, recipe_for_data(recipe, {k.replace("__", "."): v for k, v in overrides.items()})
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, {k.replace("__", "."): v for k, v in overrides.items()})
    elif overrides:
        raise RecipeError("overrides apply to recipe names or paths; edit the Recipe object directly instead")
    result = build_recipe(recipe, num_proc=num_proc, shard=shard, engine=engine, strict=strict, quiet=quiet,
                          rebuild=rebuild)
    for message in ([result.problem] if result.problem else []) + result.warnings:
        warnings.warn(message, BuildWarning, stacklevel=2)
    if recipe.report and shard == (0, 1):
        from .report import write_report

        result.report = write_report(result.output_dir)
    return result


def validate(dataset_info: str, datasets: list[str] | None = None, **options: Any):
    """Lint an existing LLaMA-Factory dataset (see ``mmdata validate``); returns the report."""
    from .check import validate as validate_dataset

    return validate_dataset(dataset_info, datasets, **options)


__all__ = [
    "BuildError", "BuildWarning", "DatasetInfoError", "MmdataError", "Recipe", "RecipeError", "SampleError", "Source",
    "SourceError", "SourceParams", "__version__", "build", "list_recipes", "load_recipe", "register_source",
    "validate",
]
