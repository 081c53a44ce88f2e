"""In-memory data as a source: ``mmdata.build(df, output__dir=..., fields__answer=...)`` from a notebook, with a
``pandas.DataFrame`` or a ``datasets.Dataset``.

A recipe is data (YAML-able), an in-memory table is not, and the build opens its source from the recipe
(``open_source(type, params, base_dir)``). So :func:`recipe_for_data` puts the object in a process-local registry
under a key made from its *content* (``Dataset._fingerprint``; for a DataFrame a hash of its columns, types and
values) and the recipe's ``source`` says ``{type: memory, key: ...}``. The same data built twice has the same key,
so the second build is "up to date"; changed data has another key and rebuilds. Workers are forked, so they see the
source the build opened; the Ray engine pickles that source, data included. The registry holds the objects weakly:
it never keeps a notebook's data alive after the build that needed it.

Columns: ``image``/``images`` (paths, relative to the current directory, bytes, PIL images or HF ``{bytes, path}``
dicts), ``question``, ``answer``, ``id``, ``system`` are mapped by name when present (``fields`` overrides); a table
with ``messages``/``conversations`` or ``instruction`` columns is read with the JSON source's shapes, as ``hf`` does
with ``shape: auto``. ``ClassLabel`` columns of a Dataset hold their label names.
"""

from __future__ import annotations

import hashlib
import math
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ..errors import RecipeError, SourceError
from . import Source, SourceParams, register_source

_LIVE: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_ROLES = ("image", "images", "question", "answer", "id", "system")


class MemoryParams(SourceParams):
    key: str
    # Relative image paths in the data resolve against the current directory of the build() call. Not called
    # image_root on purpose: that key names a folder the source walks, and an output folder under the current
    # directory is where a notebook user writes.
    cwd: str = "."
    shape: Literal["columns", "auto", "sharegpt", "alpaca"] | None = None  # None: from the columns


def recipe_for_data(data: Any, overrides: dict[str, Any]):
    """A validated :class:`~mmdata.recipes.Recipe` that builds ``data``; ``overrides`` use dotted keys
    (``{"output.dir": "out", "fields.answer": "caption", "name": "pets"}``); the name defaults to ``dataset``."""
    from ..recipes import set_dotted, validate_recipe

    key = register_data(data)
    document: dict[str, Any] = {"name": "dataset", "source": {"type": "memory", "key": key}, "output": {}}
    for dotted, value in overrides.items():
        set_dotted(document, dotted, value)
    document["source"].setdefault("cwd", os.getcwd())
    if not document["output"].get("dir") and not set(document["output"]) - {"dir"}:  # else: a typo, named below
        raise RecipeError(f"mmdata.build({type(data).__name__}): say where to write, e.g. output__dir='out/{document['name']}'")
    return validate_recipe(document, origin=f"mmdata.build({type(data).__name__})", base_dir=os.getcwd())


def register_data(data: Any) -> str:
    """Put ``data`` in the registry; its key (a content hash). Refuses what is not a DataFrame or a Dataset."""
    kind = _kind(data)
    key = f"{kind}:{data._fingerprint if kind == 'datasets' else frame_digest(data)}"
    _LIVE[key] = data
    return key


def _kind(data: Any) -> str:
    module = type(data).__module__
    if module.startswith("pandas") and type(data).__name__ == "DataFrame":
        return "pandas"
    if module.startswith("datasets"):
        import datasets

        if isinstance(data, datasets.Dataset):
            return "datasets"
        if isinstance(data, datasets.DatasetDict):
            raise RecipeError(f"a DatasetDict holds several splits ({', '.join(data)}): build one, "
                              "e.g. mmdata.build(data['train'], ...)")
        if isinstance(data, datasets.IterableDataset):
            raise RecipeError("an IterableDataset can be read only once, in order: build a datasets.Dataset "
                              "(e.g. Dataset.from_generator) or write the rows to a JSONL file and build that")
    raise RecipeError(f"mmdata.build() takes a recipe name, a YAML path, a Recipe, a pandas.DataFrame or a "
                      f"datasets.Dataset; got a {type(data).__module__}.{type(data).__name__}")


def frame_digest(df) -> str:
    """Content hash of a DataFrame: column names, dtypes and every value in row order (the index is not read)."""
    import pandas as pd

    h = hashlib.sha256()
    h.update(repr([(str(c), str(t)) for c, t in df.dtypes.items()]).encode())
    for column in df.columns:
        values = df[column]
        if values.dtype != object:
            try:
                h.update(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes())
                continue
            except TypeError:
                pass
        for value in values:
            _digest(h, value)
    return h.hexdigest()


def _digest(h, value: Any) -> None:
    """Feed one cell to the hash by content: bytes and text as is, containers item by item, a PIL image by pixels."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        h.update(b"b%d:" % len(data) + data)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data) + data)
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            _digest(h, str(k))
            _digest(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        h.update(b"[")
        for item in value:
            _digest(h, item)
        h.update(b"]")
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # PIL image
        h.update(f"img{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode() + b";")


@register_source("memory")
class MemorySource(Source):
    Params = MemoryParams
    random_access = True

    def __init__(self, params: MemoryParams, base_dir: Path):
        super().__init__(params, base_dir)
        data = _LIVE.get(params.key)
        if data is None:
            raise SourceError(f"in-memory data {params.key!r} is not in this process: a memory source is made by "
                              "mmdata.build(data, ...) in the process that holds the data")
        self.kind = _kind(data)
        self.labels = None
        if self.kind == "datasets":
            from .hf import class_label_converters, keep_images_encoded

            data = keep_images_encoded(data)
            self.labels = class_label_converters(data.features)
        self.data = data
        self.whole_numbers = _whole_number_columns(data) if self.kind == "pandas" else set()
        columns = [str(c) for c in (data.columns if self.kind == "pandas" else data.column_names)]
        self.shape = params.shape or ("auto" if {"messages", "conversations", "instruction"} & set(columns)
                                      else "columns")
        self.default_fields = ({"messages": "messages", "images": "images", "id": "id"} if self.shape != "columns"
                               else {role: role for role in _ROLES if role in columns})

    @property
    def image_root(self) -> Path:
        return self.resolve(self.params.cwd)

    def num_rows(self) -> int:
        return len(self.data)

    def rows(self) -> Iterator[dict]:
        return self.read_rows(0, len(self.data))

    def read_rows(self, start: int, stop: int) -> Iterator[dict]:
        from .hf import convert_row

        stop = min(stop, len(self.data))
        if self.kind == "pandas":
            raw = ({str(k): _plain(v, int if k in self.whole_numbers else None) for k, v in record.items()}
                   for record in self.data.iloc[start:stop].to_dict(orient="records"))
        else:
            raw = iter(self.data.select(range(start, stop))) if start < stop else iter(())
        for row in raw:
            yield convert_row(row, self.labels, [], self.shape, None)

    def fingerprint(self) -> str:
        """The key is the content hash already; the params add the image folder and the shape."""
        return hashlib.sha256(self.params.model_dump_json().encode()).hexdigest()


def _whole_number_columns(df) -> set:
    """Float columns with missing cells whose other values are all whole numbers: integer columns that pandas
    turned into floats for the missing cells (``[3, NaN, 2]``), whose 3 must be written "3", not "3.0"."""
    found = set()
    for column in df.columns:
        values = df[column]
        if values.dtype.kind == "f" and values.isna().any():
            present = values.dropna()
            if ((present % 1) == 0).all():
                found.add(column)
    return found


def _plain(value: Any, whole: type | None = None) -> Any:
    """A pandas cell as a plain Python value: numpy scalars unboxed, arrays as lists, NA/NaT as ``None``; ``whole``
    (``int``) for a cell of a :func:`_whole_number_columns` column."""
    if type(value).__module__ == "numpy":
        if hasattr(value, "tolist"):
            value = value.tolist()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if whole is not None and isinstance(value, float) and math.isfinite(value):
        return whole(value)
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - a DataFrame implies pandas
        pass
    return value
