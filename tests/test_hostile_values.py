"""Hostile values in every field of every source: a build writes a record, rejects it with a reason, or stops with one
:class:`MmdataError` for a whole-source problem; it never crashes and never writes what LLaMA-Factory cannot load.

Rows are generated (seeded) from pools of hostile values: empty, None/NaN, 1 MB strings, lone surrogates, NUL and
control characters, RTL/zero-width/emoji/CJK text, numbers/bools/lists/dicts where text belongs, ``<image>`` in the
wrong number, roles that are not roles; image references that climb out (``..``, absolute paths, symlinks), name a
folder, a FIFO, nothing, or a file that is empty, cut, garbage, a decompression bomb, 1x60000, 3000x2, a PNG whose
chunk list or text/ICC chunk PIL refuses. Each source type gets them in its own form (JSON values, CSV cells, file
names and captions, parquet columns, tar members). Every build is then checked the same way (:func:`check_build`):
``read == written + rejected + skipped``, one JSON line with a reason per reject, every output file valid UTF-8 that
pyarrow (LLaMA-Factory's JSON loader) reads, every written record accepted by ``mmdata validate``, and the known-good
rows mixed in are written.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.json as paj
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from tests.conftest import jpeg_bytes, png_bytes, write_recipe

import mmdata
from mmdata.errors import MmdataError

pytestmark = pytest.mark.filterwarnings("ignore::mmdata.errors.BuildWarning")  # most rows are rejects, by design
SEED = int(os.environ.get("MMDATA_HOSTILE_SEED", "17"))  # another seed explores other combinations
ROWS = 36  # hostile rows per build, plus the good ones

# ----------------------------------------------------------------------------------------------- value pools

HUGE = "长" * (1 << 20)  # 1 M characters (3 MB of UTF-8)
TEXTS = ["", " ", "\n\t", "q\ud83d", "\udc80 lone low", "\ud83d\ude00 split pair", "nul\x00byte", "\x01\x1b[31mctrl\x7f",
         "\u202eRTL\u200b zero\u200dwidth\u2066", "emoji 😀👨‍👩‍👧 ok", "中文字符与公式 $x^2$", "a\r\nb", HUGE,
         "<image>", "<image><image>", "<video>", "`<image>` in code", "{x}", "{{", "}", "%s %d", "\\u0000",
         "ok text"]
NON_TEXT = [None, float("nan"), 0, -1, 1.5, 10**30, True, False, [], ["a"], [None], {"a": 1}, {}]
ROLES = ["user", "assistant", "system", "human", "gpt", "", None, 5, 1.5, "wizard", "USER", "q\ud83d", ["user"],
         {"name": "user"}]
MEDIA_FILES = ["ok.jpg", "ok.png", "cmyk.jpg", "wide.png", "tall.png", "thin.png", "bomb.png", "empty.jpg",
               "cut.jpg", "garbage.png", "html.jpg", "badchunk.png", "ztxt.png", "dir.jpg", "fifo.jpg", "link_in.jpg",
               "link_out.jpg", "loop.jpg", "dangling.jpg", "sp ace.jpg", "ünï\u202ecode.jpg", "emoji😀.png",
               "back\\slash.jpg", "中文.png", "-dash.jpg", ".hidden.jpg", "UPPER.JPG", "noext", "x.webp", "x.gif",
               "x.bmp", "x.tif", "x.ico", "sub/ok.jpg"]
HOSTILE_PATHS = ["missing.jpg", "../outside.jpg", "sub/../ok.jpg", "./ok.jpg", "/etc/hostname", "/dev/zero",
                 "nul\x00.jpg", "x" * 5000 + ".jpg", "", " ", "ok.jpg ", "C:\\x.jpg", "~/x.jpg",
                 "file:///etc/passwd", "http://example.com/a.jpg", "dir.jpg/", "sub", ".", "q\ud83d.jpg"]
GOOD_IMAGES = ["ok.jpg", "ok.png", "cmyk.jpg", "wide.png", "tall.png", "sub/ok.jpg"]
IDS = TEXTS[:12] + NON_TEXT


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


@functools.cache
def image_files() -> dict[str, bytes]:
    """Every regular image file of the pool, by name (made once: the bomb takes a moment to compress)."""
    png = png_bytes()
    bomb = bytearray(png)
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    files = {
        "ok.jpg": jpeg_bytes(), "ok.png": png, "cmyk.jpg": encode(Image.new("CMYK", (24, 16), (0, 80, 160, 20)), "JPEG"),
        "wide.png": encode(Image.new("L", (3000, 2), 90), "PNG"), "tall.png": encode(Image.new("L", (1, 60000), 9), "PNG"),
        "thin.png": encode(Image.new("L", (1224, 1), 200), "PNG"), "bomb.png": bytes(bomb), "empty.jpg": b"",
        "cut.jpg": jpeg_bytes((64, 64))[:300], "garbage.png": random.Random(0).randbytes(700),
        "html.jpg": b"<html><body>404 Not Found</body></html>",
        "badchunk.png": png[:33] + png_chunk(b"\x00\xff\x10\x01", b"abc") + png[33:],
        "ztxt.png": png[:33] + png_chunk(b"zTXt", b"c\0\0" + zlib.compress(b"\0" * (32 << 20), 9)) + png[33:],
        "x.webp": encode(Image.new("RGB", (20, 20), (1, 2, 3)), "WEBP"),
        "x.gif": encode(Image.new("P", (20, 20)), "GIF"), "x.bmp": encode(Image.new("RGB", (20, 20)), "BMP"),
        "x.tif": encode(Image.new("RGB", (20, 20)), "TIFF"), "x.ico": encode(Image.new("RGB", (16, 16)), "ICO"),
        "noext": jpeg_bytes(),
    }
    for name in ("sp ace.jpg", "ünï\u202ecode.jpg", "back\\slash.jpg", "-dash.jpg", ".hidden.jpg", "UPPER.JPG",
                 "sub/ok.jpg"):
        files[name] = jpeg_bytes(color=(len(name) * 7 % 255, 40, 90))
    files["emoji😀.png"] = files["中文.png"] = png_bytes(color=(9, 9, 9))
    return files


def write_media(root: Path) -> Path:
    """The pool's files under ``root``, plus a folder, a FIFO and symlinks named like images, and a file outside."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in image_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "dir.jpg").mkdir()
    os.mkfifo(root / "fifo.jpg")
    (root.parent / "outside.jpg").write_bytes(jpeg_bytes())
    os.symlink("ok.jpg", root / "link_in.jpg")
    os.symlink(os.path.join("..", "outside.jpg"), root / "link_out.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    return root


class Hostile:
    """Seeded generator of hostile field values and rows."""

    def __init__(self, seed: int, media: Path):
        self.rng = random.Random(seed)
        self.paths = MEDIA_FILES + HOSTILE_PATHS + [str(media / "ok.jpg"), str(media.parent / "outside.jpg")]

    def pick(self, pool):
        return self.rng.choice(pool)

    def text(self) -> object:
        return self.pick(TEXTS) if self.rng.random() < 0.75 else self.pick(NON_TEXT)

    def path(self) -> object:
        return self.pick(self.paths) if self.rng.random() < 0.85 else self.pick(NON_TEXT)

    def images(self) -> object:
        kind = self.rng.randrange(6)
        if kind == 0:
            return self.path()
        if kind == 1:
            return [self.path() for _ in range(self.rng.randint(0, 3))]
        if kind == 2:
            return [{"path": self.path()}, {"bytes": self.pick(["", "not bytes", 5, None, [1, 2]])}][: self.rng.randint(1, 2)]
        return [self.pick(self.paths)]

    def turns(self) -> object:
        if self.rng.random() < 0.1:
            return self.pick(NON_TEXT + ["hello", [1, 2]])
        turns = []
        for _ in range(self.rng.randint(0, 4)):
            turn = {"role": self.pick(ROLES), "content": self.text()}
            if self.rng.random() < 0.1:
                turn = self.pick([{"from": "human", "value": self.text()}, {"role": "user"}, "just text", None])
            turns.append(turn)
        return turns

    def record(self) -> dict:
        """One JSON record in one of the shapes the JSON source knows, every field hostile; a third are well-formed
        conversations with hostile text and images, so that the later stages (images, writing) see them too."""
        shape = self.rng.randrange(6)
        if shape in (4, 5):
            images = [self.pick(self.paths + GOOD_IMAGES * 3) for _ in range(self.rng.randint(0, 2))]
            record = {"messages": [{"role": "user", "content": "<image>" * len(images) + self.pick(TEXTS[3:])},
                                   {"role": "assistant", "content": self.pick(TEXTS[3:])}], "images": images}
        elif shape == 0:
            record = {"messages": self.turns(), "images": self.images()}
        elif shape == 1:
            record = {"conversations": [{"from": self.pick(["human", "gpt", "system", "bot", None]), "value": self.text()}
                                        for _ in range(self.rng.randint(0, 3))], "image": self.images()}
        elif shape == 2:
            record = {"instruction": self.text(), "input": self.text(), "output": self.text(), "images": self.images()}
            if self.rng.random() < 0.3:
                record["history"] = self.pick([[["q", "a"]], "nope", [[1, 2, 3]], [None]])
        else:
            record = {"question": self.text(), "answer": self.text(), "image": self.path()}
        if self.rng.random() < 0.5:
            record["id"] = self.pick(IDS)
        if self.rng.random() < 0.15:
            record["system"] = self.text()
        if self.rng.random() < 0.1:
            record[self.pick(["\x00", "", " ", "<image>", "images ", "q\ud83d"])] = self.text()
        if self.rng.random() < 0.1:
            record["videos"] = self.pick([[None], ["missing.mp4"], "ok.jpg", [5], [""], ["../outside.jpg"]])
        return record

    def cell(self) -> str:
        """A text cell as a CSV or parquet string can hold it (no lone surrogates: UTF-8 cannot)."""
        value = self.text()
        text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
        return utf8(text)

    def file_cell(self) -> str:
        return utf8(str(self.path()))


def utf8(text: str) -> str:
    """``text`` as a UTF-8 file can hold it (a lone surrogate becomes ``?``)."""
    return text if len(text) > 10_000 else text.encode("utf-8", "replace").decode("utf-8")


def good_record(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"<image>What is in picture {i}?"},
                         {"role": "assistant", "content": f"A red square, number {i}."}],
            "images": [GOOD_IMAGES[i % len(GOOD_IMAGES)]], "id": f"good-{i}"}


GOOD = 3

# ----------------------------------------------------------------------------------------------- the checks

SURROGATE = re.compile("[\ud800-\udfff]")


def strings(value: object):
    """Every string inside a decoded JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)


def build(tmp_path: Path, source: dict, *, images: dict | None = None, **recipe):
    spec = {"name": "hostile", "source": source, "output": {"dir": str(tmp_path / "out")}, **recipe}
    if images:
        spec["images"] = images
    return mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)


def check_build(result, good_answers: list[str]) -> list[dict]:
    """The invariants every build keeps, whatever its rows; ``good_answers``: the answers of the known-good rows mixed
    in, which must all be written. Returns the rejects."""
    counts = result.counts
    assert counts["read"] == counts["written"] + counts["rejected"] + counts.get("skipped", 0), counts
    rejects_file = result.output_dir / "rejects.jsonl"
    lines = rejects_file.read_bytes().decode("utf-8").splitlines() if rejects_file.exists() else []
    rejects = [json.loads(line) for line in lines]
    assert len(rejects) == counts["rejected"]
    for r in rejects:
        assert isinstance(r["reason"], str) and r["reason"].strip() and isinstance(r["message"], str), r
    # the build's catch-all turns an unforeseen exception into a reject; each cause deserves a reason of its own
    assert not [r for r in rejects if r["reason"].startswith("internal error")], rejects
    answers = []
    for path in result.output_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl"):
            text = path.read_bytes().decode("utf-8")  # valid UTF-8, or this raises
            values = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
            assert not [t for t in strings(values) if SURROGATE.search(t)], path  # an escaped "\ud83d": pyarrow refuses it
    for split, folder in result.datasets.items():
        for part in sorted(folder.glob("*.jsonl")) if folder.is_dir() else [folder]:
            table = paj.read_json(part, read_options=paj.ReadOptions(block_size=64 << 20))  # LLaMA-Factory's reader
            assert table.num_rows > 0, (split, part)
            answers += [m[-1]["content"] for m in table.column("messages").to_pylist()]
    missing = [a for a in good_answers if a not in answers]
    assert not missing, (missing, [r["message"] for r in rejects][:20])
    if result.dataset_info is not None:  # at the image_max_pixels the build hands LLaMA-Factory (mmdata llamafactory)
        manifest = json.loads((result.output_dir / "mmdata_build.json").read_text(encoding="utf-8"))
        report = mmdata.validate(result.dataset_info, max_per_kind=1000, image_max_pixels=manifest["image_max_pixels"])
        assert report.ok, report.format_text()
        assert sum(e.records for e in report.entries.values()) == counts["written"]
    return rejects


def json_rows(gen: Hostile) -> tuple[list, list[str]]:
    """Good records among hostile ones, and a few raw lines that are not records at all; the good answers."""
    rows: list = [gen.record() for _ in range(ROWS)]
    rows[5] = "{not json"
    rows[9] = "null"
    rows[13] = '"a string"'
    for i, at in enumerate([0, 17, ROWS + GOOD - 1]):
        rows.insert(at, good_record(i))
    return rows, [good_record(i)["messages"][-1]["content"] for i in range(GOOD)]


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")


@pytest.fixture
def media(tmp_path) -> Path:
    return write_media(tmp_path / "media")


# ----------------------------------------------------------------------------------------------- JSON / JSONL

IMAGE_MODES = {
    "copy": None,
    "link": {"mode": "link"},
    "convert-tiny": {"mode": "convert", "max_pixels": 50},
    "convert-huge": {"mode": "convert", "max_pixels": 10**12, "format": "jpeg"},
    "decode": {"verify": "decode"},
}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_jsonl_rows_with_hostile_fields(tmp_path, media, mode):
    rows, good = json_rows(Hostile(SEED, media))
    write_jsonl(media / "data.jsonl", rows)
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"}, images=IMAGE_MODES[mode])
    rejects = check_build(result, good)
    assert any("invalid JSON" in r["message"] for r in rejects)


def test_json_array_with_a_prompt_template_over_hostile_columns(tmp_path, media):
    gen = Hostile(SEED + 1, media)
    rows = [{"instruction": gen.text(), "output": gen.text(), "images": gen.images(), "q": gen.text(),
             "key": gen.pick(IDS)} for _ in range(ROWS)]
    good = ["Red.", "Square."]
    for at, answer in zip([3, 20], good, strict=True):
        rows.insert(at, {"instruction": "<image>What colour?", "output": answer, "images": ["ok.jpg"], "q": "colour",
                         "key": "k"})
    (media / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    result = build(tmp_path, {"type": "json", "path": "media/data.json"}, fields={"id": "key"},
                   prompt=["What {q}?", "Name the {q}.", "Describe."], system="Be brief.")
    check_build(result, good)


def test_lone_surrogates_are_written_as_replacement_characters_and_split_pairs_joined(tmp_path, media):
    """Scraped JSON spells half an emoji ("\\ud83d"): the record is kept with U+FFFD there (UTF-8 cannot carry the
    half, and pyarrow refuses it escaped); a recipe's system prompt gets the same treatment in records and manifest."""
    records = [{"messages": [{"role": "user", "content": "<image>q\ud83d"},
                             {"role": "assistant", "content": "\ud83d\ude00 and \udc80"}], "images": ["ok.jpg"]},
               {"instruction": "hi\ud83d", "output": "ok"}]
    (media / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")  # ASCII, "\\ud83d" escapes
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"}, system="Be brief\ud83d.")
    check_build(result, ["\U0001f600 and \ufffd", "ok"])
    written = [json.loads(line) for part in sorted(result.datasets["hostile"].glob("*.jsonl"))
               for line in part.read_text(encoding="utf-8").splitlines()]
    assert [m["content"] for m in written[0]["messages"]] == ["Be brief\ufffd.", "<image>q\ufffd",
                                                              "\U0001f600 and \ufffd"]
    manifest = json.loads((result.output_dir / "mmdata_build.json").read_text(encoding="utf-8"))
    assert manifest["recipe"]["system"] == "Be brief\ufffd."


def test_thin_images_convert_into_tiny_budgets_and_count_without_dividing_by_zero(tmp_path, media):
    """3000x2 and 1x60000 into 50 pixels: the original crash (ZeroDivisionError counting the 273x1 result at
    image_max_pixels 50). All are written within the budget, and validate agrees at that image_max_pixels."""
    records = [{"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": name}],
                "images": [name]} for name in ("wide.png", "tall.png", "thin.png", "ok.jpg")]
    write_jsonl(media / "data.jsonl", records)
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"}, images={"mode": "convert", "max_pixels": 50})
    check_build(result, ["wide.png", "tall.png", "thin.png", "ok.jpg"])
    sizes = [Image.open(p).size for p in (result.output_dir / "images").rglob("*.*")]
    assert len(sizes) == 4 and all(w * h <= 50 and min(w, h) >= 1 for w, h in sizes), sizes
    assert mmdata.validate(result.dataset_info, image_max_pixels=50).ok


def test_datasets_loads_what_the_build_writes_from_lone_surrogates_and_validate_flags_the_raw_file(
        tmp_path, media, hf_cache):
    """The raw file (``"\\ud83d"`` escapes) is what ``datasets`` (LLaMA-Factory's loader) cannot load, and validate
    says so; the build's output of it loads."""
    (media / "data.json").write_text(json.dumps([{"instruction": "q\ud83d", "output": "a\udc80"}]))
    (media / "dataset_info.json").write_text(json.dumps({"raw": {"file_name": "data.json"}}))
    with pytest.raises(Exception):  # noqa: B017 - datasets' error type varies (pyarrow, pandas, its own wrapper)
        datasets.load_dataset("json", data_files=str(media / "data.json"), cache_dir=str(tmp_path / "c1"))
    assert "bad-unicode" in {p.code for p in mmdata.validate(media).errors}
    result = build(tmp_path, {"type": "json", "path": "media/data.json"})
    check_build(result, ["a\ufffd"])
    loaded = datasets.load_dataset("json", data_files=[str(p) for p in result.datasets["hostile"].glob("*.jsonl")],
                                   cache_dir=str(tmp_path / "c2"))["train"]
    assert [m["content"] for m in loaded[0]["messages"]] == ["q\ufffd", "a\ufffd"]


# ----------------------------------------------------------------------------------------------- CSV


def csv_text(rows: list[list[str]]) -> str:
    import csv

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def test_csv_cells_with_hostile_values(tmp_path, media):
    gen = Hostile(SEED + 2, media)
    rows = [["image_path", "question", "text", "id"]]
    rows += [[gen.file_cell(), gen.cell(), gen.cell(), gen.cell()] for _ in range(ROWS)]
    good = ["A square.", "A red square."]
    for at, answer in zip([5, 31], good, strict=True):
        rows.insert(at, ["ok.jpg", "What is it?", answer, "good"])
    (media / "data.csv").write_text(csv_text(rows), encoding="utf-8")
    result = build(tmp_path, {"type": "csv", "path": "media/data.csv"},
                   fields={"image": "image_path", "question": "question", "answer": "text", "id": "id"})
    check_build(result, good)


def test_csv_that_is_not_utf8_is_one_error_naming_the_file(tmp_path, media):
    (media / "data.csv").write_bytes("image_path,text\nok.jpg,q\ud83d\n".encode("utf-8", "surrogatepass"))
    with pytest.raises(MmdataError, match="data.csv"):
        build(tmp_path, {"type": "csv", "path": "media/data.csv"}, fields={"image": "image_path", "answer": "text"},
              prompt="Read it.")


# ----------------------------------------------------------------------------------------------- imagefolder


def caption_bytes(gen: Hostile) -> bytes:
    return gen.cell().encode("utf-8")


def test_imagefolder_with_hostile_file_names_and_captions(tmp_path):
    folder = write_media(tmp_path / "folder")
    gen = Hostile(SEED + 3, folder)
    for name in MEDIA_FILES:
        if (folder / name).is_file() and not (folder / name).is_symlink():
            (folder / name).with_suffix(".txt").write_bytes(caption_bytes(gen))
    (folder / "ok.txt").write_text("A red square.", encoding="utf-8")
    (folder / "cmyk.txt").write_text("A blue rectangle.", encoding="utf-8")
    (folder / "x.txt").unlink(missing_ok=True)
    os.symlink(tmp_path / "outside.jpg", folder / "x.txt")  # a caption that is a symlink out of the folder
    result = build(tmp_path, {"type": "imagefolder", "path": "folder"}, prompt="<image>Describe the image.")
    check_build(result, ["A red square.", "A blue rectangle."])


def test_imagefolder_caption_that_is_not_utf8_is_a_reject(tmp_path):
    folder = write_media(tmp_path / "folder")
    (folder / "ok.txt").write_bytes(b"caf\xe9 \xff\xfe")
    (folder / "cmyk.txt").write_text("Fine.", encoding="utf-8")
    result = build(tmp_path, {"type": "imagefolder", "path": "folder"}, prompt="<image>Describe.")
    assert any("ok.txt" in r["message"] or "ok.jpg" in r["message"] for r in check_build(result, ["Fine."]))


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_imagefolder_metadata_with_hostile_file_names(tmp_path, kind):
    folder = write_media(tmp_path / "folder")
    gen = Hostile(SEED + 4, folder)
    if kind == "jsonl":
        rows = [{"file_name": gen.path(), "text": gen.text(), "extra": gen.text()} for _ in range(ROWS)]
        rows[7] = "not json"
        rows.insert(2, {"file_name": "ok.jpg", "text": "A red square."})
        write_jsonl(folder / "metadata.jsonl", rows)
    else:
        cells = [["file_name", "text", "extra"]] + [[gen.file_cell(), gen.cell(), gen.cell()] for _ in range(ROWS)]
        cells.insert(3, ["ok.jpg", "A red square.", ""])
        (folder / "metadata.csv").write_text(csv_text(cells), encoding="utf-8")
    result = build(tmp_path, {"type": "imagefolder", "path": "folder"}, prompt="<image>Describe.")
    check_build(result, ["A red square."])


# ----------------------------------------------------------------------------------------------- hf (parquet)


def image_cell(gen: Hostile, media: Path) -> dict | None:
    choice = gen.rng.randrange(4)
    if choice == 0:
        name = gen.pick(MEDIA_FILES)
        path = media / name
        return {"bytes": path.read_bytes() if path.is_file() and not path.is_fifo() else b"", "path": None}
    if choice == 1:
        return {"bytes": None, "path": gen.file_cell()}
    if choice == 2:
        return {"bytes": gen.rng.randbytes(gen.rng.randint(0, 40)), "path": "x.jpg"}
    return None


def hf_table(gen: Hostile, media: Path) -> tuple[pa.Table, list[str]]:
    rows = [{"image": image_cell(gen, media), "text": gen.cell(), "id": gen.cell(), "lang": gen.pick(["en", "zh", ""])}
            for _ in range(ROWS)]
    good = ["A red square.", "A square."]
    for at, answer in zip([1, 25], good, strict=True):
        rows.insert(at, {"image": {"bytes": jpeg_bytes(), "path": None}, "text": answer, "id": "good", "lang": "en"})
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string()),
                        ("id", pa.string()), ("lang", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema), good


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hf_local_parquet_file_with_hostile_columns(tmp_path, media, hf_cache):
    table, good = hf_table(Hostile(SEED + 5, media), media)
    pq.write_table(table, media / "data.parquet")
    result = build(tmp_path, {"type": "hf", "path": "media/data.parquet"}, fields={"image": "image", "answer": "text",
                                                                                   "id": "id"},
                   prompt="<image>Describe.")
    check_build(result, good)


def test_hf_hub_layout_folder_with_a_where_filter(tmp_path, media, hf_cache):
    table, good = hf_table(Hostile(SEED + 6, media), media)
    hub = tmp_path / "hub"
    (hub / "main").mkdir(parents=True)
    card = {"configs": [{"config_name": "main", "data_files": [{"split": "train", "path": "main/train-*"}]}]}
    (hub / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n", encoding="utf-8")
    pq.write_table(table, hub / "main" / "train-00000-of-00001.parquet")
    result = build(tmp_path, {"type": "hf", "path": "hub", "subset": "main", "where": {"lang": ["en", "zh"]}},
                   fields={"image": "image", "answer": "text", "id": "id"}, prompt="<image>Describe.")
    check_build(result, good)  # the good rows are "en"


# ----------------------------------------------------------------------------------------------- image_join


def join_metadata(gen: Hostile, names: list[str]) -> tuple[pa.Table, list[str]]:
    rows = [{"file_name": utf8(gen.pick(names)) if gen.rng.random() < 0.6 else gen.file_cell(), "caption": gen.cell()}
            for _ in range(ROWS)]
    rows.insert(0, {"file_name": "ok.jpg", "caption": "A red square."})
    return pa.Table.from_pylist(rows), ["A red square."]


def test_image_join_on_a_folder(tmp_path, media, hf_cache):
    table, good = join_metadata(Hostile(SEED + 7, media), MEDIA_FILES + HOSTILE_PATHS)
    pq.write_table(table, tmp_path / "meta.parquet")
    result = build(tmp_path, {"type": "image_join", "path": "meta.parquet", "image_root": "media"},
                   fields={"image": "image", "answer": "caption"}, prompt="<image>Describe.")
    check_build(result, good)


def test_image_join_on_a_tar_shard_with_hostile_members(tmp_path, media, hf_cache):
    buf = io.BytesIO()
    members = {**{name: data for name, data in image_files().items()}, "../evil.jpg": jpeg_bytes(),
               "/abs.jpg": jpeg_bytes(), "./dot.jpg": jpeg_bytes(), "q\udcff.jpg": jpeg_bytes()}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind in (("dir.jpg", tarfile.DIRTYPE), ("link.jpg", tarfile.SYMTYPE), ("fifo.jpg", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "ok.jpg"
            tar.addfile(info)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-000.tar").write_bytes(buf.getvalue())
    names = [*image_files(), "../evil.jpg", "evil.jpg", "/abs.jpg", "abs.jpg", "dot.jpg", "dir.jpg", "link.jpg"]
    table, good = join_metadata(Hostile(SEED + 8, media), names + HOSTILE_PATHS)
    pq.write_table(table, tmp_path / "meta.parquet")
    result = build(tmp_path, {"type": "image_join", "path": "meta.parquet", "image_root": "shards"},
                   fields={"image": "image", "answer": "caption"}, prompt="<image>Describe.")
    check_build(result, good)


# ----------------------------------------------------------------------------------------------- mixture


def test_mixture_of_hostile_components(tmp_path, media):
    rows, good = json_rows(Hostile(SEED + 9, media))
    write_jsonl(media / "a.jsonl", rows)
    gen = Hostile(SEED + 10, media)
    cells = [["image_path", "text"]] + [[gen.file_cell(), gen.cell()] for _ in range(ROWS)]
    (media / "b.csv").write_text(csv_text(cells), encoding="utf-8")
    components = [{"name": "json", "source": {"type": "jsonl", "path": "media/a.jsonl"}, "count": len(rows)},
                  {"name": "csv", "source": {"type": "csv", "path": "media/b.csv"}, "count": 20,
                   "fields": {"image": "image_path", "answer": "text"}, "prompt": "<image>Read {text}."}]
    result = build(tmp_path, {"type": "mixture", "seed": 3, "components": components})
    check_build(result, good)


# ----------------------------------------------------------------------------------------------- the CLI


def test_cli_build_and_validate_of_hostile_rows_exit_cleanly_without_a_traceback(tmp_path, media):
    rows, _ = json_rows(Hostile(SEED, media))
    write_jsonl(media / "data.jsonl", rows)
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "hostile", "source": {"type": "jsonl", "path": "media/data.jsonl"},
                                               "system": "q\ud83d", "output": {"dir": str(tmp_path / "out")}})
    cli = Path(sys.executable).with_name("mmdata")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    built = subprocess.run([str(cli), "build", str(recipe), "--quiet", "--num-proc", "1"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert built.returncode == 0 and "Traceback" not in built.stdout + built.stderr, built.stderr[-3000:]
    checked = subprocess.run([str(cli), "validate", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                             timeout=120)
    assert checked.returncode == 0 and "Traceback" not in checked.stdout + checked.stderr, checked.stdout[-3000:]
    assert "OK:" in checked.stdout


# ----------------------------------------------------------------------------------------------- found by the generator
# Each test pins one crash the generator found (fixed since): a reject quoting a lone surrogate, a surrogate in an image
# path, an image_join file name over 255 bytes, a role that is a list, an image LLaMA-Factory cannot shrink, videos
# that name no file.


@pytest.mark.parametrize("record", [{"id": "q\ud83d", "messages": "not a list"}, {"q\ud83d": "an unknown shape"}],
                         ids=["id", "key"])
def test_a_reject_quoting_a_lone_surrogate_is_written(tmp_path, media, record):
    write_jsonl(media / "data.jsonl", [record, good_record(0)])
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"})
    assert len(check_build(result, [good_record(0)["messages"][-1]["content"]])) == 1


@pytest.mark.parametrize("via", ["jsonl", "mixture"])
def test_an_image_path_with_a_lone_surrogate_is_a_reject_with_its_reason(tmp_path, media, via):
    record = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "Red."}],
              "images": ["q\ud83d.jpg"]}
    write_jsonl(media / "data.jsonl", [record, good_record(0)])
    source = {"type": "jsonl", "path": "media/data.jsonl"}
    if via == "mixture":
        source = {"type": "mixture", "components": [{"name": "a", "source": source, "count": 2}]}
    rejects = check_build(build(tmp_path, source), [good_record(0)["messages"][-1]["content"]])
    assert [r["reason"] for r in rejects] == ["image unreadable"] or "Unicode" in rejects[0]["message"]


def test_image_join_file_name_too_long_is_a_reject(tmp_path, media, hf_cache):
    pq.write_table(pa.Table.from_pylist([{"file_name": "x" * 300 + ".jpg", "caption": "Long."},
                                         {"file_name": "ok.jpg", "caption": "A red square."}]), tmp_path / "m.parquet")
    result = build(tmp_path, {"type": "image_join", "path": "m.parquet", "image_root": "media"},
                   fields={"image": "image", "answer": "caption"}, prompt="<image>Describe.")
    assert len(check_build(result, ["A red square."])) == 1


@pytest.mark.parametrize("role", [["user"], {"name": "user"}])
def test_a_role_that_is_a_list_is_a_reject(tmp_path, media, role):
    record = {"messages": [{"role": role, "content": "What?"}, {"role": "assistant", "content": "Red."}]}
    write_jsonl(media / "data.jsonl", [record, good_record(0)])
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"})
    assert len(check_build(result, [good_record(0)["messages"][-1]["content"]])) == 1


def test_an_image_llamafactory_cannot_shrink_is_a_reject(tmp_path, media):
    (media / "line.png").write_bytes(encode(Image.new("L", (600_000, 1), 128), "PNG"))
    record = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A line."}],
              "images": ["line.png"]}
    write_jsonl(media / "data.jsonl", [record, good_record(0)])
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"})
    assert len(check_build(result, [good_record(0)["messages"][-1]["content"]])) == 1


@pytest.mark.parametrize("videos", [[None], ["missing.mp4"]])
def test_records_with_missing_videos_are_rejected(tmp_path, media, videos):
    record = {"messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "Red."}],
              "videos": videos}
    write_jsonl(media / "data.jsonl", [record, good_record(0)])
    result = build(tmp_path, {"type": "jsonl", "path": "media/data.jsonl"})
    assert len(check_build(result, [good_record(0)["messages"][-1]["content"]])) == 1
