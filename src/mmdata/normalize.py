"""Turn one raw source row into a draft sample: the conversation plus references to its images.

Field mapping (the recipe's ``fields``, over the source's ``default_fields``):
- ``messages`` set and present in the row: the row already holds a conversation (JSON sources). ``prompt``, if
  given, is inserted at the start of the first user turn, after its leading ``<image>`` placeholders.
- otherwise the user turn is the rendered ``prompt`` (a ``{column}`` template; a list of prompts picks one per row,
  seeded) or, without a prompt, the ``question`` column; the assistant turn is the ``answer`` column.
- images come from ``image`` / ``images``; a user turn without ``<image>`` placeholders gets one per image prepended.
Any problem raises :class:`SampleError` with a reason; the pipeline turns it into a reject.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SampleError
from .recipes import Fields, Recipe
from .samples import IMAGE_PLACEHOLDER, encodable


@dataclass
class ImageRef:
    """An image before it is written: encoded bytes, or a file to copy or link (never a decoded picture)."""

    data: bytes | None = None
    path: Path | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if not stat.S_ISREG(os.stat(self.path).st_mode) and not self.path.is_dir():  # a FIFO would block forever
            raise SampleError(f"image path is not a regular file (pipe, socket or device): {self.path}",
                              kind="image unreadable")
        return self.path.read_bytes()


@dataclass
class Draft:
    messages: list[dict[str, str]]
    images: list[ImageRef] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    id: str | None = None


def effective_fields(recipe: Recipe, source_defaults: dict[str, str]) -> dict[str, str | None]:
    """The source's default column roles, overridden by what the recipe maps explicitly.

    An explicit ``answer`` means the recipe builds question/answer pairs, so a default ``messages`` role is dropped.
    """
    explicit = {role: column for role, column in recipe.fields.model_dump().items() if column}
    merged = {**source_defaults, **explicit}
    if "answer" in explicit and "messages" not in explicit:
        merged.pop("messages", None)
    return {role: merged.get(role) for role in Fields.model_fields}


def choose_prompt(recipe: Recipe, position: int) -> str | None:
    """The prompt for this row: the single one, or one of the list picked by a seeded hash of the row position."""
    if recipe.prompt is None or isinstance(recipe.prompt, str):
        return recipe.prompt
    digest = hashlib.sha256(f"{recipe.seed}:{position}".encode()).digest()
    return recipe.prompt[int.from_bytes(digest[:8], "big") % len(recipe.prompt)]


class _Row(dict):
    def __missing__(self, key: str) -> Any:
        raise SampleError(f"prompt uses {{{key}}} but the row has no column {key!r} (columns: {_columns(self)})")


def render(template: str, row: dict) -> str:
    """``str.format``-style ``{column}`` substitution; literal braces as ``{{``/``}}``; no attribute access, no
    format specs or conversions (the recipe refuses them; a template built in code is checked here)."""
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (not name.isidentifier() or spec or conversion):
            raise SampleError(f"prompt placeholder {{{name}{'!' + conversion if conversion else ''}"
                              f"{':' + spec if spec else ''}}} is not a plain column name")
    return template.format_map(_Row({k: "" if _is_missing(v) else v for k, v in row.items()}))


def _columns(row: dict) -> str:
    """The row's column names for a message; internal keys (``__split__``, ``__source__``) are not columns."""
    return ", ".join(repr(str(k)) for k in row if not str(k).startswith("__"))  # quoted: spaces in names show


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(row: dict, column: str | None, role: str) -> str:
    if column is None:
        raise SampleError(f"no column is mapped to {role}: set fields.{role} in the recipe")
    if column not in row:
        raise SampleError(f"fields.{role} is {column!r} but the row has no such column (columns: {_columns(row)})")
    value = row[column]
    if _is_missing(value):
        return ""
    if not isinstance(value, (str, int, float)):
        raise SampleError(f"column {column!r} ({role}) holds a {type(value).__name__}, expected text")
    return str(value)


def image_refs(value: Any, image_root: Path, allowed_roots: Sequence[Path] | None = None) -> list[ImageRef]:
    """Accept encoded bytes, HF ``{bytes, path}`` dicts, path strings (relative to ``image_root``) or lists of them.

    A path is taken literally (no ``~`` expansion) and must stay inside ``allowed_roots`` (default: ``image_root``)
    once ``..`` and symlinks are resolved; see :func:`contained_path`.
    """
    if _is_missing(value) or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in image_refs(item, image_root, allowed_roots)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [ImageRef(data=bytes(value))]
    if isinstance(value, dict):
        if value.get("bytes") is not None and not isinstance(value["bytes"], (bytes, bytearray, memoryview)):
            raise SampleError(f"image bytes is a {type(value['bytes']).__name__}, expected raw bytes",
                              kind="image value has a wrong type")
        if value.get("bytes"):
            return [ImageRef(data=bytes(value["bytes"]))]
        if value.get("path"):
            return image_refs(value["path"], image_root, allowed_roots)
        raise SampleError("image entry has neither bytes nor path")
    if isinstance(value, (str, os.PathLike)):
        text = str(value)
        if "\0" in text:
            raise SampleError("image path contains a NUL byte")
        return [ImageRef(path=record_path(text, image_root, allowed_roots or [image_root]))]
    if hasattr(value, "save"):  # a decoded PIL image from a source that decodes: re-encode losslessly
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return [ImageRef(data=buf.getvalue())]
    raise SampleError(f"image value is a {type(value).__name__}; expected bytes, a path or {{bytes, path}}",
                      kind="image value has a wrong type")


WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")  # C:\x, C:/x, \\server\share


URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def record_path(text: str, image_root: Path, roots: Sequence[Path]) -> Path:
    """The file a record's path names, confined to ``roots`` (:func:`contained_path`), with Windows paths handled.

    CSV and JSON files made on Windows write ``imgs\\a.jpg``. On POSIX a backslash is an ordinary file-name
    character, so such a path names one odd file that does not exist; if it does not, the same path with ``/`` is
    used when *that* exists (still confined), and otherwise the reject says the path uses backslashes. A Windows
    absolute path (``C:\\data\\a.jpg``) cannot be opened here at all: the reject says so and what to write instead.
    A name in the other Unicode normal form than the file's (macOS writes NFD) finds the file; a URL is a reject
    that says so.
    """
    if URL.match(text):
        raise SampleError(f"image {_shown(text)!r} is a URL: mmdata reads local files and image bytes, never the "
                          "network; download the images and write their paths in the records", kind="image is a URL")
    literal = image_root / text
    if not os.path.lexists(literal):  # a name typed on macOS (NFD) or elsewhere (NFC): the file as it is on disk
        for form in ("NFC", "NFD"):
            other = image_root / unicodedata.normalize(form, text)
            if other != literal and os.path.lexists(other):
                return contained_path(other, roots)
    if os.sep == "/" and ("\\" in text or WINDOWS_ABSOLUTE.match(text)) and not os.path.lexists(literal):
        if WINDOWS_ABSOLUTE.match(text):
            raise SampleError(
                f"image path {_shown(text)!r} is a Windows absolute path (drive letter or \\\\server share) that "
                "this machine cannot open: write paths relative to the data file's folder (e.g. imgs/a.jpg), or copy "
                "the images here and point source.image_root at them", kind="image file not found")
        posix = contained_path(image_root / text.replace("\\", "/"), roots)
        if posix.exists():
            return posix
        raise SampleError(f"image file not found: {_shown(str(literal))} (the path uses backslashes, the Windows "
                          f"separator; {_shown(str(posix))} does not exist either)", kind="image file not found")
    return contained_path(literal, roots)


def _video_path(value: Any, image_root: Path, allowed_roots: Sequence[Path] | None) -> str:
    """A record's video: a path naming an existing file inside the allowed roots, written absolute (videos are not
    copied into the build; LLaMA-Factory keeps an absolute media path as it is)."""
    if not isinstance(value, str) or not value.strip():
        raise SampleError(f"video value is a {type(value).__name__} {_shown(repr(value))}; expected a file path",
                          kind="video value has a wrong type")
    path = record_path(value, image_root, allowed_roots or [image_root])
    if not path.is_file():
        raise SampleError(f"video file not found: {_shown(str(path))}", kind="video file not found")
    return str(path)


def contained_path(path: Path, roots: Sequence[Path], what: str = "image path") -> Path:
    """``path`` with ``..`` and symlinks resolved, if that lies inside one of ``roots``; otherwise a reject.

    This is the whole read policy for paths that come from data: records from the internet may name
    ``../../home/me/photo.jpg``, an absolute path or a symlink out of the folder, and none of those is read unless
    the recipe lists the folder in ``source.allowed_roots``. The resolved path is what gets read, so a symlink cannot
    be swapped in after the check. ``what`` names the file in the message ("image path", "caption file", ...); the
    reject kind is ``<what> outside allowed roots``.
    """
    if not encodable(str(path)):  # half a UTF-16 pair: no file system can name it
        raise SampleError(f"{what} {_shown(str(path))!r} is not valid Unicode (a lone surrogate)",
                          kind=f"{what} is not valid Unicode")
    real = os.path.realpath(path)
    for root in roots:
        top = os.path.realpath(root)
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return Path(real)
    folder = os.path.dirname(real) or os.sep
    raise SampleError(
        f"{what} {_shown(str(path))!r} resolves outside the allowed folders ({', '.join(str(r) for r in roots)}); "
        f"if reading it is intended, allow its folder in the recipe: source.allowed_roots: [{folder}]",
        kind=f"{what} outside allowed roots",
    )


def _shown(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def normalize_row(row: dict, position: int, recipe: Recipe, fields: dict[str, str | None], image_root: Path,
                  allowed_roots: Sequence[Path] | None = None) -> Draft:
    if "__error__" in row:
        raise SampleError(row["__error__"], kind=row.get("__reason__"))
    if "__shape_error__" in row and not fields.get("answer"):  # plain columns, and the recipe maps none of them
        raise SampleError(row["__shape_error__"], kind="bad record shape")
    record_id = row.get(fields["id"]) if fields.get("id") else None
    images: list[ImageRef] = []
    for role in ("image", "images"):
        column = fields.get(role)
        if column and column in row:
            images += image_refs(row[column], image_root, allowed_roots)
    prompt = choose_prompt(recipe, position)
    messages_column = fields.get("messages")
    if messages_column and messages_column in row:
        turns = row[messages_column]
        if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
            raise SampleError(f"column {messages_column!r} (messages) holds a {type(turns).__name__}, expected a list "
                              "of {role, content} objects", kind="messages column is not a conversation")
        messages = [dict(m) for m in turns]
        if prompt is not None:
            _insert_prompt(messages, render(prompt, row))
    else:
        user = render(prompt, row) if prompt is not None else _text(row, fields.get("question"), "question")
        if prompt is None and not user.strip():  # with an image it would pass as a bare "<image>" turn
            raise SampleError(f"column {fields['question']!r} (question) is empty", kind="empty question")
        answer = _text(row, fields.get("answer"), "answer")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if images and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages if isinstance(m.get("content"), str)):
        first_user = next((m for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)), None)
        if first_user is None:
            raise SampleError("the record has images but no user turn to put their <image> placeholders in",
                              kind="invalid sample")
        first_user["content"] = IMAGE_PLACEHOLDER * len(images) + first_user["content"]
    _check_image_mapping(row, fields, messages, len(images))
    system = recipe.system
    if fields.get("system") and not _is_missing(row.get(fields["system"])) and row.get(fields["system"]):
        system = str(row[fields["system"]])
    if system and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    videos = row.get("videos") if messages_column and "videos" in row else None
    videos = [_video_path(v, image_root, allowed_roots) for v in (videos if isinstance(videos, list) else
                                                                    [videos] if videos else [])]
    return Draft(messages=messages, images=images, videos=videos,
                 id=None if _is_missing(record_id) else str(record_id))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


def _check_image_mapping(row: dict, fields: dict, messages: list[dict], n_images: int) -> None:
    """An unmapped key that holds an image, where placeholders do not match the images or where no image column is
    in the row at all: say which key to map.

    Without this the reject reads "1 <image> placeholder(s) but 0 image(s)", true and useless, and a record whose
    image column is misnamed (``fields.image: imagepath`` for ``image_path``, or a CSV whose column is not the
    default ``image``) with a ``prompt`` would be written as a text-only record, its image silently lost. A row
    that lacks an image column and holds nothing image-like (LLaVA's text-only records) is text-only by design.
    Other mismatches are left to the sample check, which explains them.
    """
    text = "".join(m["content"] for m in messages if isinstance(m.get("content"), str))
    n_tags = text.count(IMAGE_PLACEHOLDER)
    no_image_column = not any(fields.get(role) in row for role in ("image", "images") if fields.get(role))
    if n_tags == n_images and not (n_images == 0 and no_image_column):
        return
    mapped = {c for c in fields.values() if c} | {"messages", "images", "videos"}
    for key, value in row.items():
        if key in mapped or str(key).startswith("__"):
            continue
        looks = _looks_like_image(value)
        if looks:
            role = "images" if looks == "list" else "image"
            problem = (f"{n_tags} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s)" if n_tags != n_images
                       else f"no image: fields.{role} is {fields[role]!r}, which the row lacks" if fields.get(role)
                       else f"no image: no column is mapped to fields.{role}")
            raise SampleError(
                f"{problem}: key {key!r} looks like the image ({_preview(value)}) but no field maps it; map it in "
                f"the recipe with fields.{role}: {key}", kind="image key not mapped")


def _looks_like_image(value: Any) -> str | None:
    """"one" or "list" if ``value`` is an image path (by suffix), image bytes, an HF image dict, or a list of them."""
    if isinstance(value, (list, tuple)):
        return "list" if value and all(_looks_like_image(v) == "one" for v in value) else None
    if isinstance(value, str):
        stripped = value.strip()
        ok = 0 < len(stripped) < 4096 and "\n" not in stripped and stripped.lower().endswith(IMAGE_SUFFIXES)
        return "one" if ok else None
    if isinstance(value, (bytes, bytearray)):
        return "one" if bytes(value[:12]).startswith(_IMAGE_MAGIC) or value[8:12] == b"WEBP" else None
    if isinstance(value, dict) and set(value) <= {"bytes", "path"} and (value.get("bytes") or value.get("path")):
        return "one"
    return None


def _preview(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}, first {_preview(value[0])}"
    if isinstance(value, str):
        return repr(_shown(value, 80))
    return f"a {type(value).__name__}"


def _insert_prompt(messages: list[dict], prompt: str) -> None:
    for m in messages:
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            content = m["content"]
            head = ""
            while content.startswith(IMAGE_PLACEHOLDER):
                head += IMAGE_PLACEHOLDER
                content = content[len(IMAGE_PLACEHOLDER):]
            m["content"] = head + prompt + ("\n" + content if content.strip() else "")
            return
