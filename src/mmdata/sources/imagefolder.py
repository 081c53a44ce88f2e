"""Image folder source: images with same-name ``.txt`` captions, or a ``metadata.jsonl``/``metadata.csv`` as in
Hugging Face ``imagefolder`` (a ``file_name`` column plus any others).

Rows carry ``image`` (the path relative to the folder) and ``text`` (the caption) or the metadata columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from ..errors import SourceError
from . import Source, SourceParams, files_fingerprint, register_source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageFolderParams(SourceParams):
    path: str
    caption_suffix: str = ".txt"


@register_source("imagefolder")
class ImageFolderSource(Source):
    Params = ImageFolderParams
    default_fields = {"image": "image", "answer": "text", "id": "file_name"}

    def __init__(self, params: ImageFolderParams, base_dir: Path):
        super().__init__(params, base_dir)
        self.root = self.resolve(params.path)
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: image folder not found (source.path is relative to the recipe's folder)")
        self.metadata = next((self.root / n for n in ("metadata.jsonl", "metadata.csv") if (self.root / n).is_file()), None)

    @property
    def image_root(self) -> Path:
        return self.root

    def _images(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def rows(self) -> Iterator[dict]:
        if self.metadata is not None:
            yield from self._metadata_rows()
            return
        for image in self._images():
            rel = image.relative_to(self.root).as_posix()
            caption = image.with_suffix(self.params.caption_suffix)
            text = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
            yield {"file_name": rel, "image": rel, "text": text}

    def _metadata_rows(self) -> Iterator[dict]:
        if self.metadata.suffix == ".csv":
            records = (r for chunk in pd.read_csv(self.metadata, dtype=str, keep_default_na=False, chunksize=10_000)
                       for r in chunk.to_dict(orient="records"))
        else:
            records = (json.loads(line) for line in open(self.metadata, encoding="utf-8") if line.strip())
        for record in records:
            if "file_name" not in record:
                raise SourceError(f"{self.metadata}: every row needs a file_name column (as in HF imagefolder)")
            yield {**record, "image": record["file_name"]}

    def num_rows(self) -> int:
        return sum(1 for _ in self.rows())

    def fingerprint(self) -> str:
        files = [self.metadata] if self.metadata else self._images()
        return files_fingerprint(files) + self.params.model_dump_json()
