"""A metadata table joined on a file-name column to images in a folder or in tar / tar.zst shards (MedTrinity full).

Some hub datasets ship captions and images apart: MedTrinity-25M's ``25M_full`` config is parquet metadata
(``file_name``, ``caption``, ``source``) and the images are the ``25M_accessible`` tar.zst shards or the original
datasets. The metadata is read with the ``hf`` source (so ``path``, ``subset``, ``split``, ``hub``, ``where`` all
apply: ``where: {source: [...]}`` keeps some origins); ``image_root`` is where the images are.

- **Folder** of images: rows come in metadata order, the image is ``image_root / file_name`` (which must stay
  inside the folder).
- **Shards** (one ``.tar``/``.tar.zst``/``.tar.gz`` file, or a folder of them): a zstd stream cannot be seeked, so
  the shards are streamed once each, in sorted order, never extracted to disk; rows come in shard order, each
  member looked up in an index ``file_name -> metadata row`` built first from the metadata's file-name column
  (about 100 bytes per metadata row: filter with ``where`` for a part of a very large table). Only the member being
  read is in memory. Members the metadata does not list are skipped.

A metadata row whose image is in no shard (users report listed files missing from shards), or not in the folder, is
still a row: ``{"__error__": ...}``, so the build sends it to ``rejects.jsonl`` with reason ``image missing``.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import SourceError
from . import Source, files_fingerprint, register_source
from .hf import HfParams, HfSource

SHARD_SUFFIXES = (".tar", ".tar.zst", ".tar.zstd", ".tar.gz", ".tgz")


class ImageJoinParams(HfParams):
    image_root: str
    file_column: str = "file_name"
    image_column: str = "image"


@register_source("image_join")
class ImageJoinSource(Source):
    Params = ImageJoinParams

    def __init__(self, params: ImageJoinParams, base_dir: Path):
        super().__init__(params, base_dir)
        self.metadata = HfSource(params, base_dir)
        self.root = self.metadata.image_root
        if not self.root.exists():
            raise SourceError(f"source.image_root {self.root} does not exist: point it at the folder of images, a "
                              "tar/tar.zst shard or a folder of shards")
        self.shards = [self.root] if self.root.is_file() else sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))

    def num_rows(self) -> int | None:
        return self.metadata.num_rows()

    @property
    def image_root(self) -> Path:
        """The image folder: folder rows carry ``file_name`` relative to it (the build keeps reads inside it)."""
        return self.root

    def rows(self) -> Iterator[dict]:
        yield from (self._rows_from_shards() if self.shards else self._rows_from_folder())

    def _rows_from_folder(self) -> Iterator[dict]:
        column, target = self.params.file_column, self.params.image_column
        for row in self.metadata.rows():
            if (self.root / str(row.get(column))).is_file():
                yield {**row, target: str(row.get(column))}
            else:
                yield _missing(row, f"image {row.get(column)!r} not found in {self.root}")

    def _rows_from_shards(self) -> Iterator[dict]:
        if self.params.streaming:
            raise SourceError("image_root holds tar shards: the metadata needs random access, so set streaming: false")
        table = self.metadata.dataset
        index: dict[str, list[int]] = {}
        position = 0
        for batch in table.select_columns([self.params.file_column]).iter(batch_size=10_000):
            for name in batch[self.params.file_column]:
                index.setdefault(str(name), []).append(position)
                position += 1
        found = bytearray(position)
        for shard in self.shards:
            for name, member in iter_tar_members(shard):
                hits = index.get(name) or index.get(name.rsplit("/", 1)[-1])
                if not hits or found[hits[0]]:
                    continue
                data = member.read()
                for i in hits:
                    found[i] = 1
                    yield {**table[i], self.params.image_column: data}
        for i, flag in enumerate(found):
            if not flag:
                row = table[i]
                yield _missing(row, f"image {row.get(self.params.file_column)!r} is listed in the metadata but is in "
                                    f"no shard of {self.root}")

    def fingerprint(self) -> str:
        files = files_fingerprint(self.shards) if self.shards else str(self.root)
        return hashlib.sha256(f"{self.metadata.fingerprint()}|{files}|{self.params.model_dump_json()}".encode()
                              ).hexdigest()


def _missing(row: dict, message: str) -> dict:
    """The metadata row, kept so the reject names its id, marked as an error."""
    return {**row, "__error__": message, "__reason__": "image missing"}


def iter_tar_members(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """``(name, file object)`` for each regular member, streamed (``r|``): plain tar, tar.gz or tar.zst.

    A member's file object is valid until the next one is requested; names lose a leading ``./``.
    """
    with open(path, "rb") as raw:
        mode, stream, errors = "r|", raw, (tarfile.TarError, OSError, EOFError)
        if path.name.endswith((".zst", ".zstd")):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            errors += (zstandard.ZstdError,)
        elif path.name.endswith((".gz", ".tgz")):
            mode = "r|gz"
        try:
            with tarfile.open(fileobj=stream, mode=mode) as archive:
                for member in archive:
                    if member.isfile():
                        yield member.name.removeprefix("./"), archive.extractfile(member)
        except errors as e:
            raise SourceError(f"{path}: cannot read the image shard: {e}") from None
