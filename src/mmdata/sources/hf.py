"""Any Hugging Face dataset through ``datasets.load_dataset``: a hub id, a local folder in hub layout, or files.

Image columns are cast to ``Image(decode=False)`` so rows carry the original encoded bytes: nothing is decoded just
to be copied. ``streaming: true`` reads without a full download (row count then unknown).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import SourceError
from . import Source, SourceParams, register_source


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


def is_local(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


@register_source("hf")
class HfSource(Source):
    Params = HfParams

    def __init__(self, params: HfParams, base_dir: Path):
        super().__init__(params, base_dir)
        self._dataset = None

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
        yield from self.dataset

    def num_rows(self) -> int | None:
        return None if self.params.streaming else len(self.dataset)

    @property
    def image_root(self) -> Path:
        return Path(self.location) if is_local(self.location) else self.base_dir

    def fingerprint(self) -> str:
        fp = getattr(self.dataset, "_fingerprint", None) if not self.params.streaming else None
        return hashlib.sha256(f"{self.params.model_dump_json()}|{self.location}|{fp}".encode()).hexdigest()


def load_hf_dataset(params: HfParams, location: str):
    """``load_dataset`` with image columns left encoded; hub failures become one clear :class:`SourceError`."""
    import datasets

    kwargs = dict(
        name=params.subset, split=params.split, revision=params.revision, streaming=params.streaming,
        data_dir=params.data_dir, data_files=params.data_files,
    )
    token = params.token or os.environ.get("HF_TOKEN")
    if token:
        kwargs["token"] = token
    if params.trust_remote_code:
        kwargs["trust_remote_code"] = True
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        ds = datasets.load_dataset(location, **kwargs)
    except Exception as e:  # noqa: BLE001 - every loader failure is reported the same way, with its cause
        raise SourceError(explain_hub_error(e, "hf", location)) from e
    return keep_images_encoded(ds)


def keep_images_encoded(ds):
    """Cast every ``Image`` feature (also inside lists) to ``decode=False``: rows then hold ``{bytes, path}``."""
    import datasets

    features = getattr(ds, "features", None)
    if not features:
        return ds
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (list, datasets.Sequence)):
            inner = feature[0] if isinstance(feature, list) else feature.feature
            if isinstance(inner, datasets.Image) and inner.decode:
                ds = ds.cast_column(name, [datasets.Image(decode=False)] if isinstance(feature, list)
                                    else datasets.Sequence(datasets.Image(decode=False)))
    return ds


def explain_hub_error(error: Exception, hub: str, dataset: str) -> str:
    """One message naming the hub, the dataset, what went wrong and the way out."""
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if any(s in lowered for s in ("gated", "401", "403", "unauthorized", "forbidden", "access to dataset")):
        return (
            f"{hub}: dataset {dataset!r} is gated or needs authentication. Accept its terms on the dataset page "
            f"(https://huggingface.co/datasets/{dataset}) and pass a token (set HF_TOKEN, run `huggingface-cli login`, "
            f"or set source.token). Cause: {text}"
        )
    if any(s in lowered for s in ("connection", "offline", "resolve", "timed out", "max retries", "network",
                                  "couldn't reach", "name or service")):
        return (
            f"{hub}: cannot reach the hub for dataset {dataset!r}. Ways out: point source.path at a local copy in hub "
            "layout, set HF_ENDPOINT to a mirror, or set HF_HUB_OFFLINE=1 with a filled cache. Cause: " + text
        )
    return f"{hub}: cannot load dataset {dataset!r}: {text}"
