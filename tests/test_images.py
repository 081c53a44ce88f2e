"""Image checks: the header check gives PIL's verdict at a fraction of its cost, and a build and ``mmdata validate``
agree on every file.

The default check (``images.verify: header``) must accept only what ``PIL.Image.open`` (so LLaMA-Factory) accepts:
the header walk answers plain files itself and hands everything else to PIL. The property tests mutate real files
(chunk types, lengths, CRCs, inserted chunks and segments, cuts) and check that every file the walk answers opens
in PIL with the same format and size; the named cases are the files that used to slip through.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin
from tests.conftest import write_recipe

import mmdata
from mmdata.check import _open_image
from mmdata.errors import SampleError
from mmdata.images import _header_verdict, convert_image, fit_pixels, image_info, inspect_image
from mmdata.tokens import lf_image_problem


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunk(ctype: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc & 0xFFFFFFFF)


def after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    return png[:33] + b"".join(chunks) + png[33:]


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def after_soi(jpeg: bytes, *segments: bytes) -> bytes:
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def before_sos(jpeg: bytes, *segments: bytes) -> bytes:
    at = jpeg.find(b"\xff\xda") if b"\xff\xda" in jpeg else 2
    return jpeg[:at] + b"".join(segments) + jpeg[at:]


def exif_with(tag: int, value) -> Image.Exif:
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0128] = 2
    exif[tag] = value
    return exif


def exif_ifd0(*entries: tuple[int, int, int, bytes]) -> bytes:
    """An APP1 EXIF payload whose IFD0 holds ``(tag, type, count, 4-byte value)`` entries (little-endian TIFF)."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in entries)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def pil_verdict(data: bytes) -> tuple[str, tuple[int, int]] | str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format, img.size
    except Exception as e:  # noqa: BLE001 - any failure is a verdict here
        return type(e).__name__


NOISE = Image.effect_noise((45, 29), 60)
RGB = Image.merge("RGB", [NOISE, NOISE.transpose(Image.Transpose.FLIP_LEFT_RIGHT), NOISE])
ICC = bytes(range(256)) * 12
TEXT = PngImagePlugin.PngInfo()
TEXT.add_text("Software", "mmdata")

# Files as cameras, phones, screenshots and PIL write them: all must be answered from the header (the fast path).
PLAIN = {
    "jpeg": encode(RGB, "JPEG"), "jpeg L": encode(RGB.convert("L"), "JPEG"), "jpeg CMYK": encode(RGB.convert("CMYK"), "JPEG"),
    "jpeg progressive": encode(RGB, "JPEG", progressive=True), "jpeg exif": encode(RGB, "JPEG", exif=exif_with(0x011A, 72.0)),
    "jpeg icc": encode(RGB, "JPEG", icc_profile=ICC), "jpeg dpi": encode(RGB, "JPEG", dpi=(300, 300)),
    "jpeg comment": encode(RGB, "JPEG", comment=b"hi"), "png": encode(RGB, "PNG"),
    "png RGBA": encode(RGB.convert("RGBA"), "PNG"), "png P": encode(RGB.convert("P"), "PNG"),
    "png 1": encode(RGB.convert("1"), "PNG"), "png I;16": encode(RGB.convert("I;16"), "PNG"),
    "png text": encode(RGB, "PNG", pnginfo=TEXT), "png icc": encode(RGB, "PNG", icc_profile=ICC),
    "png dpi": encode(RGB, "PNG", dpi=(96, 96)), "png tRNS": encode(RGB.convert("P"), "PNG", transparency=0),
    "png exif": encode(RGB, "PNG", exif=exif_with(0x011A, 72.0)),
}
UNUSUAL = {  # opened by PIL, but through PIL: the walk does not model them
    "png zTXt": encode(RGB, "PNG", pnginfo=(lambda i: (i.add_text("k", "v" * 99, zip=True), i)[1])(
        PngImagePlugin.PngInfo())),
    "apng": encode(RGB, "PNG", save_all=True, append_images=[RGB.rotate(90)]),
}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_files_are_answered_from_the_header_with_pils_size(name):
    kind, fmt, info = _header_verdict(PLAIN[name], complete=True)
    assert kind == "plain", name
    assert pil_verdict(PLAIN[name]) == (info.format, (info.width, info.height)) == (fmt, (45, 29))


@pytest.mark.parametrize("name", UNUSUAL)
def test_unusual_but_valid_files_go_to_pil_and_pass(name):
    assert _header_verdict(UNUSUAL[name], complete=True)[0] != "plain"
    assert (inspect_image(UNUSUAL[name]).width, inspect_image(UNUSUAL[name]).height) == (45, 29)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One structural mutation where a header check can go wrong: near the start, or a chunk/segment inserted."""
    d = bytearray(data)
    op = rng.randrange(6)
    reach = max(3, min(len(d), rng.choice([40, 160, 600, len(d)])))
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(reach)] = rng.randrange(256)
    elif op == 1:
        at = rng.randrange(2, reach)
        d[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    elif op == 2:
        at = rng.randrange(2, reach)
        del d[at:at + rng.randint(1, 9)]
    elif op == 3:
        d = d[:rng.randrange(len(d))]
    elif d[:1] == b"\x89":
        ctype = rng.choice([b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"gAMA", b"sRGB", b"pHYs", b"tRNS", b"cHRM", b"PLTE",
                            b"IHDR", b"IEND", b"acTL", b"eXIf", b"abCD", b"a\x01cd"])
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 4, 9, 32, 40])))
        if ctype in (b"zTXt", b"iCCP") and rng.random() < 0.5:
            body = b"k\0\0" + zlib.compress(b"\0" * rng.choice([100, 2 << 20]))
        d = bytearray(after_ihdr(bytes(d), png_chunk(ctype, body, None if rng.random() < 0.8 else 0)))
    else:
        body = rng.choice([b"JFIF\0\1", b"JFIF\0\1\1\0\1\0\1\0\0", b"ICC_PROFILE\0\1", b"MPF\0II*\0",
                           b"Photoshop 3.0\0008BIM", b"Adobe\0", b"Exif\0\0" + bytes(rng.randrange(256) for _ in range(24)),
                           bytes([12, 0, 9, 0, 9, 3, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0]), b"x" * 70, b""])
        marker = rng.choice([0xE0, 0xE1, 0xE2, 0xED, 0xEE, 0xFE, 0xDB, 0xC4, 0xC0, 0xC1, 0xC3, 0xDD, 0xD0, 0xC8])
        d = bytearray((after_soi if rng.random() < 0.5 else before_sos)(bytes(d), jpeg_segment(marker, body)))
    return bytes(d)


def test_every_file_the_header_answers_opens_in_pil_with_that_size():
    """Differential check over 4000 mutated files: the walk's ``plain`` verdict is PIL's, or the walk defers."""
    rng = random.Random(17)
    seeds = list(PLAIN.values())
    plain = 0
    for _ in range(4000):
        data = rng.choice(seeds)
        for _ in range(rng.randint(1, 2)):
            data = mutate(data, rng)
        kind, fmt, info = _header_verdict(data, complete=True)
        if kind == "plain":
            plain += 1
            assert pil_verdict(data) == (info.format, (info.width, info.height)), data[:80]
    assert plain > 400  # harmless mutations (a byte in pixel data, a valid chunk) still take the fast path


# ------------------------------------------------------------------------------- files that used to slip through

PNG = encode(RGB, "PNG")
JPEG = encode(RGB, "JPEG")
BOMB = zlib.compress(b"\0" * (64 << 20), 9)  # 64 MB of text or profile in ~64 KB


def twelve_bit_jpeg() -> bytes:
    at = JPEG.index(b"\xff\xc0")
    return JPEG[:at + 4] + b"\x0c" + JPEG[at + 5:]


SLIPPED = {
    # name: (file, what PIL says)
    "png chunk type garbage": (after_ihdr(PNG, png_chunk(b"\x00\xff\x10\x01", b"abc")), "broken PNG file"),
    "png ancillary chunk bad crc": (after_ihdr(PNG, png_chunk(b"gAMA", b"\0\0\xb1\x8f", crc=1)), "checksum"),
    "png gAMA too short": (after_ihdr(PNG, png_chunk(b"gAMA", b"\0")), "Truncated gAMA"),
    "png zTXt bomb": (after_ihdr(PNG, png_chunk(b"zTXt", b"comment\0\0" + BOMB)), "Decompressed data too large"),
    "png iTXt bomb": (after_ihdr(PNG, png_chunk(b"iTXt", b"comment\0\1\0\0\0" + BOMB)), "Decompressed data too large"),
    "png iCCP bomb": (after_ihdr(PNG, png_chunk(b"iCCP", b"icc\0\0" + BOMB)), "Decompressed data too large"),
    "png iCCP unknown compression": (after_ihdr(PNG, png_chunk(b"iCCP", b"icc\0\7" + zlib.compress(ICC))),
                                     "Unknown compression method"),
    "png IHDR filter method": (PNG[:27] + b"\1" + PNG[28:29] + struct.pack(">I", zlib.crc32(PNG[12:27] + b"\1" + PNG[28:29]))
                               + PNG[33:], "unknown filter category"),
    "jpeg 12-bit": (twelve_bit_jpeg(), "cannot handle 12-bit layers"),
    "jpeg bad DQT after the frame": (before_sos(JPEG, jpeg_segment(0xDB, b"\0" * 20)), "bad quantization table"),
    "jpeg EXIF XResolution text": (after_soi(JPEG, jpeg_segment(0xE1, exif_ifd0((0x0128, 3, 1, b"\2\0\0\0"),
                                                                             (0x011A, 2, 2, b"7\0\0\0")))),
                                   "index out of range"),  # PIL: float("7"[0]) / "7"[1]
    "jpeg ICC fragment without count": (after_soi(JPEG, jpeg_segment(0xE2, b"ICC_PROFILE\0")), "index out of range"),
}


@pytest.mark.parametrize("name", SLIPPED)
def test_files_pil_cannot_open_are_rejected_by_the_default_check_with_pils_reason(name, tmp_path):
    data, reason = SLIPPED[name]
    assert isinstance(pil_verdict(data), str)  # PIL (so LLaMA-Factory) refuses the file
    path = tmp_path / "x"
    path.write_bytes(data)
    for value in (data, path):  # bytes (copy, convert) and a file (link)
        with pytest.raises(SampleError, match=reason):
            inspect_image(value, "header")
    assert _open_image(path, decode=False).startswith("unreadable")  # mmdata validate says the same


def test_a_png_without_pixel_data_opens_in_pil_but_is_rejected():
    """PIL opens a PNG with no IDAT chunk (it finds no tile) and fails only in ``load``: the check loads it."""
    at = PNG.index(b"IDAT") - 4
    data = PNG[:at] + PNG[at + 12 + int.from_bytes(PNG[at:at + 4], "big"):]
    assert pil_verdict(data) == ("PNG", (45, 29))
    with pytest.raises(SampleError, match="cannot load this image"):
        inspect_image(data)


def test_text_chunks_after_the_pixel_data_need_a_decode_to_be_caught():
    """PIL reads chunks after IDAT only at the end of decoding: ``verify: header`` (open) passes the file,
    ``verify: decode`` refuses it; the header check's docstring says so."""
    iend = PNG.index(b"IEND") - 4
    data = PNG[:iend] + png_chunk(b"zTXt", b"comment\0\0" + BOMB) + PNG[iend:]
    assert inspect_image(data, "header").width == 45
    with pytest.raises(SampleError, match="Decompressed data too large"):
        inspect_image(data, "decode")


# ------------------------------------------------------------------------------- build and validate agree


def file_name(name: str) -> str:
    return name.replace(" ", "_").replace(";", "") + ".bin"


def hostile_images() -> dict[str, bytes]:
    images = {file_name(name): data for name, (data, _) in SLIPPED.items()}
    images.update({file_name(name): data for name, data in {**PLAIN, **UNUSUAL}.items()})
    images.update({"cut.png": PNG[: len(PNG) // 2], "cut.jpg": JPEG[: len(JPEG) // 2], "empty.png": b"",
                   "no-iend.png": PNG[:-12], "text.jpg": b"not an image", "webp.webp": encode(RGB, "WEBP"),
                   "cut.webp": encode(RGB, "WEBP")[:200], "gif.gif": encode(RGB, "GIF")})
    return images


@pytest.mark.filterwarnings("ignore::mmdata.errors.BuildWarning")
@pytest.mark.parametrize("mode", ["copy", "link"])
def test_a_build_writes_exactly_what_validate_accepts(tmp_path, mode):
    """Every written image validates, and a hand-made dataset over the same files gets image errors on exactly the
    records the build rejected for their image."""
    src = tmp_path / "src"
    src.mkdir()
    names = sorted(hostile_images())
    for name, data in hostile_images().items():
        (src / name).write_bytes(data)
    records = [{"messages": [{"role": "user", "content": "<image>What is it?"},
                             {"role": "assistant", "content": "A picture."}], "images": [name]} for name in names]
    (src / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "agree", "source": {"type": "jsonl", "path": "src/data.jsonl"},
                                                "images": {"mode": mode}, "output": {"dir": str(tmp_path / "out")}})
    result = mmdata.build(str(recipe), num_proc=1)
    rejects = [json.loads(line) for line in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    rejected = {names[r["position"]] for r in rejects}
    assert {r["reason"] for r in rejects} == {"image unreadable"}
    assert {file_name(n) for n in SLIPPED} | {"cut.png", "cut.jpg", "empty.png", "text.jpg", "cut.webp"} == rejected
    report = mmdata.validate(result.dataset_info)
    assert report.ok, report.format_text()

    (src / "dataset_info.json").write_text(json.dumps({"hand": {"file_name": "data.jsonl", "formatting": "sharegpt",
                                                               "columns": {"messages": "messages", "images": "images"},
                                                               "tags": {"role_tag": "role", "content_tag": "content",
                                                                        "user_tag": "user", "assistant_tag": "assistant",
                                                                        "system_tag": "system"}}}))
    report = mmdata.validate(src / "dataset_info.json", max_per_kind=1000)
    flagged = {names[p.record] for p in report.problems if p.code.startswith("image")}
    assert flagged == rejected, (flagged ^ rejected)


# ------------------------------------------------------------------------------- convert: thin images


@pytest.mark.parametrize(("size", "max_pixels"), [((3000, 2), 1000), ((2, 3000), 1000), ((6000, 1), 500),
                                                  ((3000, 2), 100_000), ((1, 1), 1), ((40, 30), 1000)])
def test_convert_fits_thin_images_into_max_pixels_with_sides_of_at_least_one_pixel(size, max_pixels):
    """3000x2 into 1000 pixels used to come out 1224x1 (over budget), which LLaMA-Factory, given the same
    image_max_pixels, would shrink to 1106x0 and fail on."""
    data, info = convert_image(encode(Image.new("RGB", size, (9, 99, 199)), "PNG"), max_pixels, "keep", 90)
    assert info.width >= 1 and info.height >= 1
    assert info.width * info.height <= max_pixels or (info.width, info.height) == size
    assert Image.open(io.BytesIO(data)).size == (info.width, info.height)
    assert lf_image_problem(info.width, info.height, max_pixels) is None


def test_fit_pixels_keeps_the_budget_and_the_old_size_where_nothing_is_clamped():
    rng = random.Random(3)
    for _ in range(20000):
        w, h, budget = rng.randint(1, 70000), rng.randint(1, 3000), rng.randint(1, 2_000_000)
        fw, fh = fit_pixels(w, h, budget)
        assert fw >= 1 and fh >= 1 and (fw * fh <= budget or (fw, fh) == (w, h))
        scale = (budget / (w * h)) ** 0.5
        if w * h > budget and int(w * scale) >= 1 and int(h * scale) >= 1:
            assert (fw, fh) == (int(w * scale), int(h * scale))


def test_validate_reports_images_llamafactory_cannot_shrink(tmp_path):
    (tmp_path / "thin.png").write_bytes(encode(Image.new("L", (1224, 1)), "PNG"))
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "<image>What?", "output": "A line.",
                                                     "images": ["thin.png"]}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "data.json",
                                                                  "columns": {"images": "images"}}}))
    assert "image-too-thin" not in {p.code for p in mmdata.validate(tmp_path).problems}
    report = mmdata.validate(tmp_path, image_max_pixels=1000)
    assert [p.code for p in report.errors] == ["image-too-thin"], report.format_text()
    assert image_info(tmp_path / "thin.png").width == 1224
