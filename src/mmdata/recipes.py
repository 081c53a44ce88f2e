"""Recipes: the YAML file that declares a build, validated by pydantic before any data is touched.

A recipe names a source (``source.type`` picks the adapter, the other keys are that adapter's parameters), how raw
columns map onto a conversation (``fields``, ``prompt``, ``system``), what to keep (``filters``, ``max_samples``), how
to treat images, how to split, and where to write. Built-in recipes live in ``recipes/`` at the top of the repository
and ship inside the wheel as ``mmdata.builtin_recipes``. Relative input paths resolve against the recipe file's folder; ``output.dir`` against the current directory.

Why over 400 lines: the recipe schema is one model with its nested sections (fields, filters, images, split,
dedup, boxes, output) and the safe YAML loading that validates it; splitting the models apart would scatter the
schema users read as one page (docs/recipes.md).
"""

from __future__ import annotations

import difflib
import os
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(BaseModel):
    """``type`` selects a registered source; every other key is validated by that source's own ``Params`` model."""

    model_config = ConfigDict(extra="allow")

    type: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Fields(_Strict):
    """Which raw column plays which role. Unset roles are absent from the source."""

    id: str | None = None
    image: str | None = Field(None, description="column holding one image (bytes, {'bytes','path'} or a path)")
    images: str | None = Field(None, description="column holding a list of images")
    question: str | None = Field(None, description="column holding the user's text (used when no `prompt` is set)")
    answer: str | None = Field(None, description="column holding the assistant's answer")
    messages: str | None = Field(None, description="column holding a whole conversation (sharegpt-like list)")
    system: str | None = Field(None, description="column holding a per-record system prompt")


class Boxes(_Strict):
    """Grounding boxes in a column, written in the recipe's ``model`` convention and text form where ``{boxes}``
    stands in the prompt or answer (or with ``fields.answer: boxes``); see :mod:`mmdata.grounding`."""

    column: str = Field(..., description="column holding a box [x1, y1, x2, y2] (or [x, y, w, h]), a list of boxes, "
                                         "or {bbox, label} objects")
    convention: Literal["pixels", "relative", "thousand"] = Field(
        "pixels", description="the source's coordinates: pixels of the original image, 0-1, or 0-1000")
    layout: Literal["xyxy", "xywh"] = Field("xyxy", description="xywh: COCO-style top-left corner plus size")
    label: str | None = Field(None, description="column holding the label (or a list, one per box)")


class Filters(_Strict):
    """Records outside these bounds are rejected with reason ``filtered: ...`` (never silently dropped)."""

    min_answer_chars: int | None = Field(None, ge=0)
    max_answer_chars: int | None = Field(None, ge=0)
    min_question_chars: int | None = Field(None, ge=0)
    max_question_chars: int | None = Field(None, ge=0)
    min_image_side: int | None = Field(None, ge=0)
    max_image_side: int | None = Field(None, ge=0)
    max_aspect_ratio: float | None = Field(None, ge=1, description="long side / short side; 1 is a square")
    require_images: bool = False

    @model_validator(mode="after")
    def _bounds_leave_room(self) -> Filters:
        # min above max rejected every row, and the build then blamed something else
        for what in ("answer_chars", "question_chars", "image_side"):
            low, high = getattr(self, f"min_{what}"), getattr(self, f"max_{what}")
            if low is not None and high is not None and low > high:
                raise ValueError(f"min_{what} ({low}) is above max_{what} ({high}): no record could pass")
        return self


class ImageOptions(_Strict):
    """``copy`` writes the source bytes untouched; ``link`` hard-links file sources (copy across filesystems);
    ``convert`` decodes, fixes EXIF orientation and mode, resizes to ``max_pixels`` and re-encodes."""

    mode: Literal["copy", "link", "convert"] = "copy"
    max_pixels: int | None = Field(None, gt=0, description="resize budget (width*height) when mode is convert")
    format: Literal["jpeg", "png", "keep"] = "keep"
    quality: int = Field(95, ge=1, le=100)
    verify: Literal["header", "decode"] = Field(
        "header", description="header: parse the header and check the end marker, decode only what looks unusual; "
                              "decode: always decode (JPEG at 1/8 scale)"
    )

    @model_validator(mode="after")
    def _convert_needs_reason(self) -> ImageOptions:
        if self.mode != "convert" and (self.max_pixels is not None or self.format != "keep"):
            raise ValueError("images.max_pixels / images.format need images.mode: convert (copy/link never re-encode)")
        return self


def count_or_share_text(value: Any) -> Any:
    """``--set split.val=1.0`` arrives as text: ``1.0`` is the share 1.0 (refused), not the count 1 that pydantic
    makes of it for ``int | float``; ``4`` stays the count 4."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return value
    return value


class Split(_Strict):
    """Hold out ``val`` (and ``test``) records: a count (int) or a fraction of the input rows (float < 1)."""

    val: int | float = 0
    test: int | float = 0
    seed: int | None = None
    pick: Literal["random", "last"] = Field(
        "random", description="random: seeded choice of rows; last: the last rows of the input (the tutorial's way)"
    )
    from_source: bool = Field(
        False, description="use the source's own splits (a hub dataset's train/validation/test): each row goes to the "
                           "split its source split names (validation/valid/dev -> val); val/test must then be 0"
    )
    group_by: str | None = Field(
        None, description="keep records together in one split: `image` (records sharing an image; its near copies "
                          "too under dedup: near), `near` (an image or a near copy of it) or a raw row field"
    )

    @model_validator(mode="after")
    def _groups_need_a_drawn_split(self) -> Split:
        if self.group_by is not None:
            if self.from_source:
                raise ValueError("split.group_by draws val/test itself; it cannot be combined with split.from_source")
            if self.pick == "last":
                raise ValueError("split.group_by picks whole groups at random (seeded); leave split.pick at random")
            if not (self.val or self.test):
                raise ValueError("split.group_by needs split.val or split.test to fill")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_grouping(self, handler):
        # A split without group_by dumps as before it existed: same manifests, same build fingerprints.
        data = handler(self)
        if self.group_by is None and isinstance(data, dict):
            data.pop("group_by", None)
        return data

    @model_validator(mode="after")
    def _one_way_to_split(self) -> Split:
        if self.from_source and (self.val or self.test):
            raise ValueError("split.from_source takes the source's own splits: leave split.val and split.test at 0")
        return self

    @field_validator("val", "test", mode="before")
    @classmethod
    def _not_a_switch(cls, v: Any) -> Any:
        if isinstance(v, bool):  # `val: true` would pass as a count of 1
            raise ValueError("a split size is a count (int >= 0) or a fraction (0 <= float < 1), not true/false")
        return count_or_share_text(v)

    @field_validator("val", "test")
    @classmethod
    def _non_negative(cls, v: int | float) -> int | float:
        if v < 0 or (isinstance(v, float) and v >= 1):
            raise ValueError("a split size is a count (int >= 0) or a fraction (0 <= float < 1)")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.val) or bool(self.test) or self.from_source


#: ``dedup.threshold`` default: bits of 64 (measured in docs/quality.md; mmdata.dedup.NEAR_THRESHOLD).
NEAR_THRESHOLD = 10


class Dedup(_Strict):
    """Drop duplicate records at finalize (each becomes a reject with reason ``duplicate``); see docs/quality.md."""

    mode: Literal["exact", "image", "near", "text"] = Field(
        "exact", description="exact: same text and image bytes; image: same image bytes; near: same images up to "
                             "resized/re-encoded copies (perceptual hash); text: same normalised conversation")
    threshold: int = Field(NEAR_THRESHOLD, ge=0, le=32,
                           description="near: largest pHash distance (bits of 64) between copies")
    against: list[str] = Field(
        default_factory=list, description="other builds or dataset_info.json files (PATH or PATH#name,name): "
                                          "records repeating one of theirs are dropped (reason leak)")

    @model_validator(mode="after")
    def _threshold_is_for_near(self) -> Dedup:
        if "threshold" in self.model_fields_set and self.mode != "near":
            raise ValueError(f"dedup.threshold only applies to mode near (mode is {self.mode})")
        return self

    @model_serializer(mode="wrap")
    def _threshold_only_for_near(self, handler):
        data = handler(self)  # dumped recipes (manifests, merge) validate again: no threshold outside near
        if self.mode != "near" and isinstance(data, dict):
            data.pop("threshold", None)
        return data


class Output(_Strict):
    dir: str = Field(..., min_length=1, description="output folder; relative to the current directory")
    format: Literal["sharegpt", "alpaca"] = "sharegpt"
    file_format: Literal["jsonl", "json"] = Field(
        "jsonl", description="jsonl: a folder of shards per split; json: one JSON array file per split"
    )
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="dataset name prefix (default: the recipe name); it names output files")
    dataset_info: str | None = Field(
        None, description="dataset_info.json to create or merge into (default: <dir>/dataset_info.json)"
    )
    shard_size: int = Field(10000, gt=0, description="input rows per task/shard")
    overwrite: bool = Field(False, description="replace existing dataset_info entries of the same name")
    allow_existing: bool = Field(
        False, description="write into a folder that already holds files of its own (e.g. LLaMA-Factory's data/); "
                           "mmdata still never deletes or replaces a file it did not write")


class Info(_Strict):
    """Registry facts about the upstream dataset, shown by ``mmdata list``; the build never reads them."""

    hub_id: str | None = Field(None, description="Hugging Face dataset id")
    modelscope_id: str | None = Field(None, description="ModelScope dataset id (mirror)")
    license: str | None = None
    size: str | None = Field(None, description="rows / download size, as the dataset card states it")
    homepage: str | None = None


class Recipe(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    info: Info = Info()
    source: SourceSpec
    fields: Fields = Fields()
    prompt: str | list[str] | None = Field(
        None, description="user text template ({column} placeholders); a list picks one per record, seeded"
    )
    system: str | None = Field(None, description="system prompt for every record")
    boxes: Boxes | None = Field(None, description="grounding boxes written for the target model (see Boxes)")

    @field_validator("prompt")
    @classmethod
    def _prompt_is_a_template(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list: give one prompt, or a list of at least one to pick from")
        for template in [value] if isinstance(value, str) else value or []:
            try:
                parts = list(string.Formatter().parse(template))
            except ValueError as e:
                raise ValueError(f"{template[:60]!r} is not a valid template ({e}); write a literal brace as {{{{ or }}}}"
                                 ) from None
            for _, name, spec, conversion in parts:
                if name is not None and (spec or conversion or not name.isidentifier()):
                    raise ValueError(f"{template[:60]!r}: {{{name}{'!' + conversion if conversion else ''}"
                                     f"{':' + spec if spec else ''}}} is not a plain column name; a placeholder is "
                                     "{column}, inserted as it is (write a literal brace as {{ or }})")
        return value
    max_samples: int | None = Field(None, gt=0, description="read at most this many source rows")
    max_rejected: int | float | None = Field(
        None, ge=0, description="fail the build (nothing registered) when more rows are rejected than this: a count "
                                "(int) or a share of the rows (float < 1); builds rejecting over 10% always warn")
    seed: int = 42

    @field_validator("max_rejected", mode="before")
    @classmethod
    def _count_or_share_text(cls, value: Any) -> Any:
        return count_or_share_text(value)

    @field_validator("max_rejected")
    @classmethod
    def _count_or_share(cls, value: int | float | None) -> int | float | None:
        if isinstance(value, float) and value >= 1:
            raise ValueError("max_rejected is a count (int) or a share of the rows (0 <= float < 1)")
        return value
    filters: Filters = Filters()
    images: ImageOptions = ImageOptions()
    split: Split = Split()
    dedup: Dedup | None = Field(
        None, description="drop duplicates: exact | image | near | text (the mode alone), or {mode, threshold, against}")

    @field_validator("dedup", mode="before")
    @classmethod
    def _dedup_mode_alone(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _without_unset_dedup(self, handler):
        # A recipe without dedup dumps as before it existed: same manifests, same build fingerprints.
        data = handler(self)
        if self.dedup is None and isinstance(data, dict):
            data.pop("dedup", None)
        return data
    output: Output
    for_prediction: bool = Field(False, description="allow empty answers (sets built only for prediction)")
    num_proc: int | None = Field(None, gt=0, description="worker processes (default: all cores)")
    report: bool = Field(False, description="write report/index.html (stats, plots, gallery) after the build")
    model: str | None = Field(
        None, description="the model the data is for: a profile name (qwen2_vl, qwen2_5_vl, qwen3_vl, "
                          "qwen3_vl_nothink, gemma3, internvl) or a local model folder; the token budget in the summary "
                          "and manifest counts with its template and image rule (default qwen2_vl)")

    # Where the recipe came from; relative source paths resolve against it. Not part of the YAML or its schema.
    _base_dir: str | None = PrivateAttr(None)

    @property
    def base_dir(self) -> str | None:
        return self._base_dir

    @property
    def dataset_name(self) -> str:
        return self.output.name or self.name

    @property
    def split_seed(self) -> int:
        return self.split.seed if self.split.seed is not None else self.seed


# --------------------------------------------------------------------------------------------------- loading


def builtin_recipe_dir() -> Path:
    """The folder of built-in recipes: ``recipes/`` at the top of the checkout, shipped as ``mmdata.builtin_recipes``
    (a data-only package mapped in pyproject.toml), so an editable install and a wheel read the same files."""
    return Path(str(resources.files("mmdata.builtin_recipes")))


def recipe_catalog() -> list[dict[str, Any]]:
    """Every built-in recipe as ``{name, description, info}`` (info: hub ids, licence, size), sorted by name."""
    found = []
    for path in sorted(builtin_recipe_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        info = Info.model_validate(data.get("info") or {}).model_dump(exclude_none=True)
        found.append({"name": path.stem, "description": str(data.get("description", "")).strip(), "info": info})
    return found


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every built-in recipe, sorted by name."""
    return [(entry["name"], entry["description"]) for entry in recipe_catalog()]


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A path to an existing file (or any ``.yaml``) wins; otherwise a built-in recipe name, even where a folder of
    that name is in the current directory."""
    candidate = Path(name_or_path)
    builtin = builtin_recipe_dir() / f"{name_or_path}.yaml"
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise RecipeError(f"{candidate}: recipe file not found")
        return candidate
    if builtin.is_file():  # a folder of the same name here (the user's data, say) does not hide the built-in
        return builtin
    if candidate.is_dir():
        raise RecipeError(f"{candidate}: a folder, not a recipe file (pass the .yaml inside it)")
    names = [n for n, _ in list_recipes()]
    hint = difflib.get_close_matches(str(name_or_path), names, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise RecipeError(f"no recipe named {name_or_path!r}{suggestion}; `mmdata list` shows the built-in ones")


def load_recipe(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                from_text: bool = False) -> Recipe:
    """Read, override and validate a recipe. ``overrides`` use dotted keys: ``{"output.dir": "x", "max_samples": 10}``;
    ``from_text``: they are a command line's ``--set`` strings (:func:`typed_text`)."""
    path = recipe_path(name_or_path)
    data = read_recipe_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, source:, output: ...)")
    for key, value in (overrides or {}).items():
        if key.startswith("source.") and isinstance(value, str) and (
                os.path.exists(value) or value.startswith(("./", "../", ".\\", "..\\", "~"))):
            # an override path is the caller's, relative to their cwd (a missing one too: the error then names it)
            value = os.path.abspath(os.path.expanduser(value))
        set_dotted(data, key, value, from_text=from_text)
    source = data.get("source")
    if overrides and "source.path" in overrides and "source.modelscope_id" not in overrides \
            and isinstance(source, dict):
        source.pop("modelscope_id", None)  # the mirror id of the recipe's own path, not of the one given instead
    base_dir = path.parent.resolve()
    if path.parent.resolve() == builtin_recipe_dir().resolve():
        base_dir = (builtin_recipe_dir() / "data").resolve()
    return validate_recipe(data, origin=str(path), base_dir=str(base_dir))


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; a bigger file is a mistake or an attack
MAX_RECIPE_NODES = 100_000  # YAML nodes once aliases are expanded ("billion laughs" expands 1 kB to 10^9 nodes)


def read_recipe_yaml(path: Path) -> Any:
    """The YAML document of a recipe file, loaded safely and within limits; any problem is one :class:`RecipeError`.

    Safe loading only: Python tags are refused, nothing in a recipe runs code. PyYAML shares aliased nodes, so a
    "billion laughs" document loads quickly, but everything that walks the result (validation, the fingerprint's
    JSON) pays the expanded size: documents over :data:`MAX_RECIPE_NODES` expanded nodes, recursive aliases and files
    over :data:`MAX_RECIPE_BYTES` are refused before they are constructed.
    """
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size} bytes is too large for a recipe (limit 1 MiB)")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters already
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, path) > MAX_RECIPE_NODES:
            raise RecipeError(f"{path}: the YAML expands to more than {MAX_RECIPE_NODES} nodes through aliases "
                              "(an alias bomb?); write the values out instead of nesting anchors")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
        raise RecipeError(f"{path}: not valid YAML: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _refuse_repeated_keys(node: yaml.MappingNode, path: Path) -> None:
    """A key written twice in one mapping: YAML keeps the last silently (two ``output:`` blocks built into the
    second ``dir`` without a word)."""
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            if key.value in seen:
                raise RecipeError(f"{path}: line {key.start_mark.line + 1}: the key {key.value!r} is written twice in "
                                  "one mapping (YAML would keep the last silently); keep one")
            seen.add(key.value)


def _expanded_nodes(root: yaml.Node, path: Path) -> int:
    """Node count with every alias expanded, computed on the shared graph (memoised, iterative: no recursion)."""
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            _refuse_repeated_keys(node, path)
            return [n for pair in node.value for n in pair]
        return []

    size: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            size[id(node)] = min(MAX_RECIPE_NODES + 1, 1 + sum(size[id(c)] for c in children(node)))
            entered.discard(id(node))
        elif id(node) not in size:
            if id(node) in entered:
                raise RecipeError(f"{path}: a YAML alias refers to a node that contains it (recursive alias)")
            entered.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children(node) if id(c) not in size)
    return size[id(root)]


def validate_recipe(data: dict, origin: str = "<recipe>", base_dir: str | None = None) -> Recipe:
    """Validate a recipe mapping; errors name the file, the key path and the closest valid key."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(e, origin)) from None
    recipe._base_dir = base_dir or os.getcwd()
    from .sources import get_source_class

    source_cls = get_source_class(recipe.source.type)
    try:
        source_cls.Params.model_validate(recipe.source.params())
    except ValidationError as e:
        raise RecipeError(_explain(e, origin, prefix=("source",), model=source_cls.Params)) from None
    return recipe


def _explain(error: ValidationError, origin: str, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    lines = [f"{origin}: invalid recipe"]
    for err in error.errors():
        loc = tuple(str(p) for p in prefix + tuple(err["loc"]))
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(model or Recipe, loc[len(prefix):-1]) if model or not prefix else []
            hint = difflib.get_close_matches(loc[-1], valid, n=1)
            suggestion = f"; did you mean {'.'.join(loc[:-1] + (hint[0],))!r}?" if hint else ""
            lines.append(f"  unknown key {where!r}{suggestion} (valid here: {', '.join(valid)})")
        else:
            lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def _valid_keys(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def set_dotted(data: dict, dotted_key: str, value: Any, *, from_text: bool = False) -> None:
    """``set_dotted(d, "output.dir", "x")``: a Python value is set as it is. ``from_text`` (a command line's
    ``--set``): see :func:`typed_text`."""
    if from_text and isinstance(value, str):
        value = typed_text(value)
    keys = dotted_key.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        if isinstance(node, list):  # a list is indexed: source.components.0.count
            if not (key.isdigit() and int(key) < len(node)):
                raise RecipeError(f"override {dotted_key}: {'.'.join(keys[:depth])} is a list of {len(node)}; "
                                  f"index it with 0..{len(node) - 1}")
            key = int(key)
        elif not isinstance(node, dict):
            raise RecipeError(f"override {dotted_key}: {'.'.join(keys[:depth])} is a {type(node).__name__}, not a "
                              "mapping to set a key in")
        elif depth < len(keys) - 1 and not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node = node[key]


_NULL_WORDS = {"null", "Null", "NULL", "~"}


def typed_text(text: str) -> Any:
    """A ``--set`` value: the text as typed, which the recipe's model types for its field (``4`` a count, ``true`` a
    switch, ``0.1`` a share), except a flow collection (``[a, b]``, ``{k: v}``; ``{text}`` stays a prompt template),
    ``null``/``~`` (unset) and a quoted string, which are read as YAML. Read whole as YAML, text became something
    else: ``#`` starts a comment (a prompt ``Describe # carefully`` was cut to ``Describe``), ``No`` is false,
    ``2024-01-01`` a date, ``123`` a number where a name or prompt was meant."""
    stripped = text.strip()
    quoted = len(stripped) > 1 and stripped[0] == stripped[-1] and stripped[0] in "'\""
    if stripped in _NULL_WORDS or quoted or stripped.startswith(("[", "{")):
        try:
            parsed = yaml.safe_load(stripped)
        except yaml.YAMLError:
            return text
        if isinstance(parsed, dict) and all(v is None for v in parsed.values()):
            return text  # "{text}" is a prompt template, not the mapping {text: null}
        return parsed
    return text


def recipe_json_schema() -> dict:
    return Recipe.model_json_schema()
