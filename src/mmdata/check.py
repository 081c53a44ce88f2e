"""``mmdata validate``: lint an existing LLaMA-Factory dataset before training, hand-made ones included.

Everything LLaMA-Factory would reject, crash on or silently drop, found before a GPU is rented: unknown or misspelled
``dataset_info.json`` keys, wrong ``formatting``/``columns``/``tags``, missing data files, folders LLaMA-Factory cannot
load, records whose roles or ``<image>`` placeholders break the conversation rules, missing or unreadable images,
columns whose JSON type changes between rows (pyarrow refuses those), undefined dataset names, and (with
``--cutoff-len``) records longer than the cutoff.

Design: records stream through :mod:`mmdata.lfdata` (LLaMA-Factory's reading rules, one implementation) and the
conversation rules are :func:`mmdata.samples.conversation_problems` (the same rules a build applies). Memory stays
constant: per entry we keep the first type of each column, a bounded image-size cache, a token histogram and at most
``max_per_kind`` problems of each kind (the rest are counted). Images are opened for their header and verified, not
decoded, unless ``decode_images`` asks for it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Literal

from . import lfdata
from .errors import DatasetInfoError, SampleError
from .images import image_info
from .layout import MANIFEST, manifest_dataset_info, read_manifest
from .samples import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, conversation_problems, encodable, utf8_text
from .tokens import IMAGE_MAX_PIXELS, TokenBudget, lf_image_problem, token_counter

Severity = Literal["error", "warning", "info"]

# Keys LLaMA-Factory once read and now ignores: not worth an error.
LEGACY_ENTRY_KEYS = {"file_sha1", "revision"}
MEDIA_COLUMNS = ("images", "videos", "audios")
_SHAREGPT_ONLY = {"messages"}
_ALPACA_ONLY = {"prompt", "query", "response", "history"}
_CORE_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag")
_MAX_TRACKED_KEYS = 1000
_MAX_CACHED_IMAGES = 10000
# Schema errors after which the records cannot be read the way LLaMA-Factory would.
_UNREADABLE = {"entry-type", "no-source", "bad-value", "bad-formatting"}


@dataclass(frozen=True)
class Problem:
    """One finding: which entry and record (0-based, across the entry's files in order), how bad, what and how to fix.

    ``code`` is a short stable kind (``placeholder-count``, ``image-missing``...) for grouping and ``--json`` users.
    """

    entry: str | None
    record: int | None
    severity: Severity
    message: str
    fix: str = ""
    code: str = ""
    file: str | None = None

    def format(self) -> str:
        where = self.entry or "dataset_info.json"
        if self.record is not None:
            where += f" record {self.record}"
        if self.file:
            where += f" ({self.file})"
        text = f"{self.severity:<7} {where}: {self.message}"
        return text + (f"\n        fix: {self.fix}" if self.fix else "")


@dataclass
class EntrySummary:
    """What was checked of one entry."""

    records: int = 0
    skipped: str | None = None
    budget: TokenBudget | None = None


@dataclass
class ValidationReport:
    """All problems of one ``dataset_info.json``; ``ok`` when none is an error."""

    dataset_info: str
    problems: list[Problem] = field(default_factory=list)
    entries: dict[str, EntrySummary] = field(default_factory=dict)
    suppressed: Counter = field(default_factory=Counter)  # (entry, code) -> problems not kept
    max_per_kind: int = 20
    _kept: Counter = field(default_factory=Counter, repr=False)
    _suppressed_severity: dict = field(default_factory=dict, repr=False)

    def add(self, problem: Problem) -> None:
        """Keep the first ``max_per_kind`` problems of each (entry, code); count the rest."""
        key = (problem.entry, problem.code)
        if self._kept[key] < self.max_per_kind:
            self._kept[key] += 1
            self.problems.append(problem)
        else:
            self.suppressed[key] += 1
            self._suppressed_severity[key] = problem.severity

    def count(self, severity: Severity) -> int:
        shown = sum(1 for p in self.problems if p.severity == severity)
        return shown + sum(n for k, n in self.suppressed.items() if self._suppressed_severity.get(k) == severity)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return self.count("error") == 0

    def to_dict(self) -> dict:
        return {
            "dataset_info": self.dataset_info, "ok": self.ok,
            "counts": {s: self.count(s) for s in ("error", "warning", "info")},
            "entries": {n: {"records": e.records, "skipped": e.skipped,
                            "tokens": e.budget.summary() if e.budget and e.budget.count else None}
                        for n, e in self.entries.items()},
            "problems": [asdict(p) for p in self.problems],
            "suppressed": [{"entry": e, "code": c, "count": n} for (e, c), n in self.suppressed.items()],
        }

    def format_text(self) -> str:
        lines = [f"mmdata validate {self.dataset_info}"]
        skipped = [p.entry for p in self.problems if p.code == "skipped"]
        for p in self.problems:
            if p.code not in ("skipped", "tokens"):  # both are summarised below
                lines.append(p.format())
        if skipped:
            lines.append(f"info    {len(skipped)} hub/script entries not checked offline: {', '.join(skipped)}")
        for (entry, code), n in self.suppressed.items():
            lines.append(f"        ... and {n} more {code!r} problem(s) in {entry} (use --json or --max-problems)")
        for name, e in self.entries.items():
            if e.skipped or not e.records:
                continue
            line = f"{name}: {e.records} record(s) checked"
            if e.budget is not None and e.budget.count:
                line += "; " + e.budget.format()
                if e.budget.over:
                    line += f" (set cutoff_len {e.budget.suggested_cutoff()})"
            lines.append(line)
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.count('error')} error(s), {self.count('warning')} warning(s), "
                     f"{self.count('info')} note(s)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- entries


def _closest(word: str, choices, n: int = 1) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def _did_you_mean(word: str, choices) -> str:
    match = _closest(word, choices)
    return f"did you mean {match[0]!r}?" if match else ""


def lint_entry(name: str, entry: object) -> list[Problem]:
    """Schema problems of one ``dataset_info.json`` entry (no file access): keys, formatting, columns, tags."""
    if not isinstance(entry, dict):
        return [Problem(name, None, "error", f"entry is {type(entry).__name__}, expected an object",
                        'write it as {"file_name": "data.json", ...}', "entry-type")]
    out: list[Problem] = []
    for key in entry:
        if key in lfdata.ENTRY_KEYS:
            continue
        if key in LEGACY_ENTRY_KEYS:
            out.append(Problem(name, None, "warning", f"key {key!r} is ignored by LLaMA-Factory", "remove it",
                               "unknown-key"))
            continue
        hint = _did_you_mean(key, lfdata.ENTRY_KEYS)
        out.append(Problem(name, None, "error" if hint else "warning",
                           f"unknown key {key!r}: LLaMA-Factory ignores it, so its setting is lost",
                           f"{hint} rename it" if hint else f"remove it; known keys: {', '.join(sorted(lfdata.ENTRY_KEYS))}",
                           "unknown-key"))
    if not any(k in entry for k in lfdata.SOURCE_KEYS):
        out.append(Problem(name, None, "error", "no data source: LLaMA-Factory raises KeyError 'file_name'",
                           'add "file_name" (a file or folder next to dataset_info.json) or "hf_hub_url"',
                           "no-source"))
    for key in lfdata.SOURCE_KEYS:
        if key in entry and not (isinstance(entry[key], str) and entry[key]):
            out.append(Problem(name, None, "error", f"{key} is {entry[key]!r}, expected a non-empty string",
                               f'e.g. "{key}": "data.json"', "bad-value"))
    formatting = entry.get("formatting", "alpaca")
    if formatting not in lfdata.FORMATTINGS:
        hint = _did_you_mean(str(formatting), lfdata.FORMATTINGS)
        out.append(Problem(name, None, "error", f"formatting {formatting!r} is unknown (LLaMA-Factory: "
                           f"'Dataset converter {formatting} not found')",
                           f"{hint} use one of {', '.join(lfdata.FORMATTINGS)}".strip(), "bad-formatting"))
    for key, kind in (("ranking", bool), ("num_samples", int), ("split", str), ("subset", str), ("folder", str)):
        if key in entry and entry[key] is not None and (not isinstance(entry[key], kind) or
                                                         (kind is int and isinstance(entry[key], bool))):
            out.append(Problem(name, None, "error", f"{key} is {entry[key]!r}, expected {kind.__name__}",
                               f'e.g. "{key}": {json.dumps({bool: True, int: 1000, str: "train"}[kind])}',
                               "bad-value"))
    out += _lint_mapping(name, entry, "columns", lfdata.COLUMN_NAMES, formatting)
    out += _lint_mapping(name, entry, "tags", lfdata.TAG_NAMES, formatting)
    return out


def _lint_mapping(name: str, entry: dict, key: str, allowed: tuple[str, ...], formatting: str) -> list[Problem]:
    if key not in entry:
        return []
    mapping = entry[key]
    if not isinstance(mapping, dict):
        return [Problem(name, None, "error", f"{key} is {type(mapping).__name__}, expected an object",
                        f'e.g. "{key}": {{"{allowed[0]}": "..."}}', f"bad-{key}")]
    out = []
    for k, v in mapping.items():
        if k not in allowed:
            hint = _did_you_mean(k, allowed)
            out.append(Problem(name, None, "error", f"unknown {key} key {k!r}: LLaMA-Factory ignores it",
                               f"{hint} {key} keys are: {', '.join(allowed)}".strip(), f"bad-{key}"))
        elif not isinstance(v, str):
            out.append(Problem(name, None, "error", f"{key}.{k} is {v!r}, expected a string (a field name)",
                               f'e.g. "{k}": "{k}"', f"bad-{key}"))
    if key == "columns":
        sharegpt = formatting in ("sharegpt", "openai")
        wrong = (_ALPACA_ONLY if sharegpt else _SHAREGPT_ONLY) & set(mapping)
        if wrong:
            out.append(Problem(name, None, "warning", f"columns {', '.join(sorted(wrong))} are not read with "
                               f"formatting {formatting!r}",
                               "set \"formatting\": \"sharegpt\"" if not sharegpt and "messages" in wrong
                               else "remove them or fix \"formatting\"", "bad-columns"))
        if sharegpt and "messages" not in mapping:
            out.append(Problem(name, None, "error", "columns given without \"messages\": LLaMA-Factory then has no "
                               "messages column (a given mapping replaces the defaults, it does not extend them)",
                               'add "messages": "conversations" (or your field name) to columns', "bad-columns"))
    if key == "tags":
        if formatting not in ("sharegpt", "openai"):
            out.append(Problem(name, None, "warning", f"tags are only read with formatting sharegpt/openai, "
                               f"this entry is {formatting!r}", 'remove "tags" or set "formatting": "sharegpt"',
                               "bad-tags"))
        else:
            missing = [t for t in _CORE_TAGS if t not in mapping]
            if missing:
                defaults = lfdata._default_tags()
                out.append(Problem(name, None, "error", f"tags given without {', '.join(missing)}: LLaMA-Factory "
                                   "then uses None, not the default, and no message matches",
                                   "add " + ", ".join(f'"{t}": "{defaults[t]}"' for t in missing)
                                   + " (or your values)", "bad-tags"))
    return out


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
                    self.problem(index, "error", f"message {i} has role {role!r}, which is none of the entry's tags "
                                 f"({known}): LLaMA-Factory skips the whole record", fix, "unknown-role", file)
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
        # LLaMA-Factory lets observation stand where a user turn goes and function_call where an assistant turn goes.
        canonical = [({"observation": "user", "function": "assistant"}.get(r, r), c) for r, c in turns]
        for message in conversation_problems(canonical, len(images), len(videos)):
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
        if not exists:
            info: tuple[int, int] | str = ("found only relative to the current directory, not to media_dir"
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
                close = _closest(name, self.keys - {v for v in attr.columns.values() if v})
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


# ------------------------------------------------------------------------------------------------- the command


def validate(dataset_info: str | os.PathLike, datasets: list[str] | None = None, *, media_dir: str | None = None,
             max_records: int | None = None, cutoff_len: int | None = None, tokenizer: object = None,
             image_max_pixels: int | None = None, image_min_pixels: int | None = None, check_images: bool = True,
             decode_images: bool = False, max_per_kind: int = 20, model: str | os.PathLike | None = None,
             record_tokens: str | os.PathLike | None = None) -> ValidationReport:
    """Lint ``dataset_info`` (the file or its folder, LLaMA-Factory's ``dataset_dir``) and the data of its entries.

    ``datasets`` (LLaMA-Factory's ``dataset:`` names) restricts the record checks to those entries; every entry's
    schema is still linted, and errors of unselected entries are reported as warnings (LLaMA-Factory never reads
    them). Hub, script and cloud entries are linted but not loaded (no network). ``max_records`` checks only the
    first N records of each entry. Token lengths are measured when ``cutoff_len``, ``tokenizer``, ``model`` or
    ``record_tokens`` is given: ``model`` (a profile name such as ``qwen3_vl``, or a local model folder, whose
    tokenizer then counts exactly) picks the chat template and image rule; ``record_tokens`` writes every record's
    total as a JSON line ``{dataset, index, tokens}``. A build folder whose ``dataset_info.json`` lives elsewhere
    (``output.dataset_info``) is found through its manifest, and only that build's datasets are checked.
    """
    info_path = Path(dataset_info)
    if info_path.is_dir() and (info_path / MANIFEST).is_file() and datasets is None:
        manifest = read_manifest(info_path, DatasetInfoError)
        info_path, datasets = manifest_dataset_info(info_path, manifest), list(manifest["datasets"]) or None
    elif info_path.is_dir():
        info_path = info_path / lfdata.DATA_CONFIG
    info = lfdata.read_dataset_info(info_path)
    dataset_dir = info_path.parent
    media = Path(media_dir) if media_dir else dataset_dir
    report = ValidationReport(str(info_path), max_per_kind=max_per_kind)
    selected = _selected_names(info, datasets, report)
    counter = None
    if cutoff_len is not None or tokenizer is not None or model is not None or record_tokens is not None:
        counter = token_counter(tokenizer, image_max_pixels, image_min_pixels, model)
        image_max_pixels = counter.image_max_pixels
    with open(record_tokens, "w", encoding="utf-8") if record_tokens else contextlib.nullcontext() as sink:
        _validate_entries(info, selected, dataset_dir, media, report, counter, cutoff_len, check_images,
                          decode_images, image_max_pixels, max_records, sink)
    return report


def _validate_entries(info: dict, selected: set[str], dataset_dir: Path, media: Path, report: ValidationReport,
                      counter, cutoff_len: int | None, check_images: bool, decode_images: bool,
                      image_max_pixels: int | None, max_records: int | None, sink: IO[str] | None) -> None:
    for name, entry in info.items():
        chosen = name in selected
        schema = lint_entry(name, entry)
        for p in schema:
            report.add(p if chosen or p.severity != "error" else
                       Problem(p.entry, p.record, "warning", p.message + " (entry not selected)", p.fix, p.code))
        if not chosen or any(p.severity == "error" and p.code in _UNREADABLE for p in schema):
            continue
        attr = lfdata.parse_entry(name, entry)
        summary = report.entries.setdefault(name, EntrySummary())
        if attr.load_from != "file":
            summary.skipped = f"{attr.load_from}: {attr.dataset_name}"
            report.add(Problem(name, None, "info", f"loaded from {attr.load_from} ({attr.dataset_name}): not "
                               "checked offline", "", "skipped"))
            continue
        files = _check_files(name, attr, dataset_dir, report)
        if files is None:
            continue
        budget = TokenBudget(cutoff_len, counter) if counter is not None else None
        checker = _EntryChecker(name, attr, media, report, budget, check_images, decode_images,
                                image_max_pixels or IMAGE_MAX_PIXELS)
        checker.token_sink = sink
        summary.budget = budget
        summary.records = _check_records(checker, files, dataset_dir, max_records)
        checker.finish(summary.records)
        if budget is not None and budget.count and cutoff_len is not None:
            report.add(Problem(name, None, "info", budget.format(), "" if not budget.over else
                               f"cutoff_len {budget.suggested_cutoff()} keeps 99% of the records whole", "tokens"))


def _selected_names(info: dict, datasets: list[str] | None, report: ValidationReport) -> set[str]:
    if not datasets:
        return set(info)
    names = [n.strip() for d in datasets for n in d.split(",") if n.strip()]
    for name in names:
        if name not in info:
            hint = _did_you_mean(name, info)
            report.add(Problem(name, None, "error", f"Undefined dataset {name} in dataset_info.json",
                               f"{hint} the dataset names are the top-level keys of dataset_info.json; add an entry "
                               f'"{name}": {{"file_name": ...}} or fix the name'.strip(), "undefined-dataset"))
    return {n for n in names if n in info}


def _check_files(name: str, attr: lfdata.DatasetAttr, dataset_dir: Path, report: ValidationReport) -> list[Path] | None:
    """The data files of a file entry, or None after reporting why LLaMA-Factory could not load them."""
    path = dataset_dir / attr.dataset_name
    if not path.exists():
        try:
            siblings = [p.name for p in dataset_dir.iterdir()]
        except OSError:
            siblings = []
        hint = _did_you_mean(attr.dataset_name, siblings)
        report.add(Problem(name, None, "error", f"data file {attr.dataset_name!r} not found in {dataset_dir} "
                           f"(LLaMA-Factory: 'File {path} not found.')",
                           f"{hint} file_name is relative to the folder of dataset_info.json".strip(),
                           "missing-file"))
        return None
    files = lfdata.data_files(dataset_dir, attr)
    if not files:
        report.add(Problem(name, None, "error", f"folder {attr.dataset_name!r} is empty", "put the data files in it",
                           "missing-file"))
        return None
    kinds = {f.name: (None if f.is_dir() else lfdata.file_type(f)) for f in files}
    first = Counter(k for k in kinds.values() if k is not None).most_common(1)[0][0] if any(kinds.values()) else None
    odd = [n for n, k in kinds.items() if k is None or k != first]
    if odd or first is None:
        report.add(Problem(name, None, "error", f"{attr.dataset_name!r}: LLaMA-Factory loads every entry of the "
                           f"folder and needs one supported type ({', '.join(lfdata.FILEEXT2TYPE)}); offending: "
                           f"{', '.join(odd) or files[0].name}",
                           "remove the other files (hidden ones such as .DS_Store or leftover .tmp too) or move "
                           "them out of the folder", "file-types"))
        return None
    return files


def _check_records(checker: _EntryChecker, files: list[Path], dataset_dir: Path, max_records: int | None) -> int:
    index = 0
    shapes: list[_FileShape] = []
    for path in files:
        shown = str(path.relative_to(dataset_dir)) if len(files) > 1 else None
        shape = _FileShape(path, shown or path.name)
        shapes.append(shape)
        try:
            for record in lfdata.iter_file_records(path):
                if max_records is not None and index >= max_records:
                    return index
                checker.check(index, record, shown)
                shape.add(record)
                index += 1
        except DatasetInfoError as e:
            checker.problem(index, "error", str(e), "fix or regenerate the file; LLaMA-Factory fails on it too",
                            "bad-file", shown)
        except (OSError, UnicodeDecodeError) as e:
            checker.problem(index, "error", f"{path}: cannot read ({e})", "check the file's encoding (UTF-8) and "
                            "permissions", "bad-file", shown)
    _check_file_shapes(checker, shapes)
    return index


# datasets' JSON loader (LLaMA-Factory's) parses JSON Lines in chunks of this many bytes; the schema comes from the
# first chunk it reads, of whichever file ``os.listdir`` lists first, and every later chunk is cast to it.
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
    for shape in shapes:
        if not shape.chunked:
            continue
        untyped = sorted(k for k in typed & shape.keys if not shape.typed_in_first_chunk(k))
        if untyped:
            what = "empty lists" if set(untyped) <= lists else "nulls or empty lists"
            checker.problem(None, "error", f"the first 10 MB of this file hold only {what} in "
                            f"{', '.join(map(repr, untyped))}: datasets types a column from the first chunk it reads "
                            "(LLaMA-Factory lists files in os.listdir order) and then fails to cast the records that "
                            "have values (DatasetGenerationCastError)", "start the file with a record that has "
                            "them (mmdata build starts every shard so), or write one JSON array file",
                            "untyped-first-chunk", shape.shown)


def add_validate_command(subparsers) -> None:
    """Register ``mmdata validate`` (the CLI calls this; the logic is :func:`validate`)."""
    p = subparsers.add_parser("validate", help="lint an existing LLaMA-Factory dataset before training",
                              description="Check a dataset_info.json and the data of its entries the way "
                                          "LLaMA-Factory reads them. Exit status 1 when there are errors.")
    p.add_argument("dataset_info", help="dataset_info.json or the folder holding it (LLaMA-Factory's dataset_dir)")
    p.add_argument("--dataset", action="extend", nargs="+", metavar="NAME",
                   help="only these entries' data (names as in LLaMA-Factory's dataset:, comma lists allowed)")
    p.add_argument("--media-dir", help="LLaMA-Factory's media_dir (default: the dataset_info.json folder)")
    p.add_argument("--max-records", type=int, metavar="N", help="check only the first N records of each entry")
    p.add_argument("--cutoff-len", type=int, metavar="N", help="report records longer than N tokens (cutoff_len)")
    p.add_argument("--tokenizer", metavar="PATH", help="a local tokenizer folder for exact text token counts")
    p.add_argument("--model", metavar="NAME|DIR", help="count tokens for this model: a profile (qwen2_vl, qwen2_5_vl, "
                   "qwen3_vl, qwen3_vl_nothink, gemma3, internvl) or a local model folder (its tokenizer counts exactly)")
    p.add_argument("--record-tokens", metavar="FILE", help="write every record's token total as JSON lines")
    p.add_argument("--image-max-pixels", type=int, metavar="P", help="LLaMA-Factory's image_max_pixels (768*768)")
    p.add_argument("--image-min-pixels", type=int, metavar="P", help="LLaMA-Factory's image_min_pixels (32*32)")
    p.add_argument("--no-images", action="store_true", help="do not open image files")
    p.add_argument("--decode-images", action="store_true", help="fully decode every image (slow, catches truncation)")
    p.add_argument("--max-problems", type=int, default=20, metavar="N", help="problems shown per kind and entry")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    report = validate(args.dataset_info, args.dataset, media_dir=args.media_dir, max_records=args.max_records,
                      cutoff_len=args.cutoff_len, tokenizer=args.tokenizer, image_max_pixels=args.image_max_pixels,
                      image_min_pixels=args.image_min_pixels, check_images=not args.no_images,
                      decode_images=args.decode_images, max_per_kind=args.max_problems, model=args.model,
                      record_tokens=args.record_tokens)
    # utf8_text: a problem may quote record data, and stdout cannot print a lone surrogate
    print(utf8_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format_text()))
    return 0 if report.ok else 1

