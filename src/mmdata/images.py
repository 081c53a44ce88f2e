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
import warnings
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


def inspect_image(data: bytes, verify: str = "decode") -> ImageInfo:
    """Format and size of encoded image bytes; raises :class:`SampleError` if they are not a usable image."""
    if not data:
        raise SampleError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
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


def convert_image(data: bytes, max_pixels: int | None, fmt: str, quality: int) -> tuple[bytes, ImageInfo]:
    """Decode, apply EXIF orientation, normalise the mode, fit into ``max_pixels`` and re-encode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            source_format = img.format or "PNG"
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


def link_or_copy(source: Path, dest: Path, data: bytes) -> None:
    """Hard-link ``source`` to ``dest``; if that is impossible (other filesystem, no permission), write ``data``."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(source, tmp)
        os.replace(tmp, dest)
    except OSError:
        write_bytes_atomic(dest, data)
