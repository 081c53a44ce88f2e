"""Image folder source, laid out as Hugging Face ``imagefolder`` expects: images with same-name ``.txt`` captions,
class subfolders, split folders, or a ``metadata.jsonl``/``metadata.csv`` (a ``file_name`` column plus any others).

Rows carry ``file_name`` and ``image`` (the path relative to the folder), ``text`` (the caption, ``""`` without
one) or the metadata columns, and these, following ``datasets``' folder-based builder:

- ``label``: the name of the image's parent folder (``cat/1.jpg`` -> ``cat``), added only when there is no metadata
  file, every image lies at the same depth and there is more than one such folder. HF stores the label as a
  ``ClassLabel`` integer; a fine-tuning answer wants the name, so the row holds the name. Without caption files the
  default answer is then the label, so ``cat/``, ``dog/`` builds a classification set with just a ``prompt``.
- ``__split__``: with split folders at the top (``train/``, ``validation/``, ``test/`` and HF's other names for them:
  ``training``, ``valid``, ``val``, ``dev``, ``testing``, ``eval``, ``evaluation``), each row's split, in the order
  train, validation, test; ``split:`` picks some of them. A build with ``split: {from_source: true}`` keeps them.
  Images beside the split folders belong to no split: reading every split, they become rejects that say so (HF
  ignores them silently).

Every file the folder *contains* is data: a caption or metadata file that is a symlink out of the folder (and out of
``source.allowed_roots``) is not read. A bad caption (outside, not UTF-8, over 1 MiB, not a regular file) makes that
row a reject; a metadata file outside is a :class:`SourceError`; a bad metadata line is that line's reject.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import field_validator

from ..errors import SampleError, SourceError
from ..normalize import contained_path
from . import Source, SourceParams, files_fingerprint, register_source
from .csv import csv_encoding, known_encoding

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
MAX_CAPTION_BYTES = 1 << 20  # a caption is a paragraph; a bigger file is a mistake (or a disk image named a.txt)
# datasets.data_files.SPLIT_KEYWORDS: folder name -> split name
SPLIT_FOLDERS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
                 "evaluation": "test"}
SPLIT_ORDER = ("train", "validation", "test")


class ImageFolderParams(SourceParams):
    path: str
    caption_suffix: str = ".txt"
    split: str | list[str] | None = None  # split folders to read (train, validation, test); default: all of them
    encoding: str = "auto"  # of metadata.csv, as the csv source reads it

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return known_encoding(value)


@dataclass
class _Part:
    """One folder the rows come from: the whole tree, or one split folder; ``metadata`` if it has a metadata file."""

    split: str | None
    folder: Path
    metadata: Path | None


@register_source("imagefolder")
class ImageFolderSource(Source):
    Params = ImageFolderParams

    def __init__(self, params: ImageFolderParams, base_dir: Path):
        super().__init__(params, base_dir)
        self.root = self.resolve(params.path)
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: image folder not found (source.path is relative to the recipe's folder)")
        self.split_folders = self._split_folders()
        wanted = [params.split] if isinstance(params.split, str) else params.split
        unknown = sorted(set(wanted or []) - set(SPLIT_ORDER))
        if unknown:
            raise SourceError(f"source.split {unknown} is not a split name: use {', '.join(SPLIT_ORDER)}")
        if wanted and not self.split_folders:
            raise SourceError(f"source.split is {params.split!r} but {self.root} has no split folders "
                              "(train/, validation/, test/); leave source.split unset")
        self.metadata = self._metadata_file(self.root)
        if self.metadata is not None or not self.split_folders:
            self.parts = [_Part(None, self.root, self.metadata)]
        else:
            self.parts = [_Part(split, folder, self._metadata_file(folder)) for split, folder in self.split_folders
                          if not wanted or split in wanted]
        self._listing: dict[int, list[Path]] | None = None

    def _split_folders(self) -> list[tuple[str, Path]]:
        found = [(SPLIT_FOLDERS[p.name.lower()], p) for p in self.root.iterdir()
                 if p.name.lower() in SPLIT_FOLDERS and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=lambda sp: (SPLIT_ORDER.index(sp[0]), sp[1].name))

    def _metadata_file(self, folder: Path) -> Path | None:
        for name in METADATA_NAMES:
            if os.path.lexists(folder / name):
                return self.discovered(folder / name, self.root, "metadata file")
        return None

    @property
    def image_root(self) -> Path:
        return self.root

    # ------------------------------------------------------------------------------------------- the layout

    def _images(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    @property
    def listing(self) -> dict[int, list[Path]]:
        """Images of each part without a metadata file, by part index (one directory walk, kept)."""
        if self._listing is None:
            self._listing = {i: self._images(part.folder) for i, part in enumerate(self.parts) if not part.metadata}
        return self._listing

    def _strays(self) -> list[Path]:
        """Images beside the split folders: in no split (reported when every split is read, not when ``split:``
        picks some: then they are no more part of the rows than the splits left out)."""
        if self.parts[0].split is None or self.params.split is not None:
            return []
        inside = {folder for _, folder in self.split_folders}
        return sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                      and not any(parent in inside for parent in p.parents))

    @property
    def labelled(self) -> bool:
        """HF's rule: no metadata anywhere, more than one parent-folder name, every image at the same depth."""
        if any(part.metadata for part in self.parts):
            return False
        images = [p for paths in self.listing.values() for p in paths]
        labels = {p.parent.name for p in images}
        depths = {len(p.relative_to(self.root).parts) for p in images}
        return len(labels) > 1 and len(depths) == 1

    @property
    def default_fields(self) -> dict[str, str]:
        has_captions = any(p.with_suffix(self.params.caption_suffix).exists()
                           for paths in self.listing.values() for p in paths)
        answer = "label" if self.labelled and not has_captions else "text"
        return {"image": "image", "answer": answer, "id": "file_name"}

    # ------------------------------------------------------------------------------------------- rows

    def rows(self) -> Iterator[dict]:
        labelled = self.labelled
        for i, part in enumerate(self.parts):
            tag = {"__split__": part.split} if part.split else {}
            if part.metadata is not None:
                yield from ({**row, **tag} for row in self._metadata_rows(part))
                continue
            for image in self.listing[i]:
                rel = image.relative_to(self.root).as_posix()
                row = {"file_name": rel, "image": rel, **({"label": image.parent.name} if labelled else {}), **tag}
                try:
                    row["text"] = self._caption(image)
                except SampleError as e:
                    row.update({"__error__": str(e), "__reason__": e.kind})
                yield row
        for image in self._strays():
            rel = image.relative_to(self.root).as_posix()
            yield {"file_name": rel, "image": rel, "__reason__": "image outside the split folders",
                   "__error__": f"{rel} lies beside the split folders ({', '.join(f.name for _, f in self.split_folders)}"
                                "), so it belongs to no split: move it into one, or point source.path at its folder"}

    def _caption(self, image: Path) -> str:
        """The same-name caption file's text, ``""`` if there is none; a :class:`SampleError` if it cannot be used."""
        caption = image.with_suffix(self.params.caption_suffix)
        if not os.path.lexists(caption):
            return ""
        real = contained_path(caption, self.allowed_roots, what="caption file")
        name = caption.relative_to(self.root).as_posix()
        try:
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                raise SampleError(f"caption file {name} is not a regular file", kind="caption unreadable")
            if st.st_size > MAX_CAPTION_BYTES:
                raise SampleError(f"caption file {name} is {st.st_size} bytes, more than the "
                                  f"{MAX_CAPTION_BYTES >> 20} MiB a caption can be", kind="caption unreadable")
            data = real.read_bytes()
        except OSError as e:
            raise SampleError(f"cannot read caption file {name}: {e.strerror}", kind="caption unreadable") from None
        try:
            return data.decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise SampleError(f"caption file {name} is not UTF-8 text (byte {e.start}: {e.reason}); re-save it as "
                              "UTF-8", kind="caption unreadable") from None

    def _metadata_rows(self, part: _Part) -> Iterator[dict]:
        """The metadata file's rows, ``image`` made relative to the folder; a bad line is that line's reject."""
        metadata = part.metadata
        prefix = "" if part.folder == self.root else part.folder.relative_to(self.root).as_posix() + "/"
        split_names = {folder.name: split for split, folder in self.split_folders} if part.split is None else {}
        for line, record in _read_metadata(metadata, self.params.encoding):
            where = f"{metadata.name} line {line}"
            if not isinstance(record, dict) or "__error__" in record:
                error = record["__error__"] if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
                yield {"__error__": f"{where}: {error}", "__reason__": "bad metadata row"}
                continue
            name = record.get("file_name")
            if not isinstance(name, str) or not name:
                what = (f"file_name is {name!r}, not the image's path" if name not in (None, "") else
                        "no file_name (every metadata row names its image in a file_name column, as in HF imagefolder)")
                yield {**record, "__error__": f"{where}: {what}", "__reason__": "bad metadata row"}
                continue
            image = prefix + record["file_name"]
            split = split_names.get(image.split("/", 1)[0])
            yield {**record, "image": image, **({"__split__": split} if split else {})}

    def num_rows(self) -> int:
        count = len(self._strays())
        for i, part in enumerate(self.parts):
            metadata = part.metadata
            count += sum(1 for _ in _read_metadata(metadata, self.params.encoding)) if metadata else len(self.listing[i])
        return count

    def fingerprint(self) -> str:
        files = [part.metadata for part in self.parts if part.metadata]
        for paths in self.listing.values():
            for image in paths:
                caption = image.with_suffix(self.params.caption_suffix)
                files += [image, caption] if caption.is_file() else [image]
        return files_fingerprint(files) + self.params.model_dump_json()


def _read_metadata(path: Path, encoding: str = "auto") -> Iterator[tuple[int, object]]:
    """``(line number, record)`` of a metadata.csv / metadata.jsonl; an unparsable line is an ``__error__``.

    The CSV is read with the csv source's encoding rules (a Western or GB18030 file works, a damaged UTF-8 one is
    named) and the ``csv`` module, whose line count stays right across captions that span lines."""
    if path.suffix == ".csv":
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # the default 128 KiB refuses long captions
        try:
            with open(path, encoding=csv_encoding(path, encoding), newline="") as f:
                reader = csv.reader(f)
                header = [h.lstrip("\ufeff") for h in next(reader, [])]
                start = reader.line_num + 1
                for values in reader:
                    if len(values) > len(header):
                        yield start, {"__error__": f"{len(values)} fields but the header has {len(header)}: quote "
                                                   "the field that holds a comma"}
                    elif values:  # a blank line is no row; ",," is one, and gets its "no file_name" reject
                        yield start, dict(zip(header, values + [""] * (len(header) - len(values)), strict=True))
                    start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: cannot parse the metadata CSV: {e}") from None
        return
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw.removeprefix(b"\xef\xbb\xbf") if line == 1 else raw)
            except UnicodeDecodeError as e:
                yield line, {"__error__": f"not UTF-8 (byte {e.start}: {e.reason}); re-save the file as UTF-8"}
            except (ValueError, RecursionError) as e:
                yield line, {"__error__": f"invalid JSON ({str(e)[:200]})"}
