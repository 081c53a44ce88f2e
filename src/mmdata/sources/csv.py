"""CSV source: any column names (the tutorial's ``image_path,text`` included), read in chunks with pandas.

Encodings: ``auto`` reads a UTF-16 file by its BOM, else tries UTF-8 (with or without BOM), else GB18030 (the usual
encoding of Chinese CSVs saved by Excel) when the bytes look Chinese; a Western file (cp1252) is refused with the fix
rather than misread (see :func:`_detect_encoding`); ``encoding: cp1252`` reads it. A UTF-8 file with a damaged byte
is refused naming that byte, never read as GB18030 or a code page. CRLF line ends are fine. Relative image paths
resolve against the CSV's folder unless ``image_root`` says otherwise; ``imgs\\a.jpg`` written on Windows works (see
:func:`mmdata.normalize.record_path`).

A file with no data rows, or a header that repeats a column name, is refused with the file named: pandas would
otherwise build nothing and exit 0, or rename the second ``text`` to ``text.1`` and build from the wrong column.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import Counter
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
        return known_encoding(value)


def known_encoding(value: str) -> str:
    """A ``source.encoding`` value: ``auto`` or a codec Python knows."""
    if value != "auto":
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}: use auto, utf-8, gb18030, cp1252, latin-1 ...") from None
    return value


def csv_encoding(path: Path, declared: str) -> str:
    """The encoding to read ``path`` with: detected for ``auto`` (:func:`_detect_encoding`), else the declared one
    unless the file's UTF-8 byte-order mark contradicts it."""
    if declared == "auto":
        return _detect_encoding(path)
    _refuse_a_utf8_bom_read_as(path, declared)
    return declared


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
        self._header_checked = False

    @property
    def encoding(self) -> str:
        if self._encoding is None:
            self._encoding = csv_encoding(self.path, self.params.encoding)
        return self._encoding

    @property
    def image_root(self) -> Path:
        return self.resolve(self.params.image_root) if self.params.image_root else self.path.parent

    def _check_header(self) -> None:
        """Refuse an empty file and a header with repeated names, before pandas hides either."""
        if self._header_checked or len(self.params.delimiter) != 1:  # a regex delimiter: pandas' own parsing only
            return
        try:
            with open(self.path, encoding=self.encoding, newline="") as f:
                header = next(csv.reader(f, delimiter=self.params.delimiter), [])
        except (UnicodeDecodeError, csv.Error) as e:
            raise SourceError(f"{self.path}: cannot read the header with encoding {self.encoding!r}: {e}. "
                              "Set source.encoding / source.delimiter") from None
        header = [h.lstrip("\ufeff") for h in header]
        if not any(h.strip() for h in header):
            raise SourceError(f"{self.path}: the file is empty (no header, no data rows): nothing to build")
        if header[0].lower().startswith("sep=") and not any(h.strip() for h in header[1:]):
            raise SourceError(f"{self.path}: the first line {','.join(header)!r} is Excel's separator hint, not the "
                              "header; delete that line (or re-save the file without it)")
        if len(header) == 1:  # one column whose name holds another separator: the file is not comma-separated
            found = [(name, sep) for name, sep in (("semicolon", ";"), ("tab", "\t"), ("|", "|"))
                     if sep in header[0] and sep != self.params.delimiter]
            if found:
                name, sep = found[0]
                raise SourceError(f"{self.path}: the header is one column {header[0]!r}: the file looks {name}-"
                                  f"separated; set source.delimiter: {sep!r} (Excel writes ';' where the decimal "
                                  "mark is a comma, and tabs as 'Unicode text')")
        repeated = [name for name, n in Counter(header).items() if n > 1]
        if repeated:
            raise SourceError(
                f"{self.path}: the header repeats column name(s) {', '.join(map(repr, repeated))} "
                f"(columns: {', '.join(map(repr, header))}); rename them so every column has its own name (pandas would "
                "silently rename the second one)")
        self._header_checked = True

    def _chunks(self) -> Iterator[pd.DataFrame]:
        self._check_header()
        rows = 0
        try:
            for chunk in pd.read_csv(
                self.path, encoding=self.encoding, sep=self.params.delimiter, dtype=str,
                keep_default_na=False, chunksize=CHUNK_ROWS,
            ):
                rows += len(chunk)
                yield chunk
        except pd.errors.EmptyDataError:
            pass
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
            raise SourceError(
                f"{self.path}: cannot parse as CSV with encoding {self.encoding!r}: {str(e).strip()}. "
                "Fix the row it names, or set source.encoding / source.delimiter"
            ) from None
        if rows == 0:
            raise SourceError(f"{self.path}: no data rows (only the header line): nothing to build")

    def rows(self) -> Iterator[dict]:
        for chunk in self._chunks():
            if not isinstance(chunk.index, pd.RangeIndex):
                # pandas reads a first data row longer than the header as "first column is the index" and shifts
                # every column of every row by one: refuse rather than build shifted data.
                raise SourceError(
                    f"{self.path}: the first data row has more fields than the header ({', '.join(chunk.columns)}); "
                    "quote the field that contains the delimiter, or set source.delimiter"
                )
            name = self.path.name
            for number, row in zip(chunk.index, chunk.to_dict(orient="records"), strict=True):
                # where a reject's row is: data rows count from 1 (the header is row 0), as a spreadsheet's
                # line numbers do less one, whatever quoted fields span lines
                yield {**row, "__where__": f"{name} row {number + 1}"}

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(len(chunk) for chunk in self._chunks())
        return self._num_rows

    def fingerprint(self) -> str:
        return files_fingerprint([self.path]) + self.params.model_dump_json()


def _detect_encoding(path: Path) -> str:
    """UTF-16 by BOM; utf-8-sig if the whole file decodes as UTF-8 (BOM optional); else GB18030 if it looks Chinese.

    GB18030 decodes most byte strings, so decoding alone would take a Western file for Chinese and write mojibake
    ("résumé" decodes). The texts differ in shape: Chinese is runs of two (or four) non-ASCII bytes, a single-byte
    code page has lone accented letters between ASCII ones (``caf\xe9,``). A file whose lone non-ASCII bytes
    outnumber the longer runs is refused with the fix (``source.encoding: cp1252``, Western Excel's code page), not
    guessed: cp1252, cp1250 and latin-1 decode the same bytes to different letters.
    """
    with open(path, "rb") as f:
        head = f.read(3)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    if _decodes(path, "utf-8-sig"):
        return "utf-8-sig"
    lone = runs = utf8_runs = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            for run in re.findall(rb"[\x80-\xff]+", block):
                lone, runs = (lone + 1, runs) if len(run) == 1 else (lone, runs + 1)
                utf8_runs += _is_utf8(run)
    if head == codecs.BOM_UTF8 or utf8_runs > (lone + runs) / 2:
        # UTF-8 with a few damaged bytes: any other decoding would turn all its good text into mojibake
        offset, line = _first_bad_utf8(path)
        raise SourceError(f"{path}: UTF-8 text, but not valid UTF-8 at byte {offset} (line {line}); fix or remove "
                          "the damaged character there, or re-save the file as UTF-8")
    if lone <= runs and _decodes(path, "gb18030"):
        return "gb18030"
    single = (" (its non-ASCII bytes stand alone, as in a single-byte code page: Western Excel saves cp1252, so "
              "probably source.encoding: cp1252)" if lone > runs else "")
    raise SourceError(f"{path}: neither UTF-8 nor GB18030; set source.encoding to the file's encoding{single}, or "
                      "re-save the file as UTF-8")


def _refuse_a_utf8_bom_read_as(path: Path, encoding: str) -> None:
    """A file that starts with UTF-8's byte-order mark is UTF-8: read as a code page, every non-ASCII letter and
    the first column's name would be mojibake (``ï»¿image``, so a mapped column goes missing)."""
    if codecs.lookup(encoding).name.startswith("utf"):
        return
    with open(path, "rb") as f:
        if f.read(3) == codecs.BOM_UTF8:
            raise SourceError(f"{path}: starts with a UTF-8 byte-order mark, so it is UTF-8, but source.encoding is "
                              f"{encoding!r}; remove source.encoding (a damaged byte is then named)")


def _is_utf8(run: bytes) -> bool:
    try:
        run.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _first_bad_utf8(path: Path) -> tuple[int, int]:
    """The byte offset and 1-based line of the first byte that is not valid UTF-8."""
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            pending = len(decoder.getstate()[0])  # the start of a character cut by the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = max(e.start - pending, 0)
                return offset + at - (pending if e.start < pending else 0), line + block[:at].count(b"\n")
            offset, line = offset + len(block), line + block.count(b"\n")
    return offset, line


def _decodes(path: Path, encoding: str) -> bool:
    try:
        with open(path, encoding=encoding) as f:
            while f.read(1 << 20):
                pass
        return True
    except UnicodeDecodeError:
        return False
