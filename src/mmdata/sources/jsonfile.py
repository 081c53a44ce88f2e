"""JSON / JSONL source for the conversation shapes people already have.

Recognised per record (``shape: auto``): LLaMA-Factory sharegpt ``messages`` (role/content), ``conversations``
(from/value with human/gpt, or role/value), either with a top-level ``system`` prompt, the tutorial layout whose
user turn *is* an image path, and alpaca ``instruction/input/output`` (+ ``system``, ``history``, ``images``). Each
record becomes a row with canonical ``messages`` ([{role, content}]), ``images``, ``videos`` and ``id``, plus its
other top-level keys untouched.

Images come from ``images`` or, when that is absent or empty, from a singular ``image`` (a path, a list of paths,
bytes or an HF ``{bytes, path}`` dict): LLaVA, ShareGPT4V and LLaVA-Med files say ``"image": "coco/x.jpg"``, and
they build with no ``fields:`` at all. The ``<image>`` placeholders stay where the record wrote them.

A record of none of these shapes (SLAKE's ``{"img_name", "question", "answer"}``) is kept as plain columns: a recipe
that maps ``fields.answer`` (and ``fields.question`` or a ``prompt``) builds it as it would a CSV row; any other
recipe rejects it as ``bad record shape``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from ..errors import SourceError
from . import Source, SourceParams, files_fingerprint, register_source

ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "system": "system",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class JsonParams(SourceParams):
    path: str
    shape: Literal["auto", "sharegpt", "alpaca"] = "auto"
    image_root: str | None = None


class ShapeError(ValueError):
    """A record matches none of the known shapes; becomes a reject with this message."""


@register_source("json")
@register_source("jsonl")
class JsonSource(Source):
    Params = JsonParams
    default_fields = {"messages": "messages", "images": "images", "id": "id"}

    def __init__(self, params: JsonParams, base_dir: Path):
        super().__init__(params, base_dir)
        self.path = self.resolve(params.path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: JSON file not found (source.path is relative to the recipe's folder)")
        if self.path.is_dir():
            # Files found in the folder are data, not recipe: a symlink among them must not pull in a file elsewhere.
            self.files = [self.discovered(f, self.path, "JSON file") for f in sorted(self.path.glob("*.json*"))]
        else:
            self.files = [self.path]

    @property
    def image_root(self) -> Path:
        if self.params.image_root:
            return self.resolve(self.params.image_root)
        return self.path if self.path.is_dir() else self.path.parent

    def raw_records(self) -> Iterator[tuple[str, object]]:
        """``(where, record)``: where names the file and the line (JSON Lines) or the index (an array)."""
        for file in self.files:
            try:
                yield from _read_records(file)
            except UnicodeDecodeError as e:
                raise SourceError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8") from None

    def rows(self) -> Iterator[dict]:
        for where, record in self.raw_records():
            if isinstance(record, dict) and "__error__" in record:
                yield {**record, "__where__": where}
                continue
            try:
                yield {**to_canonical(record, self.params.shape), "__where__": where}
            except ShapeError as e:
                # Keep the row so the pipeline rejects it with the reason instead of losing it.
                yield {"__error__": str(e), "__reason__": "bad record shape", "__where__": where,
                       "id": record.get("id") if isinstance(record, dict) else None}

    def num_rows(self) -> int:
        return sum(1 for _ in self.raw_records())

    def fingerprint(self) -> str:
        return files_fingerprint(self.files) + self.params.model_dump_json()


def _read_records(path: Path) -> Iterator[tuple[str, object]]:
    """A JSON array (parsed whole: arrays cannot be streamed by the stdlib) or JSON Lines, one record per line; each
    record with where it is (``d.json [3]``, ``d.jsonl line 4``)."""
    with open(path, encoding="utf-8-sig") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
            except (ValueError, RecursionError) as e:  # nesting too deep, integer too long
                raise SourceError(f"{path}: cannot parse the JSON ({type(e).__name__}: {e})") from None
            yield from ((f"{path.name} [{i}]", record) for i, record in enumerate(data))
            return
        if first == "{" and path.suffix == ".json":
            try:
                data = json.load(f)
            except (ValueError, RecursionError):
                f.seek(0)  # JSON Lines in a .json file (or a bad object: each line then becomes a reject)
            else:
                raise SourceError(
                    f"{path}: top level is an object, not a list of records; "
                    f"wrap the records in [...] or use JSON Lines (keys here: {', '.join(list(data)[:5])})"
                )
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                yield where, json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, nesting too deep, integer too long
                why = e.msg if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {str(e)[:200]}"
                yield where, {"__error__": f"{where}: invalid JSON ({why})", "__reason__": "invalid JSON"}


def to_canonical(record: object, shape: str = "auto") -> dict:
    if not isinstance(record, dict):
        raise ShapeError(f"record is a {type(record).__name__}, expected an object")
    row = {k: v for k, v in record.items() if k not in ("messages", "conversations")}
    if shape in ("auto", "sharegpt") and ("messages" in record or "conversations" in record):
        key = "messages" if "messages" in record else "conversations"
        messages, images_from_turns = _turns(record[key], key)
        if record.get("system") and not (messages and messages[0]["role"] == "system"):
            # LLaMA-Factory's sharegpt keeps the system prompt beside the turns (its "system" column)
            messages.insert(0, {"role": "system", "content": record["system"]})
        row["messages"] = messages
        row["images"] = _record_images(record, row) + images_from_turns
    elif shape in ("auto", "alpaca") and "instruction" in record:
        messages = []
        if record.get("system"):
            messages.append({"role": "system", "content": record["system"]})
        history = record.get("history") or []
        if not isinstance(history, list):
            raise ShapeError("alpaca history must be a list of [question, answer] pairs")
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ShapeError("alpaca history must be a list of [question, answer] pairs")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        instruction, query = record.get("instruction"), record.get("input")
        user = "\n".join(str(p) for p in (instruction, query) if p not in (None, ""))
        output = record.get("output", "")
        if not isinstance(output, str):
            raise ShapeError(f"alpaca output is {type(output).__name__ if output is not None else 'null'}, expected "
                             "the answer text")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        row["messages"] = messages
        row["images"] = _record_images(record, row)
    else:
        keys = sorted(str(k) for k in record)
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} keys)" if len(keys) > 8 else "")
        message = (f"unrecognised record shape (keys: {shown}); expected messages, conversations or "
                   "instruction/output, or, for a record of plain columns, fields.question (or a prompt) and "
                   "fields.answer in the recipe")
        if shape != "auto":
            raise ShapeError(message)
        # plain columns (SLAKE's question/answer/img_name): a recipe that maps fields.answer builds them like a CSV
        # row; any other rejects the row with this reason (normalize_row)
        row["images"] = _record_images(record, row)
        row["__shape_error__"] = message
    row["videos"] = _as_list(record.get("videos"))
    return row


def _turns(turns: object, key: str) -> tuple[list[dict], list[str]]:
    if not isinstance(turns, list):
        raise ShapeError(f"{key!r} is a {type(turns).__name__}, expected a list of turns")
    messages, images = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ShapeError(f"{key}[{i}] is a {type(turn).__name__}, expected an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            raise ShapeError(f"{key}[{i}] has role {role!r}; expected user/assistant/system (or human/gpt)")
        role = ROLE_ALIASES[role]
        if not isinstance(content, str):
            raise ShapeError(f"{key}[{i}] content is {type(content).__name__}, expected a string")
        if role == "user" and _is_image_path(content):
            images.append(content.strip())
            content = "<image>"
        messages.append({"role": role, "content": content})
    return messages, images


def _is_image_path(text: str) -> bool:
    """The tutorial layout puts a bare image path in the user turn: one token ending in an image suffix."""
    stripped = text.strip()
    return bool(stripped) and "\n" not in stripped and " " not in stripped and stripped.lower().endswith(IMAGE_SUFFIXES)


def _record_images(record: dict, row: dict) -> list:
    """``images``, else the singular ``image`` (moved out of ``row`` so an explicit ``fields.image: image`` cannot
    count it twice). An ``image`` that is not an image reference (an integer id, say) stays an ordinary key."""
    images = _as_list(record.get("images"))
    single = record.get("image")
    if not images and _is_image_ref(single):
        row.pop("image", None)
        return _as_list(single)
    return images


def _is_image_ref(value) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_image_ref(v) for v in value)
    if isinstance(value, dict):
        return "bytes" in value or "path" in value
    return isinstance(value, (str, bytes)) and value != ""


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    return value if isinstance(value, list) else [value]
