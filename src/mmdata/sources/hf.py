"""Any hub dataset through ``datasets.load_dataset``: a Hugging Face id, its ModelScope mirror, or a local copy.

``hub`` picks where a hub id is fetched from: ``hf``, ``modelscope`` (``modelscope_id`` when the mirror's id differs)
or ``auto`` (ModelScope first, then Hugging Face; if both fail the error gives each hub's reason). A ``path`` that
exists locally (a folder in hub layout, or data files) skips the hubs altogether, so every hub recipe also works
offline with ``--set source.path=<local copy>``.

Image columns are cast to ``Image(decode=False)`` so rows carry the original encoded bytes: nothing is decoded just
to be copied. ``shape`` turns conversation-shaped rows (sharegpt ``conversations``/``messages``, alpaca
``instruction/input/output/history``) into canonical ``messages`` with the JSON source's rules, so a dataset that is
"columns plus a renaming" needs no Python. ``where`` keeps rows whose columns equal given values (SLAKE's ``q_lang``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from ..errors import SourceError
from . import Source, SourceParams, register_source

Scalar = str | int | float | bool


class HfParams(SourceParams):
    path: str
    subset: str | None = None
    split: str = "train"
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


def is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


@register_source("hf")
class HfSource(Source):
    Params = HfParams

    def __init__(self, params: HfParams, base_dir: Path):
        super().__init__(params, base_dir)
        self._dataset = None

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

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = load_hf_dataset(self.params, self.location)
        return self._dataset

    def rows(self) -> Iterator[dict]:
        return map(self._convert, self.dataset)

    @property
    def random_access(self) -> bool:  # an Arrow-backed dataset reads any row range cheaply
        return not self.params.streaming

    def read_rows(self, start: int, stop: int) -> Iterator[dict]:
        return map(self._convert, self.dataset.select(range(start, min(stop, len(self.dataset)))))

    def _convert(self, row: dict) -> dict:
        """Apply ``first_item`` (a list of answers -> the first) and ``shape`` (conversation rows -> messages)."""
        for column in self.params.first_item:
            value = row.get(column)
            row[column] = value[0] if isinstance(value, (list, tuple)) and value else value
        if self.params.shape == "columns":
            return row
        from .jsonfile import ShapeError, to_canonical

        try:
            return to_canonical(row, self.params.shape)
        except ShapeError as e:
            return {"__error__": str(e), "__reason__": "bad record shape", "id": row.get("id")}

    def num_rows(self) -> int | None:
        return None if self.params.streaming else len(self.dataset)

    @property
    def image_root(self) -> Path:
        """``image_root`` (relative to the local copy, else to the recipe), else the local copy, else the recipe."""
        local = Path(self.location) if is_local(self.location) else None
        if self.params.image_root:
            root = Path(os.path.expanduser(self.params.image_root))
            if root.is_absolute():
                return root
            return (local if local and local.is_dir() else self.base_dir) / root
        return local if local else self.base_dir

    @property
    def allowed_roots(self) -> list[Path]:
        """Also the Hugging Face caches: hub datasets in imagefolder layout hand out paths to downloaded files."""
        import datasets
        import huggingface_hub

        return [*super().allowed_roots, Path(datasets.config.HF_DATASETS_CACHE),
                Path(huggingface_hub.constants.HF_HUB_CACHE)]

    def fingerprint(self) -> str:
        fp = getattr(self.dataset, "_fingerprint", None) if not self.params.streaming else None
        return hashlib.sha256(f"{self.params.model_dump_json()}|{self.location}|{fp}".encode()).hexdigest()


def load_hf_dataset(params: HfParams, location: str):
    """Load one split from the local copy or the chosen hub(s); images stay encoded, ``where`` applied."""
    if is_local(location):
        try:
            ds = _load_with_datasets(params, location)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{location}: cannot load the local dataset copy (subset={params.subset!r}, "
                              f"split={params.split!r}): {type(e).__name__}: {e}") from e
    elif params.hub == "hf":
        ds = _from_hf(params, location)
    elif params.hub == "modelscope":
        ds = _from_modelscope(params, location)
    else:
        ds = _from_either(params, location)
    ds = keep_images_encoded(ds)
    return _where(ds, params.where) if params.where else ds


def _from_hf(params: HfParams, dataset_id: str):
    try:
        return _load_with_datasets(params, dataset_id)
    except Exception as e:  # noqa: BLE001 - every loader failure is reported the same way, with its cause
        raise SourceError(explain_hub_error(e, "hf", dataset_id)) from e


def _from_modelscope(params: HfParams, dataset_id: str):
    from .modelscope_loader import load_from_modelscope

    ms_id = params.modelscope_id or dataset_id
    try:
        return load_from_modelscope(params, ms_id)
    except Exception as e:  # noqa: BLE001
        raise SourceError(explain_hub_error(e, "modelscope", ms_id)) from e


def _from_either(params: HfParams, dataset_id: str):
    """``hub: auto``: ModelScope first (the tutorials' hub), then Hugging Face; both reasons if both fail."""
    reasons = []
    for load in (_from_modelscope, _from_hf):
        try:
            return load(params, dataset_id)
        except SourceError as e:
            reasons.append(str(e))
    raise SourceError("hub: auto tried both hubs and both failed:\n  " + "\n  ".join(reasons))


def _load_with_datasets(params: HfParams, location: str):
    import datasets

    kwargs = dict(
        name=params.subset, split=params.split, revision=params.revision, streaming=params.streaming,
        data_dir=params.data_dir, data_files=params.data_files,
    )
    token = params.token or os.environ.get("HF_TOKEN")
    if token:
        kwargs["token"] = token  # otherwise datasets falls back to the cached `huggingface-cli login` token
    if params.trust_remote_code:
        kwargs["trust_remote_code"] = True
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return datasets.load_dataset(location, **kwargs)


def _where(ds, where: dict):
    """Keep rows whose columns equal the given value (or one of a list of values); lazy on streaming datasets."""
    allowed = {col: set(v) if isinstance(v, list) else {v} for col, v in where.items()}
    missing = [c for c in allowed if ds.column_names is not None and c not in ds.column_names]
    if missing:
        raise SourceError(f"source.where names column(s) {missing} the dataset lacks (columns: {ds.column_names})")

    columns = list(allowed)

    def keep(*values: list) -> list[bool]:
        return [all(v in allowed[c] for c, v in zip(columns, row, strict=True)) for row in zip(*values, strict=True)]

    return ds.filter(keep, batched=True, input_columns=columns)


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


HUB_PAGES = {"hf": "https://huggingface.co/datasets/{}", "modelscope": "https://modelscope.cn/datasets/{}"}
WAYS_OUT = {
    "hf": "point source.path at a local copy in hub layout, set HF_ENDPOINT to a mirror, or set HF_HUB_OFFLINE=1 "
          "with a filled cache (HF_HOME / HF_DATASETS_CACHE)",
    "modelscope": "point source.path at a local copy in hub layout, set MODELSCOPE_CACHE to a filled cache, or use "
                  "source.hub: hf",
}


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
                                "couldn't reach", "name or service", "failed to resolve", "unreachable")):
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
