"""Hostile and broken input: every case ends written, rejected with a reason, or one MmdataError naming the file.

Each test here backs one row of the table in docs/reliability.md. Every build also checks the bookkeeping:
``read == written + rejected`` and one line in rejects.jsonl per rejected record.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from tests.conftest import jpeg_bytes, png_bytes, read_jsonl_dir, write_recipe

import mmdata
from mmdata.cli import main
from mmdata.errors import RecipeError, SourceError
from mmdata.recipes import load_recipe


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A valid 20x20 PNG whose header claims 100000x100000 pixels (10^10: over PIL's bomb limit)."""
    data = bytearray(png_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return encode(img, "JPEG", exif=exif)


def gray16_png() -> bytes:
    img = Image.new("I;16", (16, 8))
    img.putdata([i * 300 for i in range(16 * 8)])  # values 0..38100: far above 8 bits
    return encode(img, "PNG")


IMAGES = {
    "ok.jpg": jpeg_bytes(),
    "ok.png": png_bytes(),
    "truncated.jpg": jpeg_bytes()[:300],
    "truncated.png": png_bytes()[:60],
    "zero.jpg": b"",
    "bomb.png": bomb_png(),
    "text.jpg": b"this is not an image\n",
    "html.png": b"<html><body>404 Not Found</body></html>",
    "cmyk.jpg": encode(Image.new("CMYK", (24, 16), (0, 80, 160, 20)), "JPEG"),
    "palette.png": encode(Image.new("RGB", (24, 16), (0, 90, 200)).convert("P"), "PNG"),
    "la.png": encode(Image.new("LA", (24, 16), (120, 200)), "PNG"),
    "gray16.png": gray16_png(),
    "exif.jpg": exif_rotated_jpeg(),
}


def build(tmp_path: Path, records: list, *, fmt: str = "jsonl", **recipe) -> tuple[mmdata.pipeline.BuildResult, list]:
    """Write ``records`` (dicts, or raw lines as str) and the images, build, return the result and the rejects."""
    for name, data in IMAGES.items():
        (tmp_path / name).write_bytes(data)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (tmp_path / f"data.{fmt}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = {"name": "t", "source": {"type": fmt, "path": f"data.{fmt}"}, "output": {"dir": str(tmp_path / "out")},
            **recipe}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)
    return result, check_counts(result)


def check_counts(result) -> list[dict]:
    rejects_file = result.output_dir / "rejects.jsonl"
    rejects = [json.loads(line) for line in rejects_file.read_text().split("\n") if line] if rejects_file.exists() else []
    assert result.read == result.written + result.rejected
    assert len(rejects) == result.rejected
    return rejects


def turn(image: str | list | None = "ok.jpg", answer: object = "an answer", **extra) -> dict:
    images = [] if image is None else image if isinstance(image, list) else [image]
    return {"messages": [{"role": "user", "content": "<image>" * len(images) + "what is it?"},
                         {"role": "assistant", "content": answer}], "images": images, **extra}


# ----------------------------------------------------------------------------------------------- images

IMAGE_CASES = [
    # (file, outcome in copy mode, outcome in convert mode): "written" or the reject message fragment
    ("ok.jpg", "written", "written"),
    ("truncated.jpg", "truncated", "truncated"),
    ("truncated.png", "truncated", "truncated"),
    ("zero.jpg", "image is empty (0 bytes)", "image is empty (0 bytes)"),
    ("bomb.png", "decompression bomb", "decompression bomb"),
    ("text.jpg", "not an image file", "not an image file"),
    ("html.png", "not an image file", "not an image file"),
    ("missing.jpg", "image file not found", "image file not found"),
    ("cmyk.jpg", "written", "written"),
    ("palette.png", "written", "written"),
    ("la.png", "written", "written"),
    ("gray16.png", "written", "written"),
    ("exif.jpg", "written", "written"),
]


@pytest.mark.parametrize("mode", ["copy", "convert"])
def test_every_bad_image_is_a_reject_with_its_reason_and_good_ones_are_written(tmp_path, mode):
    result, rejects = build(tmp_path, [turn(name) for name, *_ in IMAGE_CASES], images={"mode": mode})
    by_position = {r["position"]: r for r in rejects}
    for position, (name, copy_outcome, convert_outcome) in enumerate(IMAGE_CASES):
        expected = copy_outcome if mode == "copy" else convert_outcome
        if expected == "written":
            assert position not in by_position, (name, by_position.get(position))
        else:
            assert expected in by_position[position]["message"], (name, by_position[position])
            assert by_position[position]["reason"] in ("image unreadable", "image file not found")
            if name != "missing.jpg":
                assert name in by_position[position]["message"]  # the reject names the file


def test_copy_mode_keeps_the_original_bytes_of_unusual_modes(tmp_path):
    names = ["cmyk.jpg", "palette.png", "la.png", "gray16.png", "exif.jpg"]
    result, _ = build(tmp_path, [turn(n) for n in names])
    assert result.written == len(names)
    written = [result.output_dir / r["images"][0] for r in read_jsonl_dir(result.datasets["t"])]
    assert [p.read_bytes() for p in written] == [IMAGES[n] for n in names]


def test_convert_mode_normalises_modes_orientation_and_16_bit_range(tmp_path):
    names = ["cmyk.jpg", "palette.png", "la.png", "gray16.png", "exif.jpg", "ok.jpg"]
    result, _ = build(tmp_path, [turn(n) for n in names], images={"mode": "convert"})
    assert result.written == len(names)
    records = read_jsonl_dir(result.datasets["t"])
    opened = {name: Image.open(result.output_dir / r["images"][0]) for name, r in zip(names, records, strict=True)}
    assert opened["cmyk.jpg"].mode == "RGB"
    assert opened["palette.png"].mode in ("RGB", "RGBA")
    gray = opened["gray16.png"]
    assert gray.mode == "L" and gray.getextrema() == (0, 255)  # scaled, not clipped to white
    assert opened["exif.jpg"].size == (20, 40)  # EXIF orientation applied
    assert opened["ok.jpg"].format == "JPEG"  # format: keep keeps JPEG (was re-encoded as PNG before the fix)


def test_a_fifo_named_as_image_is_rejected_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    result, rejects = build(tmp_path, [turn("pipe.jpg"), turn()])
    assert result.written == 1 and "not a regular file" in rejects[0]["message"]


def test_a_folder_named_as_image_is_rejected(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    _, rejects = build(tmp_path, [turn("dir.jpg")])
    assert "image path is a folder" in rejects[0]["message"]


# ----------------------------------------------------------------------------------------------- ids and names

HOSTILE_IDS = ["../../etc/passwd", "/abs/path", "nul\x00byte", "x" * 5000, "a/b", "a_b", "a:b", "dup", "dup", "",
               "..", "CON", "ünï\u202ecode"]


def test_hostile_ids_are_kept_as_data_and_never_name_files(tmp_path):
    result, rejects = build(tmp_path, [turn(id=i) for i in HOSTILE_IDS])
    assert result.written == len(HOSTILE_IDS) and not rejects  # duplicates and collisions are all written
    images = sorted(p.relative_to(result.output_dir).as_posix() for p in (result.output_dir / "images").rglob("*.*"))
    digest = hashlib.sha256(IMAGES["ok.jpg"]).hexdigest()[:32]
    assert images == [f"images/{digest[:2]}/{digest}.jpg"]  # one image under every record, named by its bytes
    assert {r["images"][0] for r in read_jsonl_dir(result.datasets["t"])} == set(images)
    assert {p.name for p in tmp_path.iterdir()} <= {*IMAGES, "data.jsonl", "r.yaml", "out"}


def test_hostile_ids_of_rejected_records_are_written_verbatim_to_rejects(tmp_path):
    _, rejects = build(tmp_path, [turn("missing.jpg", id=i) for i in HOSTILE_IDS[:4]])
    assert [r["id"] for r in rejects] == HOSTILE_IDS[:4]


@pytest.mark.parametrize(("image", "message"), [
    ("../outside.jpg", "resolves outside the allowed folders"),
    ("/etc/hostname", "resolves outside the allowed folders"),
    ("nul\x00.jpg", "NUL byte"),
    ("n" * 5000 + ".jpg", "File name too long"),
    ("~/x.jpg", "image file not found"),  # taken literally: no home-directory expansion of record data
])
def test_hostile_image_paths_are_rejects(tmp_path, image, message):
    (tmp_path.parent / "outside.jpg").write_bytes(jpeg_bytes())
    result, rejects = build(tmp_path, [turn(image)])
    assert result.written == 0 and message in rejects[0]["message"]


# ----------------------------------------------------------------------------------------------- CSV


def build_csv(tmp_path: Path, content: bytes, **source) -> tuple[object, list]:
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "data.csv").write_bytes(content)
    spec = {"name": "t", "source": {"type": "csv", "path": "data.csv", **source},
            "fields": {"image": "image_path", "answer": "text"}, "prompt": "Transcribe.",
            "output": {"dir": str(tmp_path / "out")}}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)
    return result, check_counts(result)


def test_csv_with_bom_reads_the_first_column_name_cleanly(tmp_path):
    result, _ = build_csv(tmp_path, b"\xef\xbb\xbfimage_path,text\nok.jpg,x^2\n")
    assert result.written == 1


def test_csv_in_gb18030_is_detected(tmp_path):
    result, _ = build_csv(tmp_path, "image_path,text\nok.jpg,公式\n".encode("gb18030"))
    assert result.written == 1


def test_csv_in_an_undecodable_encoding_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(SourceError, match=r"data\.csv: neither UTF-8 nor GB18030; set source.encoding"):
        build_csv(tmp_path, "image_path,text\nok.jpg,caf\xe9 \xff\xfe\n".encode("latin-1"))


def test_csv_with_an_unknown_encoding_name_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="unknown encoding 'latin-9x'"):
        build_csv(tmp_path, b"image_path,text\nok.jpg,a\n", encoding="latin-9x")


def test_csv_first_row_longer_than_header_is_an_error_not_shifted_columns(tmp_path):
    with pytest.raises(SourceError, match="first data row has more fields than the header"):
        build_csv(tmp_path, b"image_path,text\nok.jpg,a,b\nok.jpg,c\n")


def test_csv_later_row_longer_than_header_names_the_line(tmp_path):
    with pytest.raises(SourceError, match=r"data\.csv: .*Expected 2 fields in line 3, saw 3"):
        build_csv(tmp_path, b"image_path,text\nok.jpg,a\nok.jpg,b,c\n")


def test_csv_short_rows_nan_and_empty_captions_are_rejects_with_reason(tmp_path):
    result, rejects = build_csv(tmp_path, b"image_path,text\nok.jpg\nok.jpg,\nok.jpg,NaN\nok.jpg,fine\n")
    assert [r["position"] for r in rejects] == [0, 1]
    assert all("assistant) is empty" in r["message"] for r in rejects)
    assert result.written == 2  # "NaN" is text here (no guessing of missing-value markers)


def test_csv_huge_caption_is_written_intact_or_filtered_by_a_bound(tmp_path):
    caption = "x" * 5_000_000
    result, _ = build_csv(tmp_path, f"image_path,text\nok.jpg,{caption}\n".encode())
    record = json.loads(next((result.output_dir / "t").glob("*.jsonl")).read_text())
    assert record["messages"][-1]["content"] == caption


def test_csv_unterminated_quote_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(SourceError, match=r"data\.csv: cannot parse as CSV"):
        build_csv(tmp_path, b'image_path,text\nok.jpg,"never closed\n')


def test_csv_text_column_mapped_as_messages_is_a_reject(tmp_path):
    (tmp_path / "data.csv").write_text("image_path,text\nok.jpg,hello\n")
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes())
    spec = {"name": "t", "source": {"type": "csv", "path": "data.csv"},
            "fields": {"image": "image_path", "messages": "text"}, "output": {"dir": str(tmp_path / "out")}}
    result = mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)), num_proc=1)
    assert "expected a list of {role, content} objects" in check_counts(result)[0]["message"]


# ----------------------------------------------------------------------------------------------- JSON / JSONL

JSON_CASES = [
    # (record or raw line, reject message fragment; None = written)
    (turn(), None),
    ("{not json", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, None),  # a line starting with "[": see the array test below for files
    ('{"messages": ' + "1" * 5000 + "}", "invalid JSON (ValueError"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid JSON (RecursionError"),
    ("5", "record is a int, expected an object"),
    ('"a string"', "record is a str, expected an object"),
    ({"messages": "hello"}, "'messages' is a str, expected a list of turns"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "content is dict, expected a string"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "has role 'wizard'"),
    ({"messages": [{"role": "user", "content": "<image>hi"}], "images": ["ok.jpg"]}, "ends with a user turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, "turn 0 is 'assistant'"),
    (turn("ok.jpg") | {"images": ["ok.jpg", "ok.png"]}, "1 <image> placeholder(s) but 2 image(s)"),
    ({"messages": [{"role": "assistant", "content": "a"}], "images": ["ok.jpg"]}, "no user turn"),
    (turn() | {"images": [{"bytes": "not bytes"}]}, "image bytes is a str"),
    (turn() | {"images": [{"bytes": 10**12}]}, "image bytes is a int"),
    (turn() | {"images": [7]}, "image value is a int"),
    ({"instruction": "q", "output": 5}, "alpaca output is int, expected the answer text"),
    ({"instruction": "q", "output": None}, "alpaca output is null, expected the answer text"),
    ({"instruction": "q", "output": "a", "history": "nope"}, "history must be a list"),
    ({"unknown": "shape"}, "unrecognised record shape"),
]


def test_every_bad_json_record_is_a_reject_and_the_rest_are_written(tmp_path):
    records = [r for r, _ in JSON_CASES]
    records[2] = turn()  # the deep array line is exercised as a whole file below
    result, rejects = build(tmp_path, records)
    by_position = {r["position"]: r["message"] for r in rejects}
    for position, (_, fragment) in enumerate(JSON_CASES):
        if fragment is None:
            assert position not in by_position
        else:
            assert fragment in by_position.get(position, ""), (position, by_position.get(position))


def test_mixed_types_per_column_each_record_on_its_own_merits(tmp_path):
    records = [turn(id=1), turn(id="two"), turn(id=None), turn(id=[3]), turn("ok.jpg", answer=3.5),
               turn(["ok.jpg"]), turn("ok.png")]
    result, rejects = build(tmp_path, records)
    assert result.written == 6 and [r["position"] for r in rejects] == [4]


def test_json_top_level_object_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(SourceError, match=r"data\.json: top level is an object, not a list of records"):
        build(tmp_path, ['{"messages": []}'], fmt="json")


def test_json_array_nested_too_deep_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(SourceError, match=r"data\.json: cannot parse the JSON \(RecursionError"):
        build(tmp_path, ["[" * 100_000 + "]" * 100_000], fmt="json")


def test_json_not_utf8_is_one_error_naming_the_file(tmp_path):
    (tmp_path / "data.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    spec = {"name": "t", "source": {"type": "jsonl", "path": "data.jsonl"}, "output": {"dir": str(tmp_path / "o")}}
    with pytest.raises(SourceError, match=r"data\.jsonl: not UTF-8 text"):
        mmdata.build(str(write_recipe(tmp_path / "r.yaml", spec)))


# ----------------------------------------------------------------------------------------------- recipes (YAML)

BASE = "name: t\nsource: {type: jsonl, path: data.jsonl}\noutput: {dir: out}\n"
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))

RECIPE_CASES = [
    ("unknown key", BASE + "outptu: {}\n", r"unknown key 'outptu'; did you mean 'output'"),
    ("wrong type", BASE.replace("{dir: out}", "{dir: out, shard_size: many}"), r"output.shard_size: Input should be"),
    ("billion laughs", LAUGHS + BASE + "description: *i\n", r"expands to more than 100000 nodes"),
    ("recursive alias", BASE + "fields: &f {answer: *f}\n", r"recursive alias"),
    ("python tag", BASE + "description: !!python/object/apply:os.system ['touch PWNED']\n", r"not valid YAML"),
    ("custom tag", BASE + "description: !include other.yaml\n", r"not valid YAML"),
    ("huge integer", BASE + "max_samples: " + "9" * 5000 + "\n", r"not valid YAML: ValueError"),
    ("not a mapping", "- a\n- b\n", r"a recipe is a YAML mapping"),
    ("name escapes", BASE.replace("{dir: out}", "{dir: out, name: ../../escape}"), r"output.name: String should"),
    ("two documents", BASE + "---\n" + BASE, r"not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipes_are_one_recipe_error_naming_the_file(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match=message) as error:
        load_recipe(tmp_path / "r.yaml")
    assert str(tmp_path / "r.yaml") in str(error.value)
    assert not (tmp_path / "PWNED").exists()  # no code ran


def test_recipe_not_utf8_or_too_large_is_a_recipe_error(tmp_path):
    (tmp_path / "latin.yaml").write_bytes((BASE + "description: caf\xe9\n").encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin\.yaml: not UTF-8 text"):
        load_recipe(tmp_path / "latin.yaml")
    (tmp_path / "big.yaml").write_text(BASE + "description: " + "x" * (2 << 20) + "\n")
    with pytest.raises(RecipeError, match=r"big\.yaml: .* too large for a recipe"):
        load_recipe(tmp_path / "big.yaml")


def test_cli_turns_a_bad_source_into_one_line_and_an_exit_code(tmp_path, capsys):
    (tmp_path / "data.json").write_text('{"not": "a list"}')
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "t", "source": {"type": "json", "path": "data.json"},
                                               "output": {"dir": str(tmp_path / "out")}})
    assert main(["build", str(recipe), "--quiet"]) == SourceError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdata: error: ") and "data.json" in err and "\n" not in err
