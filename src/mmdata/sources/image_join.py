"""A metadata table joined on a file-name column to images in a folder or in tar / tar.zst shards (MedTrinity full).

Some hub datasets ship captions and images apart: MedTrinity-25M's ``25M_full`` config is parquet metadata
(``file_name``, ``caption``, ``source``) and the images are the ``25M_accessible`` tar.zst shards or the original
datasets. The metadata is read with the ``hf`` source (so ``path``, ``subset``, ``split``, ``hub``, ``where`` all
apply: ``where: {source: [...]}`` keeps some origins); ``image_root`` is where the images are. Like every path in a
recipe, a relative ``image_root`` is relative to the recipe file's folder (a ``--set`` override: to the current
directory), not to the metadata's copy: the images are usually extracted somewhere else.

- **Folder** of images: rows come in metadata order, the image is ``image_root / file_name`` (which must stay
  inside the folder).
- **Shards** (one ``.tar``/``.tar.zst``/``.tar.gz`` file, or a folder of them): a zstd stream cannot be seeked, so
  the shards are streamed once each, in sorted order, never extracted to disk; rows come in shard order, each
  member looked up in an index ``file_name -> metadata row`` built first from the metadata's file-name column
  (about 100 bytes per metadata row: filter with ``where`` for a part of a very large table). Only the member being
  read is in memory. Members the metadata does not list are skipped.

A metadata row whose image is in no shard (users report listed files missing from shards), or not in the folder, is
still a row: ``{"__error__": ...}``, so the build sends it to ``rejects.jsonl`` with reason ``image missing``. A
truncated or corrupt shard does not stop the build: the members read before the damage are used, and the rows whose
images it held become those rejects, with a message that names the shard and says to download it again.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SourceError
from . import Source, files_fingerprint, register_source
from .hf import HfParams, HfSource

SHARD_SUFFIXES = (".tar", ".tar.zst", ".tar.zstd", ".tar.gz", ".tgz")


class ImageJoinParams(HfParams):
    image_root: str | None = None
    file_column: str = "file_name"
    image_column: str = "image"


@register_source("image_join")
class ImageJoinSource(Source):
    Params = ImageJoinParams

    def __init__(self, params: ImageJoinParams, base_dir: Path):
        super().__init__(params, base_dir)
        if not params.image_root:
            raise SourceError("source.image_root is needed: the folder of images, one .tar/.tar.zst shard or a folder "
                              "of shards (e.g. --set source.image_root=/data/25M_accessible)")
        self.metadata = HfSource(params, base_dir)
        self.root = self.resolve(params.image_root)
        if not self.root.exists():
            raise SourceError(f"source.image_root {self.root} does not exist: point it at the folder of images, a "
                              "tar/tar.zst shard or a folder of shards (a relative path is relative to the recipe's "
                              "folder)")
        self.shards = [self.root] if self.root.is_file() else [
            self.discovered(p, self.root, "image shard") for p in sorted(self.root.rglob("*"))
            if p.is_file() and p.name.endswith(SHARD_SUFFIXES)]

    def num_rows(self) -> int | None:
        return self.metadata.num_rows()

    def skipped(self, rows_yielded: int | None = None) -> dict[str, int]:
        """The metadata's ``where`` drops. Shard rows come in shard order, not metadata order, so there the dropped
        rows are counted once the whole source is read (they never enter the join)."""
        if self.shards and rows_yielded is not None and rows_yielded < (self.num_rows() or 0):
            return {"where": 0} if self.params.where else {}
        return self.metadata.skipped(rows_yielded)

    def refresh(self) -> None:
        self.metadata.refresh()

    @property
    def image_root(self) -> Path:
        """The image folder: folder rows carry ``file_name`` relative to it (the build keeps reads inside it)."""
        return self.root

    def rows(self) -> Iterator[dict]:
        yield from (self._rows_from_shards() if self.shards else self._rows_from_folder())

    def _rows_from_folder(self) -> Iterator[dict]:
        column, target = self.params.file_column, self.params.image_column
        for row in self.metadata.rows():
            try:
                found = (self.root / str(row.get(column))).is_file()
            except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: no such file
                found = False
            if found:
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

        def wanted(name: str) -> list[int] | None:
            hits = index.get(name) or index.get(name.rsplit("/", 1)[-1])
            return hits if hits and not found[hits[0]] else None

        damaged: list[str] = []
        for shard in self.shards:
            try:
                for hits, data in iter_tar_members(shard, wanted):
                    for i in hits:
                        found[i] = 1
                        yield self._row(table, i, {self.params.image_column: data})
            except ShardError as e:
                damaged.append(str(e))
        note = f" (damaged: {'; '.join(damaged)})" if damaged else ""
        for i, flag in enumerate(found):
            if not flag:
                name = table[i].get(self.params.file_column)
                yield _missing(self._row(table, i), f"image {name!r} is listed in the metadata but is in no readable "
                                                     f"shard of {self.root}{note}")

    def _row(self, table, i: int, extra: dict | None = None) -> dict:
        """Metadata row ``i`` as the ``hf`` source yields it (label names, ``first_item``, ``__split__``)."""
        return {**self.metadata.convert(table[i], self.metadata.part_of(i)), **(extra or {})}

    def fingerprint(self) -> str:
        files = files_fingerprint(self.shards) if self.shards else str(self.root)
        return hashlib.sha256(f"{self.metadata.fingerprint()}|{files}|{self.params.model_dump_json()}".encode()
                              ).hexdigest()


def _missing(row: dict, message: str) -> dict:
    """The metadata row, kept so the reject names its id, marked as an error."""
    return {**row, "__error__": message, "__reason__": "image missing"}


class ShardError(SourceError):
    """A shard that cannot be read to its end: truncated (an interrupted download) or corrupt."""


def iter_tar_members(path: Path, wanted) -> Iterator[tuple[object, bytes]]:
    """``(wanted(name), bytes)`` for each regular member whose ``wanted(name)`` is truthy, streamed (``r|``): plain
    tar, tar.gz or tar.zst. Names lose a leading ``./``; other members are skipped unread (as far as a stream allows).

    Members are read here, inside the error handling: a truncated shard fails while a member is read, and that must
    become one :class:`ShardError` naming the shard, not a raw ``tarfile.ReadError`` (or "empty file", which is what
    ``tarfile`` says when a zstd stream stops before its first block).
    """
    read = 0
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
                    read += 1
                    hits = wanted(member.name.removeprefix("./")) if member.isfile() else None
                    if hits:
                        yield hits, archive.extractfile(member).read()
        except errors as e:
            size = path.stat().st_size
            state = ("is empty (0 bytes)" if size == 0 else
                     f"is truncated or corrupt ({size} bytes; {read} member(s) read before the error: "
                     f"{type(e).__name__}: {e})")
            raise ShardError(f"image shard {path} {state}: download it again (a .tar.zst can be checked with "
                             "`zstd -t`)") from None
