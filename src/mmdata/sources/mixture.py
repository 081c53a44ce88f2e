"""Several recipes' sources mixed into one build, with a count (or weight) per component, interleaved by seed.

Each component is a recipe (built-in name or YAML path, with optional ``set:`` overrides such as a local
``source.path``) or an inline ``source`` + ``fields`` + ``prompt`` + ``system``. Its rows are normalised with *its own*
mapping and prompt (``mmdata.normalize.normalize_row``), so a caption set, a VQA set and a text-only dialogue set can
share one output; the mixture then yields canonical rows ``{messages, images, id, __source__}`` whose images are
encoded bytes or absolute paths. Rows a component cannot normalise stay rows (``{"__error__"}``) and become rejects.
A component contributes its source, fields, prompt and system only: the mixture recipe's filters, images, split and
output apply to everything (leave the mixture's own ``prompt`` unset, it would be added to every conversation).

Order: a seeded RNG picks the next component with probability proportional to the rows it still owes, so the
components spread evenly through the output, every rerun gives the same order, and memory is O(components). A
component takes its first ``count`` rows; weights become counts of ``total`` by largest remainder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ..errors import SampleError, SourceError
from . import Source, SourceParams, open_source, register_source


class Component(SourceParams):
    name: str | None = Field(None, description="label in counts.by_source (default: the recipe's name)")
    recipe: str | None = Field(None, description="built-in recipe name or YAML path (relative to this recipe)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides for that recipe")
    source: dict[str, Any] | None = Field(None, description="inline source mapping (type + params)")
    fields: dict[str, str | None] | None = None
    prompt: str | list[str] | None = None
    system: str | None = None
    count: int | None = Field(None, gt=0)
    weight: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of_each(self) -> Component:
        if (self.recipe is None) == (self.source is None):
            raise ValueError("a component names a `recipe` or gives an inline `source`, not both")
        if self.source is not None and not self.name:
            raise ValueError("an inline component needs a `name`")
        if (self.count is None) == (self.weight is None):
            raise ValueError("a component has a `count` or a `weight`, not both")
        return self


class MixtureParams(SourceParams):
    components: list[Component] = Field(..., min_length=1)
    total: int | None = Field(None, gt=0, description="rows in all when components have weights")
    seed: int = 42

    @model_validator(mode="after")
    def _weights_need_total(self) -> MixtureParams:
        weighted = [c.weight is not None for c in self.components]
        if any(weighted) and not all(weighted):
            raise ValueError("give every component a count, or every component a weight (with `total`)")
        if all(weighted) and self.total is None:
            raise ValueError("weights need `total`: the number of rows of the whole mixture")
        return self


def counts_from_weights(weights: list[float], total: int) -> list[int]:
    """Largest remainder: integer counts proportional to ``weights`` that sum to ``total`` exactly."""
    shares = [w / sum(weights) * total for w in weights]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


# recipes of the mixture components being opened, outermost first: a mixture that includes itself, directly or
# through another one, recursed until Python's limit ("not valid YAML: RecursionError")
_OPENING: list[str] = []


@contextlib.contextmanager
def _opening(recipe):
    key = f"{recipe.name}@{recipe.base_dir}" if recipe.source.type == "mixture" else None
    if key is not None and key in _OPENING:
        chain = " -> ".join(k.split("@")[0] for k in [*_OPENING, key])
        raise SourceError(f"mixture {recipe.name!r} includes itself ({chain}); remove that component")
    if key is not None:
        _OPENING.append(key)
    try:
        yield
    finally:
        if key is not None:
            _OPENING.pop()


@register_source("mixture")
class MixtureSource(Source):
    Params = MixtureParams
    default_fields = {"messages": "messages", "images": "images", "id": "id"}

    def __init__(self, params: MixtureParams, base_dir: Path):
        super().__init__(params, base_dir)
        self._parts: list[tuple[str, Any, Source, int]] | None = None

    @property
    def parts(self) -> list[tuple[str, Any, Source, int]]:
        """``(name, recipe, source, count)`` per component, opened once; sizes checked when the source knows them."""
        if self._parts is None:
            components = self.params.components
            if self.params.total is not None and components[0].weight is not None:
                counts = counts_from_weights([c.weight for c in components], self.params.total)
            else:
                counts = [c.count for c in components]
            parts = []
            for component, count in zip(components, counts, strict=True):
                recipe = self._component_recipe(component)
                name = component.name or recipe.name
                with _opening(recipe):
                    source = open_source(recipe.source.type, recipe.source.params(), recipe.base_dir or self.base_dir)
                    available = source.num_rows()
                if available is not None and available < count:
                    raise SourceError(f"mixture component {name!r} has {available} rows but {count} were asked for")
                parts.append((name, recipe, source, count))
            names = [p[0] for p in parts]
            if len(set(names)) != len(names):
                raise SourceError(f"mixture component names must differ (got {names}): set `name:` on each")
            self._parts = parts
        return self._parts

    def _component_recipe(self, component: Component):
        from ..recipes import load_recipe, validate_recipe

        if component.recipe is not None:
            target = component.recipe
            if target.endswith((".yaml", ".yml")) and not os.path.isabs(target):
                target = str(self.base_dir / target)
            overrides = {k: self._local(v) if k.startswith("source.") else v for k, v in component.set.items()}
            return load_recipe(target, overrides)
        data = {"name": component.name, "source": component.source, "output": {"dir": "."},
                **{k: v for k, v in (("fields", component.fields), ("prompt", component.prompt),
                                     ("system", component.system)) if v is not None}}
        return validate_recipe(data, origin=f"mixture component {component.name!r}", base_dir=str(self.base_dir))

    def _local(self, value: Any) -> Any:
        """An override path relative to the mixture recipe's folder, made absolute when it exists there."""
        if isinstance(value, str) and not os.path.isabs(value) and (self.base_dir / value).exists():
            return str((self.base_dir / value).resolve())
        return value

    def num_rows(self) -> int:
        return sum(count for *_, count in self.parts)

    @property
    def allowed_roots(self) -> list[Path]:
        """Every component's folders: its rows carry absolute image paths, already checked against them."""
        return [*super().allowed_roots, *(root for _, _, source, _ in self.parts for root in source.allowed_roots)]

    def rows(self) -> Iterator[dict]:
        streams = [_canonical_rows(name, recipe, source, count) for name, recipe, source, count in self.parts]
        owed = [count for *_, count in self.parts]
        self._taken = [0] * len(owed)
        rng = random.Random(self.params.seed)
        while any(owed):
            k = rng.choices(range(len(owed)), weights=owed)[0]
            row = next(streams[k], None)
            if row is None:
                raise SourceError(f"mixture component {self.parts[k][0]!r} ran out of rows with {owed[k]} still "
                                  "owed: lower its count")
            owed[k] -= 1
            self._taken[k] += 1
            yield row

    def skipped(self, rows_yielded: int | None = None) -> dict[str, int]:
        """The components' own drops (a component's ``where:``), each up to the rows the mixture took from it."""
        taken = getattr(self, "_taken", None)
        if rows_yielded is None or taken is None or rows_yielded >= self.num_rows():
            taken = [count for *_, count in self.parts]
        total: dict[str, int] = {}
        for (_, _, source, _), n in zip(self.parts, taken, strict=True):
            for reason, dropped in source.skipped(n).items():
                total[reason] = total.get(reason, 0) + dropped
        return total

    def refresh(self) -> None:
        for _, _, source, _ in self.parts:
            source.refresh()

    def fingerprint(self) -> str:
        parts = [{"name": name, "recipe": recipe.model_dump(mode="json", exclude={"output", "description", "info"}),
                  "source": source.fingerprint(), "count": count} for name, recipe, source, count in self.parts]
        payload = json.dumps({"params": self.params.model_dump(mode="json"), "parts": parts}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def _canonical_rows(name: str, recipe, source: Source, count: int) -> Iterator[dict]:
    """A component's first ``count`` rows, normalised with its own recipe into canonical rows."""
    from ..normalize import effective_fields, normalize_row

    fields = effective_fields(recipe, getattr(source, "default_fields", {}))
    root = Path(os.path.abspath(source.image_root))
    for position, row in enumerate(islice(source.rows(), count)):
        try:
            draft = normalize_row(row, position, recipe, fields, root, source.allowed_roots)
        except SampleError as e:
            yield {"__error__": f"{name}: {e}", "__reason__": e.kind, "__source__": name,
                   "id": row.get(fields.get("id") or "id") if isinstance(row, dict) else None}
            continue
        canonical = {"messages": draft.messages, "id": draft.id, "__source__": name,
                     "images": [ref.data if ref.data is not None else str(ref.path) for ref in draft.images]}
        if draft.videos:
            canonical["videos"] = draft.videos
        yield canonical
