"""Any hub dataset through ``datasets``: a Hugging Face id, its ModelScope mirror, or a local copy.

``hub`` picks where a hub id is fetched from: ``hf``, ``modelscope`` (``modelscope_id`` when the mirror's id differs)
or ``auto`` (ModelScope first, then Hugging Face; if both fail the error gives each hub's reason). Before asking a hub
the source opens one TCP connection to it (or to the HTTPS proxy) with a 3 s timeout: offline, the build fails in
seconds with one line per hub instead of after ModelScope's retries. ``HF_HUB_OFFLINE=1`` skips the check for
Hugging Face (its cache answers).

A ``path`` that exists locally skips the hubs altogether, so every hub recipe also works offline with
``--set source.path=<local copy>``: a folder in hub layout (``README.md`` ``configs:`` or ``<split>-*.parquet``
files), or one data file (``.parquet``, ``.csv``, ``.json``, ``.jsonl``, ``.arrow``) read with the matching packaged
builder. ``datasets`` caches a local copy as Arrow under a key that ignores the data files' contents, so rewriting a
parquet in place would keep building the old rows; the source therefore stamps each cache with the size and mtime
of the copy's data files and re-prepares it when the stamp differs, and the fingerprint covers the same stamp.

Image columns are cast to ``Image(decode=False)`` so rows carry the original encoded bytes: nothing is decoded just
to be copied. ``ClassLabel`` columns (also inside lists) hold the label *name*, not its integer: an answer "3" teaches
a model nothing. ``shape`` turns conversation-shaped rows (sharegpt ``conversations``/``messages``, alpaca
``instruction/input/output/history``) into canonical ``messages`` with the JSON source's rules, so a dataset that is
"columns plus a renaming" needs no Python. ``where`` keeps rows whose columns equal given values (SLAKE's
``q_lang``); the rows it drops are counted (:meth:`HfSource.skipped`).

``split`` is one split or a list (``[train, validation, test]``): rows are the splits' rows in that order, and every
row carries ``__split__``, its source split's name, for ``split: {from_source: true}``.

Why over 400 lines: this is the one adapter behind every hub recipe, and its parts (local copies and their cache,
the two hubs and their failure messages, split lists, label names, ``where:``) are all "load one hub dataset the
way ``datasets`` would"; the tests patch ``hub_unreachable`` here, where the loaders call it.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
import shutil
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import field_validator

from ..errors import SourceError
from . import Source, SourceParams, files_fingerprint, register_source

Scalar = str | int | float | bool
#: a single local data file -> the packaged ``datasets`` builder that reads it
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
HUB_CHECK_TIMEOUT = 3.0
CACHE_STAMP = "mmdata_source_files.sha256"


class HfParams(SourceParams):
    path: str
    subset: str | None = None
    split: str | list[str] = "train"
    revision: str | None = None
    token: str | None = None
    streaming: bool = False
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    trust_remote_code: bool = False
    hub: Literal["hf", "modelscope", "auto"] = "hf"
    modelscope_id: str | None = None
    shape: Literal["columns", "auto", "sharegpt", "alpaca"] = "columns"
    where: dict[str, Scalar | list[Scalar]] | None = None
    first_item: list[str] = []
    image_root: str | None = None

    @field_validator("split")
    @classmethod
    def _splits(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of splits names each split once, e.g. [train, validation, test]")
        return value

    @property
    def splits(self) -> list[str]:
        return [self.split] if isinstance(self.split, str) else list(self.split)


def is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


@dataclass
class _Part:
    """One split: its dataset (after ``where`` unless streaming), size before ``where``, and what each row needs."""

    split: str
    dataset: Any
    total: int | None = None  # rows before ``where`` (non-streaming)
    kept: Any = None  # original positions of the kept rows: the filtered dataset's indices mapping
    labels: dict[str, Callable] | None = None  # ClassLabel columns -> int-to-name converters
    where: dict[str, set] | None = None  # streaming: applied while iterating, so dropped rows can be counted


@register_source("hf")
class HfSource(Source):
    Params = HfParams

    def __init__(self, params: HfParams, base_dir: Path):
        super().__init__(params, base_dir)
        self._parts: list[_Part] | None = None
        self._dataset = None
        self._files: list[Path] | None = None  # a local copy's data files (None: from a hub)
        self._fresh = False
        self._dropped = 0  # streaming: rows ``where`` has dropped so far

    @property
    def default_fields(self) -> dict[str, str]:
        return {} if self.params.shape == "columns" else {"messages": "messages", "images": "images", "id": "id"}

    @property
    def location(self) -> str:
        """A local path (made absolute against the recipe folder) or the hub id, unchanged."""
        p = self.params.path
        if p.startswith((".", "/", "~")) or is_local(str(self.resolve(p))):
            return str(self.resolve(p))
        return p

    def refresh(self) -> None:
        """Re-prepare a local copy from its files on the next load, whatever the cache stamp says (``rebuild``)."""
        self._fresh, self._parts, self._dataset = True, None, None

    @property
    def parts(self) -> list[_Part]:
        if self._parts is None:
            datasets_, self._files = load_hf_splits(self.params, self.location, fresh=self._fresh)
            self._parts = [self._part(split, ds) for split, ds in zip(self.params.splits, datasets_, strict=True)]
            self._fresh = False
        return self._parts

    def _part(self, split: str, ds) -> _Part:
        ds = keep_images_encoded(ds)
        features = getattr(ds, "features", None)
        part = _Part(split, ds, labels=class_label_converters(features))
        if not self.params.where:
            return part
        where = where_values(self.params.where, features, getattr(ds, "column_names", None))
        if self.params.streaming:
            part.where = where
            return part
        if ds._indices is not None:
            ds = ds.flatten_indices()  # so the filter's indices are positions in this split
        part.total = len(ds)
        part.dataset = _filter(ds, where)
        part.kept = part.dataset._indices.column("indices") if part.dataset._indices is not None else None
        return part

    @property
    def dataset(self):
        """The rows as one ``datasets`` object (the splits concatenated), for sources built on this one."""
        if self._dataset is None:
            parts = [p.dataset for p in self.parts]
            if len(parts) == 1:
                self._dataset = parts[0]
            else:
                import datasets

                try:
                    self._dataset = datasets.concatenate_datasets(parts)
                except ValueError as e:
                    raise SourceError(f"source.split {self.params.split}: the splits cannot be read as one table "
                                      f"(their columns differ: {e}); build them one split at a time") from None
        return self._dataset

    def part_of(self, index: int) -> _Part:
        """The split that row ``index`` of :attr:`dataset` comes from (non-streaming)."""
        return self.parts[bisect.bisect_right(list(self._ends()), index)]

    def _ends(self) -> Iterator[int]:
        end = 0
        for part in self.parts:
            end += len(part.dataset)
            yield end

    def rows(self) -> Iterator[dict]:
        if not self.params.streaming:
            yield from self.read_rows(0, self.num_rows())
            return
        self._dropped = 0
        for part in self.parts:
            for row in part.dataset:
                if part.where and not all(row.get(c) in allowed for c, allowed in part.where.items()):
                    self._dropped += 1
                    continue
                yield self.convert(row, part)

    @property
    def random_access(self) -> bool:  # an Arrow-backed dataset reads any row range cheaply
        return not self.params.streaming

    def read_rows(self, start: int, stop: int) -> Iterator[dict]:
        offset = 0
        for part in self.parts:
            n = len(part.dataset)
            a, b = max(start, offset), min(stop, offset + n)
            if a < b:
                for row in part.dataset.select(range(a - offset, b - offset)):
                    yield self.convert(row, part)
            offset += n

    def convert(self, row: dict, part: _Part) -> dict:
        """A raw row of ``part`` as this source yields it (see :func:`convert_row`)."""
        return convert_row(row, part.labels, self.params.first_item, self.params.shape, part.split)

    def num_rows(self) -> int | None:
        return None if self.params.streaming else sum(len(p.dataset) for p in self.parts)

    def skipped(self, rows_yielded: int | None = None) -> dict[str, int]:
        """Rows ``where`` dropped before the ``rows_yielded``-th kept row (all of them once the whole source is read).

        Non-streaming, the filtered dataset's indices mapping holds each kept row's original position ``k_j``, so
        the rows dropped before kept row ``j`` are ``k_j - j``. Streaming, :meth:`rows` counts them as it goes, so
        the count is of what has been read so far.
        """
        if not self.params.where:
            return {}
        if self.params.streaming:
            return {"where": self._dropped}
        total = self.num_rows()
        if rows_yielded is None or rows_yielded >= total:
            return {"where": sum(p.total - len(p.dataset) for p in self.parts)}
        j, dropped = rows_yielded - 1, 0
        if j < 0:
            return {"where": 0}
        for part in self.parts:
            n = len(part.dataset)
            if j < n:
                return {"where": dropped + (part.kept[j].as_py() - j if part.kept is not None else 0)}
            dropped += part.total - n
            j -= n
        return {"where": dropped}

    @property
    def image_root(self) -> Path:
        """``image_root`` (relative to the local copy, else to the recipe), else the local copy, else the recipe."""
        local = Path(self.location) if is_local(self.location) else None
        if self.params.image_root:
            root = Path(os.path.expanduser(self.params.image_root))
            if root.is_absolute():
                return root
            return (local if local and local.is_dir() else self.base_dir) / root
        if local is not None and local.is_file():
            return local.parent
        return local if local else self.base_dir

    @property
    def allowed_roots(self) -> list[Path]:
        """Also the Hugging Face caches: hub datasets in imagefolder layout hand out paths to downloaded files."""
        import datasets
        import huggingface_hub

        return [*super().allowed_roots, Path(datasets.config.HF_DATASETS_CACHE),
                Path(huggingface_hub.constants.HF_HUB_CACHE)]

    def fingerprint(self) -> str:
        """A local copy: its data files' names, sizes and mtimes. A hub dataset: the cached Arrow fingerprints,
        which change with the hub revision."""
        parts = self.parts
        if self._files is not None:
            data = files_fingerprint(self._files)
        else:
            data = ",".join(str(getattr(p.dataset, "_fingerprint", None)) for p in parts)
        return hashlib.sha256(f"{self.params.model_dump_json()}|{self.location}|{data}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- loading


def load_hf_splits(params: HfParams, location: str, fresh: bool = False) -> tuple[list, list[Path] | None]:
    """Each of ``params.splits`` as a ``datasets`` object, and the local copy's data files (``None`` for a hub)."""
    if os.path.isabs(location) and not is_local(location):  # a path (source.location made it absolute), not an id
        raise SourceError(f"{location}: local dataset copy not found (source.path names a folder or file that does "
                          "not exist; a relative one is relative to the recipe's folder, a --set one to the current "
                          "folder)")
    if is_local(location):
        try:
            return _load_local(params, location, fresh)
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{location}: cannot load the local dataset copy (subset={params.subset!r}, "
                              f"split={params.split!r}): {type(e).__name__}: {e}") from e
    load = {"hf": _from_hf, "modelscope": _from_modelscope, "auto": _from_either}[params.hub]
    try:
        return [load(params, location, split) for split in params.splits], None
    except HubUnreachableError as e:
        if params.hub == "auto":  # the hint is on its own line already
            raise
        raise HubUnreachableError(f"{e} {OFFLINE_HINT}") from e.__cause__


def _load_local(params: HfParams, location: str, fresh: bool) -> tuple[list, list[Path]]:
    """A local copy through its ``datasets`` builder, re-prepared when its data files changed since it was cached.

    ``load_dataset`` would reuse an Arrow cache whose key, for a copy with README ``configs:``, does not depend on
    the data files; so the builder is driven here (what ``load_dataset`` does inside) with a stamp of the files kept
    next to the cache.
    """
    import datasets

    path = Path(location)
    if path.is_file():
        builder_name = FILE_BUILDERS.get("".join(path.suffixes[-1:]).lower())
        if builder_name is None:
            raise SourceError(f"{path}: a single data file must be one of {', '.join(FILE_BUILDERS)}; or point "
                              "source.path at the dataset's folder")
        if len(params.splits) != 1:
            raise SourceError(f"{path}: one data file holds one split; source.split lists {params.split}")

        def make_builder(**config):
            return datasets.load_dataset_builder(builder_name, data_files={params.splits[0]: str(path)}, **config)
    else:
        kwargs = dict(name=params.subset, data_dir=params.data_dir, data_files=params.data_files)
        if params.trust_remote_code:
            kwargs["trust_remote_code"] = True

        def make_builder(**config):
            return datasets.load_dataset_builder(str(path), **{k: v for k, v in kwargs.items() if v is not None},
                                                 **config)
    builder = make_builder()
    files = _builder_files(builder, path)
    header = _csv_header(builder, files)
    if header:
        # pandas' defaults would read "None", "NA" and "" as missing and "007" as 7.0: every column stays the text
        # in the file, as the csv source reads it
        make_builder = functools.partial(
            make_builder, features=datasets.Features({c: datasets.Value("string") for c in header}),
            keep_default_na=False)
        builder = make_builder()
    if params.streaming:
        return [builder.as_streaming_dataset(split=split) for split in params.splits], files
    from filelock import FileLock  # a dependency of datasets

    stamp = files_fingerprint(files)
    # Builds of one copy may run side by side (--shard parts): one checks, clears and prepares at a time.
    with FileLock(str(builder.cache_dir).rstrip("/") + ".mmdata.lock"):
        stamp_file = Path(builder.cache_dir) / CACHE_STAMP
        if fresh or not stamp_file.is_file() or stamp_file.read_text() != stamp:
            # Stale (or not ours): remove it and start over. Re-preparing over it is not enough: the builder has
            # read the old split sizes from it already and would refuse the new files as "non-matching".
            shutil.rmtree(builder.cache_dir, ignore_errors=True)
            builder = make_builder()
            builder.download_and_prepare()
            stamp_file.write_text(stamp)
        else:
            builder.download_and_prepare()
        return [builder.as_dataset(split=split) for split in params.splits], files


def _csv_header(builder, files: list[Path]) -> list[str] | None:
    """The column names pandas gives a CSV builder's first data file (``Unnamed: 0`` for a blank one, ``text.1`` for
    a repeat) when its column types are not declared, else None."""
    import pandas as pd

    if builder.name != "csv" or builder.config.features is not None:
        return None
    first = next((f for f in files if f.name != "README.md"), None)
    try:
        columns = pd.read_csv(first, nrows=0, sep=builder.config.sep or builder.config.delimiter or ",",
                              encoding=builder.config.encoding or "utf-8").columns
    except (OSError, ValueError, TypeError, UnicodeDecodeError, pd.errors.ParserError):
        return None  # the builder's own reading says what is wrong
    return [str(c) for c in columns] or None


def _builder_files(builder, path: Path) -> list[Path]:
    """The local files a builder reads (every split of its config) plus the dataset card: what the stamp covers."""
    found = set()
    for files in (getattr(builder.config, "data_files", None) or {}).values():
        found.update(Path(f) for f in files if os.path.isfile(f))
    if not found:  # no data_files (a loading script): every file of the copy outside hidden folders
        found = {p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)}
    card = path / "README.md" if path.is_dir() else None
    return sorted(found | ({card} if card and card.is_file() else set()))


def _from_hf(params: HfParams, dataset_id: str, split: str):
    import datasets

    if not (datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")):
        reason = hub_unreachable("hf")
        if reason:
            raise HubUnreachableError(f"hf: cannot reach the hub for dataset {dataset_id!r} ({reason}). "
                                      f"Ways out: {WAYS_OUT['hf']}")
    try:
        return _load_with_datasets(params, dataset_id, split)
    except Exception as e:  # noqa: BLE001 - every loader failure is reported the same way, with its cause
        raise _hub_error(e, "hf", dataset_id) from e


def _from_modelscope(params: HfParams, dataset_id: str, split: str):
    from .modelscope_loader import load_from_modelscope

    ms_id = params.modelscope_id or dataset_id
    reason = hub_unreachable("modelscope")
    if reason:
        raise HubUnreachableError(f"modelscope: cannot reach the hub for dataset {ms_id!r} ({reason}). "
                                  f"Ways out: {WAYS_OUT['modelscope']}")
    try:
        return load_from_modelscope(params, ms_id, split)
    except Exception as e:  # noqa: BLE001
        raise _hub_error(e, "modelscope", ms_id) from e


def _from_either(params: HfParams, dataset_id: str, split: str):
    """``hub: auto``: ModelScope first (the tutorials' hub), then Hugging Face; both reasons if both fail."""
    errors = []
    for load in (_from_modelscope, _from_hf):
        try:
            return load(params, dataset_id, split)
        except SourceError as e:
            errors.append(e)
    lines = "\n  ".join(str(e) for e in errors)
    if all(isinstance(e, HubUnreachableError) for e in errors):
        raise HubUnreachableError(f"hub: auto tried both hubs and both failed:\n  {lines}\n{OFFLINE_HINT}")
    raise SourceError(f"hub: auto tried both hubs and both failed:\n  {lines}")


def _load_with_datasets(params: HfParams, location: str, split: str):
    import datasets

    kwargs = dict(
        name=params.subset, split=split, revision=params.revision, streaming=params.streaming,
        data_dir=params.data_dir, data_files=params.data_files,
    )
    token = params.token or os.environ.get("HF_TOKEN")
    if token:
        kwargs["token"] = token  # otherwise datasets falls back to the cached `huggingface-cli login` token
    if params.trust_remote_code:
        kwargs["trust_remote_code"] = True
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return datasets.load_dataset(location, **kwargs)


class HubUnreachableError(SourceError):
    """No connection to a hub: the message names the hub, the dataset and the ways out (a local copy, a mirror)."""


HUB_ENDPOINTS = {"hf": ("HF_ENDPOINT", "https://huggingface.co"),
                 "modelscope": ("MODELSCOPE_ENDPOINT", "https://www.modelscope.cn")}


def hub_unreachable(hub: str) -> str | None:
    """``None`` if a TCP connection to the hub (or to the HTTPS proxy in use) opens within 3 s, else why not.

    One connection, no request: it tells "offline" from "slow" before a hub client spends its retries (ModelScope
    takes about 40 s to give up). DNS is inside the timeout too (the connect runs in a thread).
    """
    env, default = HUB_ENDPOINTS[hub]
    endpoint = os.environ.get(env) or (f"https://{os.environ['MODELSCOPE_DOMAIN']}" if hub == "modelscope"
                                       and os.environ.get("MODELSCOPE_DOMAIN") else default)
    target = urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(target.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_TIMEOUT)
    via = " (the HTTPS proxy)" if target.hostname != urlsplit(endpoint).hostname else ""
    if not outcome:
        return f"no connection to {host}:{port}{via} within {HUB_CHECK_TIMEOUT:g} s"
    if outcome[0] is not None:
        return f"no connection to {host}:{port}{via}: {type(outcome[0]).__name__}: {outcome[0]}"
    return None


# ----------------------------------------------------------------------------------------------- rows


def convert_row(row: dict, labels: dict[str, Callable] | None, first_item: list[str], shape: str,
                split: str | None) -> dict:
    """Label names for ClassLabel integers, ``first_item`` (a list of answers -> the first), the split name, and
    ``shape`` (conversation rows -> canonical messages, with the JSON source's rules; a row matching no shape becomes
    an ``__error__`` row, so the build rejects it with the reason)."""
    for column, to_name in (labels or {}).items():
        if column in row:
            row[column] = to_name(row[column])
    for column in first_item:
        value = row.get(column)
        row[column] = value[0] if isinstance(value, (list, tuple)) and value else value
    if split is not None:
        row["__split__"] = split
    if shape == "columns":
        return row
    from .jsonfile import ShapeError, to_canonical

    try:
        return to_canonical(row, shape)
    except ShapeError as e:
        return {"__error__": str(e), "__reason__": "bad record shape", "id": row.get("id"),
                **({"__split__": split} if split is not None else {})}


def where_values(where: dict, features, columns) -> dict[str, set]:
    """``where`` as sets of raw column values; a label *name* on a ClassLabel column becomes its integer."""
    import datasets

    missing = [c for c in where if columns is not None and c not in columns]
    if missing:
        raise SourceError(f"source.where names column(s) {missing} the dataset lacks (columns: {columns})")
    allowed = {}
    for column, value in where.items():
        values = value if isinstance(value, list) else [value]
        feature = (features or {}).get(column)
        if isinstance(feature, datasets.ClassLabel):
            # a label index given as text ("--set source.where.label=1") is the index, unless it is a class name
            values = [int(v) if isinstance(v, str) and v.isdigit() and v not in feature.names else v for v in values]
            unknown = [v for v in values if isinstance(v, str) and v not in feature.names]
            if unknown:
                raise SourceError(f"source.where {column}: {unknown} is not a class name of that column "
                                  f"({', '.join(feature.names)})")
            values = [feature.str2int(v) if isinstance(v, str) else v for v in values]
        elif isinstance(feature, datasets.Value):
            values = [_as_column_type(v, feature.dtype) for v in values]
        allowed[column] = set(values)
    return allowed


def _as_column_type(value: Scalar, dtype: str) -> Scalar:
    """A ``where`` value in its column's type: ``--set source.where.year=2020`` arrives as the text "2020", and a
    CSV read as text holds "2020" where the recipe wrote 2020; either way nothing matched."""
    if dtype in ("string", "large_string"):
        return value if isinstance(value, str) else str(value)
    if isinstance(value, str):
        try:
            if dtype.startswith(("int", "uint")):
                return int(value)
            if dtype.startswith("float"):
                return float(value)
        except ValueError:
            return value
        if dtype == "bool" and value.lower() in ("true", "false"):
            return value.lower() == "true"
    return value


def _filter(ds, allowed: dict[str, set]):
    """Keep rows whose columns hold one of the allowed values (batched over just those columns)."""
    columns = list(allowed)

    def keep(*values: list) -> list[bool]:
        return [all(v in allowed[c] for c, v in zip(columns, row, strict=True)) for row in zip(*values, strict=True)]

    return ds.filter(keep, batched=True, input_columns=columns)


def class_label_converters(features) -> dict[str, Callable]:
    """Per column holding ``ClassLabel`` values (directly, in lists, in structs): a function from the stored
    integers to the names. ``-1`` (HF's "no label", common in test splits) becomes ``None``, an empty answer."""
    converters = {}
    for name, feature in (features or {}).items():
        convert = _label_converter(feature)
        if convert is not None:
            converters[name] = convert
    return converters


def _label_converter(feature) -> Callable | None:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return lambda v: (None if v is None or v < 0 else feature.int2str(v)) if isinstance(v, int) else v
    if isinstance(feature, dict):
        inner = {k: c for k, c in ((k, _label_converter(f)) for k, f in feature.items()) if c is not None}
        if not inner:
            return None
        return lambda v: {k: inner[k](x) if k in inner else x for k, x in v.items()} if isinstance(v, dict) else v
    item = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    convert = _label_converter(item) if item is not None else None
    if convert is None:
        return None
    return lambda v: [convert(x) for x in v] if isinstance(v, list) else v


def keep_images_encoded(ds):
    """Cast every ``Image`` feature (also inside lists) to ``decode=False``: rows then hold ``{bytes, path}``."""
    import datasets

    features = getattr(ds, "features", None)
    if not features:
        return ds
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, list) or hasattr(feature, "feature"):  # [Image] / List(Image) / Sequence(Image)
            inner = feature[0] if isinstance(feature, list) else feature.feature
            if isinstance(inner, datasets.Image) and inner.decode:
                encoded = datasets.Image(decode=False)
                ds = ds.cast_column(name, [encoded] if isinstance(feature, list) else type(feature)(encoded))
    return ds


# ----------------------------------------------------------------------------------------------- errors


HUB_PAGES = {"hf": "https://huggingface.co/datasets/{}", "modelscope": "https://modelscope.cn/datasets/{}"}
WAYS_OUT = {
    "hf": "point source.path at a local copy in hub layout, set HF_ENDPOINT to a mirror, or set HF_HUB_OFFLINE=1 "
          "with a filled cache (HF_HOME / HF_DATASETS_CACHE)",
    "modelscope": "point source.path at a local copy in hub layout, set MODELSCOPE_CACHE to a filled cache, or use "
                  "source.hub: hf",
}
OFFLINE_HINT = ("Offline? `mmdata build latex_ocr_sample` needs no network, and any hub recipe builds from a local "
                "copy: --set source.path=<copy in hub layout>")


def _hub_error(error: Exception, hub: str, dataset: str) -> SourceError:
    message = explain_hub_error(error, hub, dataset)
    unreachable = message.startswith(f"{hub}: cannot reach the hub")
    return HubUnreachableError(message) if unreachable else SourceError(message)


def explain_hub_error(error: Exception, hub: str, dataset: str) -> str:
    """One message naming the hub, the dataset, what went wrong and the way out.

    The checks read the whole cause chain: ``datasets`` wraps hub errors (a ``GatedRepoError`` becomes a
    ``DatasetNotFoundError`` saying "gated"), ModelScope raises its own types; the text is what they share.
    """
    text = f"{type(error).__name__}: {error}"
    chain = " | ".join(f"{type(e).__name__}: {e}" for e in _causes(error)).lower()
    page = HUB_PAGES.get(hub, "{}").format(dataset)
    if isinstance(error, ModuleNotFoundError) or "pip install" in chain:
        return f"{hub}: cannot load dataset {dataset!r}: {error}"
    if any(s in chain for s in ("gated", "401", "403", "unauthorized", "forbidden", "authenticat", "not login",
                                "permission")):
        token = ("set HF_TOKEN, run `huggingface-cli login`, or set source.token" if hub == "hf"
                 else "set source.token or run `modelscope login`")
        return (f"{hub}: dataset {dataset!r} is gated or needs authentication. Accept its terms on the dataset page "
                f"({page}) while logged in, then pass a token ({token}). Cause: {text}")
    if any(s in chain for s in ("connection", "offline", "timed out", "timeout", "max retries", "network",
                                "couldn't reach", "name or service", "failed to resolve", "unreachable",
                                "deadline")):
        return f"{hub}: cannot reach the hub for dataset {dataset!r}. Ways out: {WAYS_OUT.get(hub, '')}. Cause: {text}"
    if any(s in chain for s in ("doesn't exist", "not found", "notexist", "404")):
        return (f"{hub}: dataset {dataset!r} was not found, or it is private/gated and needs a token ({page}). "
                f"Check the id and source.subset / source.split. Cause: {text}")
    return f"{hub}: cannot load dataset {dataset!r}: {text}"


def _causes(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen
