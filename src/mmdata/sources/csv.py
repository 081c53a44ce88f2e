"""CSV source: any column names (the tutorial's ``image_path,text`` included), read in chunks with pandas.

Encodings: ``auto`` tries UTF-8 (with or without BOM) and falls back to GB18030, the usual encoding of Chinese CSVs
saved by Excel. Relative image paths resolve against the CSV's folder unless ``image_root`` says otherwise.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from pydantic import field_validator

from ..errors import SourceError
from . import Source, SourceParams, files_fingerprint, register_source

CHUNK_ROWS = 10_000


class CsvParams(SourceParams):
    path: str
    encoding: str = "auto"
    delimiter: str = ","
    image_root: str | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        if value != "auto":
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}: use auto, utf-8, gb18030, latin-1 ...") from None
        return value


@register_source("csv")
class CsvSource(Source):
    Params = CsvParams

    def __init__(self, params: CsvParams, base_dir: Path):
        super().__init__(params, base_dir)
        self.path = self.resolve(params.path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: CSV file not found (source.path is relative to the recipe's folder)")
        self._encoding: str | None = None
        self._num_rows: int | None = None

    @property
    def encoding(self) -> str:
        if self._encoding is None:
            self._encoding = self.params.encoding if self.params.encoding != "auto" else _detect_encoding(self.path)
        return self._encoding

    @property
    def image_root(self) -> Path:
        return self.resolve(self.params.image_root) if self.params.image_root else self.path.parent

    def _chunks(self) -> Iterator[pd.DataFrame]:
        try:
            yield from pd.read_csv(
                self.path, encoding=self.encoding, sep=self.params.delimiter, dtype=str,
                keep_default_na=False, chunksize=CHUNK_ROWS,
            )
        except pd.errors.EmptyDataError:
            return
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
            raise SourceError(
                f"{self.path}: cannot parse as CSV with encoding {self.encoding!r}: {e}. "
                "Fix the row it names, or set source.encoding / source.delimiter"
            ) from None

    def rows(self) -> Iterator[dict]:
        for chunk in self._chunks():
            if not isinstance(chunk.index, pd.RangeIndex):
                # pandas reads a first data row longer than the header as "first column is the index" and shifts
                # every column of every row by one: refuse rather than build shifted data.
                raise SourceError(
                    f"{self.path}: the first data row has more fields than the header ({', '.join(chunk.columns)}); "
                    "quote the field that contains the delimiter, or set source.delimiter"
                )
            yield from chunk.to_dict(orient="records")

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(len(chunk) for chunk in self._chunks())
        return self._num_rows

    def fingerprint(self) -> str:
        return files_fingerprint([self.path]) + self.params.model_dump_json()


def _detect_encoding(path: Path) -> str:
    """utf-8-sig if the whole file decodes as UTF-8 (BOM optional), else gb18030 if that decodes, else an error."""
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            with open(path, encoding=encoding) as f:
                while f.read(1 << 20):
                    pass
            return encoding
        except UnicodeDecodeError:
            continue
    raise SourceError(f"{path}: neither UTF-8 nor GB18030; set source.encoding to the file's encoding")
