"""Image checks and writes: read what is needed to trust an image, and no more.

By default the original encoded bytes are written untouched. Verification opens the header (format, size) and, with
``verify: decode``, decodes the stream to catch truncation and corruption; for JPEG the decode runs in draft mode at
1/8 scale, which reads every entropy-coded byte at a fraction of the cost. ``convert`` is the only path that decodes
for real: EXIF orientation, mode fixes (CMYK, palette, 16-bit grayscale...), a ``max_pixels`` budget, re-encoding.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import SampleError

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.format, self.format.lower())


def inspect_image(data: bytes | Path, verify: str = "header") -> ImageInfo:
    """Format and size of encoded image bytes (or a file: only what the check needs is read); raises
    :class:`SampleError` if they are not a usable image.

    ``header``: a plain PNG/JPEG whose header parses and whose stream ends with its end marker (IEND / EOI, so a
    truncated download is caught) is accepted without decoding; anything else is decoded for the verdict.
    ``decode``: always decode (JPEG at 1/8 scale)."""
    if not (data.stat().st_size if isinstance(data, Path) else data):
        raise SampleError("image is empty (0 bytes)")
    if verify == "header":
        head, tail = _head_and_tail(data)
        fast = _plain_header(head)
        if fast is not None and _ends_cleanly(fast.format, tail):
            return fast
        verify = "decode"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
                info = ImageInfo(img.format or "UNKNOWN", img.width, img.height)
                if info.format not in EXTENSIONS:
                    raise SampleError(f"unsupported image format {info.format}: convert it to JPEG or PNG")
                if verify == "decode":
                    if img.format == "JPEG":
                        img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError(f"image too large (decompression bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise SampleError("not an image file (no known image format)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError...) for bad data
        raise SampleError(f"not a readable image ({type(e).__name__}: {e})") from None
    if info.width <= 0 or info.height <= 0:
        raise SampleError(f"image has no pixels ({info.width}x{info.height})")
    return info


_HEAD_BYTES = 64 << 10  # where a JPEG's frame header sits (after EXIF/ICC segments) in practice
_TAIL_BYTES = 1 << 10


def _head_and_tail(data: bytes | Path) -> tuple[bytes, bytes]:
    if isinstance(data, bytes):
        return data, data[-_TAIL_BYTES:]
    with open(data, "rb") as f:
        head = f.read(_HEAD_BYTES)
        f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
        return head, f.read()


def _ends_cleanly(fmt: str, tail: bytes) -> bool:
    """The stream's end marker is near the end (a few bytes of padding after it are common)."""
    return (b"IEND\xaeB`\x82" in tail) if fmt == "PNG" else (b"\xff\xd9" in tail[-64:])


def ends_cleanly(data: bytes | Path, fmt: str) -> bool:
    """False for a PNG or JPEG without its end marker (a cut-off file: decode it for the verdict); other formats
    have no cheap check and return True."""
    return fmt not in ("PNG", "JPEG") or _ends_cleanly(fmt, _head_and_tail(data)[1])


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3), (8, 4), (16, 4),
              (8, 6), (16, 6)}  # (bit depth, colour type) pairs PIL opens
_JPEG_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive: what PIL decodes


def _plain_header(data: bytes) -> ImageInfo | None:
    """Size of a well-formed PNG or JPEG read straight from its header (~50x cheaper than ``Image.open``).

    Only the plain cases are answered: a PNG whose IHDR has a valid CRC and a mode PIL opens, a JPEG whose frame header
    (baseline/extended/progressive) comes before the scan, both within PIL's pixel limit. Anything else returns None
    and goes through PIL, which gives the verdict and the error message.
    """
    width = height = 0
    fmt = ""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 33:
        if zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big") or (data[24], data[25]) not in _PNG_MODES:
            return None
        fmt, width, height = "PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    elif data[:3] == b"\xff\xd8\xff":
        i, n = 2, len(data)
        while i + 4 <= n and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF and i + 10 <= n and data[i + 9] in (1, 3, 4):
                fmt, height, width = "JPEG", int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
                break
            if marker == 0xDA or marker == 0xD9 or 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return None  # scan before frame, end of image, or a frame type PIL may not decode
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if length < 2:
                return None
            i += 2 + length
    limit = Image.MAX_IMAGE_PIXELS
    if not fmt or width <= 0 or height <= 0 or (limit is not None and width * height > limit):
        return None
    return ImageInfo(fmt, width, height)


def convert_image(data: bytes, max_pixels: int | None, fmt: str, quality: int) -> tuple[bytes, ImageInfo]:
    """Decode, apply EXIF orientation, normalise the mode, fit into ``max_pixels`` and re-encode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            source_format = img.format or "PNG"  # before exif_transpose: its copy has no format ("keep" kept none)
            img = ImageOps.exif_transpose(img)
            target = {"jpeg": "JPEG", "png": "PNG"}.get(fmt, source_format if source_format in ("JPEG", "PNG") else "PNG")
            img = _to_saveable_mode(img, target)
            if max_pixels and img.width * img.height > max_pixels:
                scale = math.sqrt(max_pixels / (img.width * img.height))
                size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
                img = img.resize(size, Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            if target == "JPEG":
                img.save(buf, format="JPEG", quality=quality, optimize=False)
            else:
                img.save(buf, format="PNG")
            return buf.getvalue(), ImageInfo(target, img.width, img.height)
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"cannot convert image ({type(e).__name__}: {e})") from None


def _to_saveable_mode(img: Image.Image, target: str) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (common in medical imaging): scale the actual range to 8 bits instead of clipping.
        lo, hi = img.getextrema()
        img = img.point(lambda v: (v - lo) * 255 / max(1, hi - lo)).convert("L")
    if target == "JPEG":
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img, mask=img.getchannel("A"))
            return background
        return img.convert("RGB") if img.mode not in ("RGB", "L") else img
    return img if img.mode in ("RGB", "RGBA", "L", "LA") else img.convert("RGBA" if "A" in img.mode else "RGB")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_new_image(path: Path, data: bytes) -> None:
    """Write an image of a task through a temporary name, so a reader never sees a half-written image (the folder is
    made on demand). A file left by a killed run is replaced whole, never written through, in case it is a hard link
    to someone else's file."""
    try:
        write_bytes_atomic(path, data)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)


def link_or_copy(source: Path, dest: Path, data: bytes | None = None) -> None:
    """Hard-link ``source`` to ``dest``; if that is impossible (other filesystem, no permission), write ``data`` (or
    copy the file when the bytes were never read)."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(source, tmp)
        os.replace(tmp, dest)
    except OSError:
        if data is None:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        else:
            write_bytes_atomic(dest, data)
