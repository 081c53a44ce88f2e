"""The record checks of one local entry, one record at a time with bounded state: types per column, the
conversation rules, media files, token lengths, and the shapes of the files a folder holds."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO

from .. import lfdata
from ..errors import SampleError
from ..images import image_info
from ..samples import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, encodable, lf_conversation_problems
from ..tokens import IMAGE_MAX_PIXELS, TokenBudget, lf_image_problem
from .entries import closest
from .problems import Problem, Severity, ValidationReport

MEDIA_COLUMNS = ("images", "videos", "audios")

_MAX_TRACKED_KEYS = 1000
_MAX_CACHED_IMAGES = 10000

# --------------------------------------------------------------------------------------------------- records


def _json_type(value: object) -> str | None:
    """The arrow-relevant type of a JSON value: ints and floats unify, ``None`` fits anything, lists by element."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        inner = next((t for t in map(_json_type, value) if t is not None), None)
        return f"list of {inner}" if inner else "list"
    return "object"


def _types_compatible(a: str, b: str) -> bool:
    return a == b or (a.startswith("list") and b.startswith("list") and "list" in (a, b))


class _EntryChecker:
    """Checks the records of one local entry, one at a time, keeping only bounded state."""

    def __init__(self, name: str, attr: lfdata.DatasetAttr, media_dir: Path, report: ValidationReport,
                 budget: TokenBudget | None, check_images: bool, decode_images: bool,
                 image_max_pixels: int = IMAGE_MAX_PIXELS):
        self.name, self.attr, self.media_dir, self.report = name, attr, media_dir, report
        self.budget, self.check_images, self.decode_images = budget, check_images, decode_images
        self.image_max_pixels = image_max_pixels
        self.token_sink: IO[str] | None = None  # --record-tokens: one line per record
        self.types: dict[str, tuple[str, int]] = {}
        self.keys: set[str] = set()
        self.sizes: dict[str, tuple[int, int] | str] = {}
        self.sharegpt = attr.formatting in ("sharegpt", "openai")
        self.pretraining = not self.sharegpt and not attr.column("response") and not attr.ranking
        self.roles = {attr.tag(t): role for t, role in lfdata.TAG_ROLES.items() if attr.tag(t) is not None}

    def problem(self, index: int | None, severity: Severity, message: str, fix: str, code: str,
                file: str | None = None) -> None:
        self.report.add(Problem(self.name, index, severity, message, fix, code, file))

    def check(self, index: int, record: object, file: str | None) -> None:
        if not isinstance(record, dict):
            self.problem(index, "error", f"record is {type(record).__name__}, expected an object",
                         "every record must be a JSON object", "not-an-object", file)
            return
        self._check_types(index, record, file)
        where = _lone_surrogate(record)
        if where is not None:
            self.problem(index, "error", f"{where} holds a lone UTF-16 surrogate (an escape such as \\ud83d: half of a "
                         "character): datasets cannot load the file (pyarrow: 'The surrogate pair in string is "
                         "invalid')", "replace it with U+FFFD or remove it (mmdata build writes U+FFFD)",
                         "bad-unicode", file)
        if not self._check_shape(index, record, file):
            return
        try:
            turns, images, videos = lfdata.to_turns(record, self.attr)
        except ValueError as e:
            self.problem(index, "error", str(e), "fix the record's structure", "bad-record", file)
            return
        if not self.pretraining:
            self._check_conversation(index, turns, images, videos, file)
        sizes = self._check_media(index, images, videos, file)
        if self.budget is not None and sizes is not None:
            tokens = self.budget.add(turns, sizes, record=index)
            if self.token_sink is not None:
                self.token_sink.write(json.dumps({"dataset": self.name, "index": index, "tokens": tokens}) + "\n")
            cutoff = self.budget.cutoff_len
            if cutoff is not None and tokens > cutoff:
                self.problem(index, "warning", f"{tokens} tokens ({self.budget.counter.label.split(' (')[0]}) "
                             f"exceed cutoff_len {cutoff}: LLaMA-Factory truncates the record, and a cut inside "
                             "image tokens fails with 'Image features and image tokens do not match'",
                             "raise cutoff_len, lower image_max_pixels or shorten the record", "over-cutoff", file)

    def _check_types(self, index: int, record: dict, file: str | None) -> None:
        for key, value in record.items():
            if len(self.keys) < _MAX_TRACKED_KEYS:
                self.keys.add(key)
            kind = _json_type(value)
            if kind is None:
                continue
            first = self.types.get(key)
            if first is None:
                if len(self.types) < _MAX_TRACKED_KEYS:
                    self.types[key] = (kind, index)
            elif not _types_compatible(first[0], kind):
                self.problem(index, "error", f"column {key!r} is a {kind} here but a {first[0]} in record {first[1]}"
                             ": datasets/pyarrow cannot load a column whose type changes",
                             f"make {key!r} a {first[0]} in every record (e.g. a one-item list, not a bare string)"
                             if first[0].startswith("list") else f"make {key!r} the same type in every record",
                             "type-change", file)
                if kind.startswith("list") and not first[0].startswith("list"):
                    self.types[key] = (kind, index)  # report each change once, not every row after it

    def _check_shape(self, index: int, record: dict, file: str | None) -> bool:
        """The fields LLaMA-Factory indexes directly (a miss is a KeyError or a dropped record); False stops here."""
        attr = self.attr
        if self.sharegpt:
            column = attr.column("messages") or ""
            messages = record.get(column)
            if not isinstance(messages, list):
                keys = ", ".join(sorted(record)) or "none"
                guess = next((k for k in record if isinstance(record[k], list) and record[k]
                              and isinstance(record[k][0], dict)), None)
                fix = (f'set "columns": {{"messages": "{guess}", ...}} in the entry' if guess
                       else f"give every record a {column!r} list of messages")
                self.problem(index, "error", f"no {column!r} messages list (record keys: {keys})", fix,
                             "missing-column", file)
                return False
            role_tag, content_tag = attr.tag("role_tag"), attr.tag("content_tag")
            for i, m in enumerate(messages):
                if not isinstance(m, dict):
                    continue  # to_turns reports it
                if role_tag not in m or content_tag not in m:
                    keys = sorted(m)
                    fix = ('add "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", '
                           '"assistant_tag": "assistant", "system_tag": "system"} to the entry'
                           if {"role", "content"} <= set(m) else
                           f"give every message {role_tag!r} and {content_tag!r} keys, or set tags.role_tag/content_tag")
                    self.problem(index, "error", f"message {i} has no {role_tag!r}/{content_tag!r} key (it has "
                                 f"{', '.join(keys)}): LLaMA-Factory raises KeyError", fix, "message-keys", file)
                    return False
                role = m[role_tag]
                if not isinstance(role, str) or role not in self.roles:
                    known = ", ".join(f"{t}={attr.tag(t)!r}" for t in lfdata.TAG_ROLES if attr.tag(t) is not None)
                    hint = _guess_tag(role)
                    fix = (f'set "tags": {{..., "{hint}": "{role}"}} in the entry' if hint
                           else f"use one of the entry's role tags ({known})")
                    what = ("LLaMA-Factory fails on it (KeyError in its openai converter)"
                            if attr.formatting == "openai" else "LLaMA-Factory skips the whole record")
                    self.problem(index, "error", f"message {i} has role {role!r}, which is none of the entry's tags "
                                 f"({known}): {what}", fix, "unknown-role", file)
                    return False
        else:
            names = [attr.column(c) for c in ("prompt", "query") if attr.column(c)]
            if names and not any(n in record for n in names):
                self.problem(index, "error", f"none of {', '.join(map(repr, names))} in the record (keys: "
                             f"{', '.join(sorted(record))})",
                             'map your fields in "columns" (e.g. "prompt": "question", "response": "answer"), or set '
                             '"formatting": "sharegpt" for message lists', "missing-column", file)
                return False
        return True

    def _check_conversation(self, index: int, turns: list, images: list, videos: list, file: str | None) -> None:
        for i, (role, content) in enumerate(turns):
            if role == "function" and not _is_tool_call(content):
                self.problem(index, "error", f"message {i} is a function call whose content is not JSON with "
                             "'name' and 'arguments' (or a list of such): LLaMA-Factory fails on it ('Invalid JSON "
                             "format in function message' or KeyError 'arguments')",
                             'write it as {"name": ..., "arguments": {...}}', "conversation", file)
        for message in lf_conversation_problems(turns, len(images), len(videos)):
            code = "placeholder-count" if "placeholder" in message else "conversation"
            head, sep, tail = message.partition(": ")
            fix = tail if sep else "fix the record so LLaMA-Factory neither drops nor rejects it"
            if code == "placeholder-count":
                fix = (f"{tail}; if a {IMAGE_PLACEHOLDER} is literal text, escape or remove it: LLaMA-Factory treats "
                       f"every {IMAGE_PLACEHOLDER} as a placeholder" if sep else
                       f"put one {VIDEO_PLACEHOLDER} in the text per video")
            self.problem(index, "error", head if sep else message, fix, code, file)
        for i, (role, content) in enumerate(turns):
            if not isinstance(content, str):
                continue
            for tag in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                if tag not in content:
                    continue
                if role in ("assistant", "function"):
                    self.problem(index, "warning", f"message {i} ({role}) contains {tag}: a model cannot answer with "
                                 "media, so this is probably literal text that LLaMA-Factory will replace by "
                                 "vision tokens", f"move the placeholder to the user turn, or escape the literal "
                                 f"text (e.g. &lt;{tag[1:-1]}&gt;)", "placeholder-in-answer", file)
                elif _in_code(content, tag):
                    self.problem(index, "warning", f"message {i} has {tag} inside `code`: probably literal text, "
                                 "but LLaMA-Factory treats it as a placeholder", "escape or remove the literal text",
                                 "placeholder-in-code", file)

    def _check_media(self, index: int, images: list, videos: list, file: str | None) -> list | None:
        """Image sizes for the token budget (``None`` when one is unknown); reports missing/unreadable media."""
        sizes: list[tuple[int, int]] | None = []
        for image in images:
            path = image.get("path") if isinstance(image, dict) else image
            if isinstance(image, dict) and image.get("bytes"):
                sizes = None  # embedded bytes: LLaMA-Factory decodes them; nothing on disk to check
                continue
            if not isinstance(path, str) or not path:
                self.problem(index, "error", f"image {image!r} is not a path", "list image paths as strings",
                             "bad-image", file)
                sizes = None
                continue
            if not self.check_images:
                sizes = None
                continue
            info = self._image_info(path)
            if isinstance(info, str):
                self.problem(index, "error" if not info.startswith("found only") else "warning",
                             f"image {path!r}: {info}", _media_fix(info, self.media_dir), _media_code(info), file)
                if not info.startswith("found only"):
                    sizes = None
            else:
                problem = lf_image_problem(*info, self.image_max_pixels)
                if problem:
                    self.problem(index, "error", f"image {path!r}: {problem}", "drop the record, pad or crop the "
                                 "image, or rebuild with images: {mode: convert, max_pixels: P} and the same "
                                 "image_max_pixels P (a thin image is then fitted safely)", "image-too-thin", file)
                if sizes is not None:
                    sizes.append(info)
        for video in videos:
            if isinstance(video, str) and self.check_images and not self._resolve(video)[1]:
                self.problem(index, "error", f"video {video!r}: missing", _media_fix("missing", self.media_dir),
                             "video-missing", file)
        return sizes

    def _resolve(self, path: str) -> tuple[Path, bool]:
        joined = self.media_dir / path  # an absolute path replaces media_dir, as in os.path.join
        return joined, joined.is_file()

    def _image_info(self, path: str) -> tuple[int, int] | str:
        if path in self.sizes:
            return self.sizes[path]
        joined, exists = self._resolve(path)
        if not exists and joined.is_dir():
            info: tuple[int, int] | str = (f"unreadable: {joined} is a folder, not an image (LLaMA-Factory: "
                                           "IsADirectoryError)")
        elif not exists:
            info = ("found only relative to the current directory, not to media_dir"
                    if os.path.isfile(path) else f"missing (looked for {joined})")
            if info.startswith("found only"):
                size = _open_image(Path(path), self.decode_images)
                info = info if not isinstance(size, str) else size
        else:
            info = _open_image(joined, self.decode_images)
        if len(self.sizes) >= _MAX_CACHED_IMAGES:
            self.sizes.clear()
        self.sizes[path] = info
        return info

    def finish(self, records: int) -> None:
        """Entry-level findings that need all records: configured columns never seen, media fields never mapped."""
        if not records:
            return
        attr = self.attr
        for col in ("messages", "images", "videos", "system", "tools", "history") + (
                ("chosen", "rejected") if attr.ranking else ()):
            name = attr.column(col)
            if name and name not in self.keys and not (col == "messages" and not self.sharegpt):
                close = closest(name, self.keys - {v for v in attr.columns.values() if v})
                fix = (f'set "columns": {{"{col}": "{close[0]}"}}' if close else f'remove columns.{col} or add '
                       f'the {name!r} field to the records')
                self.problem(None, "error",
                             f"columns.{col} is {name!r} but no record has that field: LLaMA-Factory raises "
                             f"KeyError {name!r}", fix, "missing-column")
        mapped = {v for v in attr.columns.values() if v}
        for key in sorted(self.keys - mapped):
            if key in MEDIA_COLUMNS or key in ("image", "video"):
                col = key if key in MEDIA_COLUMNS else key + "s"
                self.problem(None, "error", f"records have a {key!r} field but the entry does not map it: "
                             "LLaMA-Factory ignores it, so the model never sees those media",
                             f'add "{col}": "{key}" to the entry\'s "columns"', "unmapped-column")


def _lone_surrogate(value: object, where: str | None = None) -> str | None:
    """Which field of a record (``messages[0].content``) holds a string with a lone surrogate, or None. Python's
    ``json`` reads ``"\\ud83d"`` into one; pyarrow, LLaMA-Factory's loader, refuses it."""
    if isinstance(value, str):
        return None if encodable(value) else where or "the record"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not encodable(key):
            return f"a key of {where or 'the record'}"
        found = _lone_surrogate(item, f"{where}[{key}]" if isinstance(key, int) else
                                key if where is None else f"{where}.{key}")
        if found is not None:
            return found
    return None


def _guess_tag(role: object) -> str | None:
    role = str(role).lower()
    for tag, words in (("user_tag", ("user", "human")), ("assistant_tag", ("assistant", "gpt", "bot", "model")),
                       ("system_tag", ("system",)), ("observation_tag", ("observation", "tool")),
                       ("function_tag", ("function", "function_call"))):
        if role in words:
            return tag
    return None


def _is_tool_call(content: object) -> bool:
    """What LLaMA-Factory's function formatter accepts: JSON of one ``{name, arguments}`` object or a list of them."""
    try:
        calls = json.loads(content) if isinstance(content, str) else None
    except ValueError:
        return False
    calls = calls if isinstance(calls, list) else [calls]
    return bool(calls) and all(isinstance(c, dict) and "name" in c and "arguments" in c for c in calls)


_CODE_SPAN = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def _in_code(text: str, tag: str) -> bool:
    """True when ``tag`` occurs inside a Markdown code span or block."""
    return any(tag in m.group() for m in _CODE_SPAN.finditer(text))


def _open_image(path: Path, decode: bool) -> tuple[int, int] | str:
    """``(width, height)``, or a reason. The build's own check (:func:`mmdata.images.image_info`, ``images.verify:
    header`` unless ``decode``), so validate accepts whatever a build writes and a build writes whatever validate
    accepts: PIL opens the file and a PNG/JPEG ends with its end marker; one without it, any other format and a
    JPEG frame type PIL may not decode are decoded, as LLaMA-Factory would (PIL's ``verify`` is stricter than its
    decoder and would flag files that train fine). Only the build's own policy differs: it also refuses formats it
    cannot name a file for and images over PIL's decompression-bomb warning size."""
    try:
        info = image_info(path, "decode" if decode else "header")
    except FileNotFoundError:
        return f"missing (looked for {path})"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    except SampleError as e:
        return f"unreadable: {e}"
    return info.width, info.height


def _media_code(info: str) -> str:
    return {"missing": "image-missing", "found": "image-outside-media-dir"}.get(info.split()[0], "image-unreadable")


def _media_fix(info: str, media_dir: Path) -> str:
    if info.startswith("missing"):
        return (f"paths are relative to media_dir (default: the dataset_info.json folder, {media_dir}); fix the "
                "path, add the file, or pass --media-dir as you will pass media_dir to LLaMA-Factory")
    if info.startswith("found only"):
        return "make the path relative to the dataset folder or absolute: LLaMA-Factory falls back to the current " \
               "directory only when run from here"
    return "re-encode or replace the file (PIL cannot read it, so LLaMA-Factory cannot either)"

_JSON_CHUNK = 10 << 20


class _FileShape:
    """The columns of one data file and where each first holds a typed value (not null, not an empty list)."""

    def __init__(self, path: Path, shown: str):
        self.path, self.shown = path, shown
        self.records = 0
        self.keys: set[str] = set()
        self.first_typed: dict[str, int] = {}
        self.chunked = lfdata.file_type(path) == "json" and not _is_json_array(path)

    def add(self, record: object) -> None:
        if isinstance(record, dict) and len(self.keys) < _MAX_TRACKED_KEYS:
            self.keys.update(record)
            for key, value in record.items():
                if key not in self.first_typed and value is not None and value != []:
                    self.first_typed[key] = self.records
        self.records += 1

    def typed_in_first_chunk(self, key: str) -> bool:
        at = self.first_typed.get(key)
        if at is None:
            return False
        return at * self.path.stat().st_size / max(self.records, 1) < _JSON_CHUNK


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"["


def _check_file_shapes(checker: _EntryChecker, shapes: list[_FileShape]) -> None:
    """What makes ``load_dataset("json", ...)`` fail with DatasetGenerationCastError, or pass only in some file order:
    files of a folder with different columns, and a first chunk where a column is only nulls or empty lists."""
    shapes = [s for s in shapes if s.records]
    all_keys = set().union(*(s.keys for s in shapes)) if shapes else set()
    for shape in shapes if len(shapes) > 1 else []:
        missing = sorted(all_keys - shape.keys)
        if missing:
            checker.problem(None, "error", f"no record of this file has {', '.join(map(repr, missing))}, which other "
                            "files of the folder have: datasets refuses files with different columns "
                            "(DatasetGenerationCastError)", "give every record the same fields (e.g. \"images\": [] "
                            "for a record without images); mmdata build writes them so", "columns-differ",
                            shape.shown)
    typed = {k for s in shapes for k in s.first_typed}
    lists = {k for k, (kind, _) in checker.types.items() if kind.startswith("list")}
    # datasets types each column from the first chunk of the file LLaMA-Factory lists first (os.listdir order)
    listed = os.listdir(shapes[0].path.parent) if len(shapes) > 1 else []
    first = min(shapes, key=lambda s: listed.index(s.path.name) if s.path.name in listed else len(listed)) \
        if shapes else None
    for shape in shapes:
        if not shape.chunked:
            continue
        untyped = sorted(k for k in typed & shape.keys if not shape.typed_in_first_chunk(k))
        if untyped:
            what = "empty lists" if set(untyped) <= lists else "nulls or empty lists"
            problem = (f"the first 10 MB of this file hold only {what} in {', '.join(map(repr, untyped))}: datasets "
                       "types a column from the first chunk it reads (of the file LLaMA-Factory lists first, in "
                       "os.listdir order) and then fails to cast the records that have values "
                       "(DatasetGenerationCastError)")
            fix = ("start the file with a record that has them (mmdata build starts every shard so), or write one "
                   "JSON array file")
            if shape is first:
                checker.problem(None, "error", problem, fix, "untyped-first-chunk", shape.shown)
            else:  # loads here, but another filesystem may list this file first
                checker.problem(None, "warning", f"{problem}. It loads here only because os.listdir lists "
                                f"{first.shown} first", fix, "untyped-first-chunk", shape.shown)
