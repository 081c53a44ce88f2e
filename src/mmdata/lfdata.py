"""Read LLaMA-Factory datasets: ``dataset_info.json`` entries and the records they point at.

This mirrors LLaMA-Factory's own reading (``data/parser.py``, ``data/loader.py`` and ``data/converter.py``) so that
what we accept here, LLaMA-Factory accepts, and the trainer, the report and ``mmdata validate`` read datasets the same
way. The rules that are easy to get wrong, all taken from those files:

- an entry's ``columns``/``tags`` replace the defaults key by key, and a key *missing* from a given mapping becomes
  ``None`` there, not the default (``DatasetAttr.join`` does ``obj.get(key)``); ``tags`` apply whatever the formatting;
- ``file_name`` is relative to ``dataset_dir``; a folder loads *every* entry ``os.listdir`` returns (dot files too),
  and all of them must have the same type by extension;
- sharegpt: a first message with the system tag is the system prompt (the ``system`` column is then ignored); the
  other messages must alternate user/observation and assistant/function tags;
- alpaca: ``instruction`` and ``input`` are joined by a newline (empty ones skipped), ``history`` pairs come first;
- media paths are joined to ``media_dir`` (default: ``dataset_dir``); an absolute path stays as it is.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetInfoError

DATA_CONFIG = "dataset_info.json"

COLUMN_NAMES = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)
TAG_NAMES = (
    "role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag",
)
SOURCE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name")
ENTRY_KEYS = {*SOURCE_KEYS, "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}
FORMATTINGS = ("alpaca", "sharegpt", "openai")
# LLaMA-Factory's FILEEXT2TYPE: the type is the text after the last dot of the file name.
FILEEXT2TYPE = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
# Roles of LLaMA-Factory's ``Role`` enum that a tag maps to.
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "observation",
             "function_tag": "function", "system_tag": "system"}


@dataclass
class DatasetAttr:
    """One ``dataset_info.json`` entry with LLaMA-Factory's defaults applied."""

    name: str
    load_from: str
    dataset_name: str
    formatting: str = "alpaca"
    ranking: bool = False
    split: str = "train"
    subset: str | None = None
    folder: str | None = None
    num_samples: int | None = None
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=dict)

    def column(self, key: str) -> str | None:
        return self.columns.get(key)

    def tag(self, key: str) -> str | None:
        return self.tags.get(key)


def _default_columns() -> dict[str, str | None]:
    cols: dict[str, str | None] = dict.fromkeys(COLUMN_NAMES)
    cols.update(prompt="instruction", query="input", response="output", messages="conversations")
    return cols


def _default_tags() -> dict[str, str | None]:
    return {
        "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
    }


def read_dataset_info(path: str | os.PathLike) -> dict:
    """Load a ``dataset_info.json`` (path to the file or to its folder) with an error that names the file."""
    path = Path(path)
    if path.is_dir():
        path = path / DATA_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetInfoError(f"{path}: not found; pass the dataset_info.json of your dataset_dir") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetInfoError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(info, dict):
        raise DatasetInfoError(f"{path}: top level must be an object mapping dataset names to entries")
    return info


def parse_entry(name: str, entry: dict) -> DatasetAttr:
    """Turn one entry into a :class:`DatasetAttr` the way LLaMA-Factory's ``get_dataset_list`` does.

    Without ``USE_MODELSCOPE_HUB``/``USE_OPENMIND_HUB`` set, ``hf_hub_url`` wins over the other hubs, a hub over a
    script, a script over a cloud file and that over ``file_name``.
    """
    for key, load_from in zip(SOURCE_KEYS, ("hf_hub", "ms_hub", "om_hub", "script", "cloud_file", "file"),
                              strict=True):
        if key in entry:
            attr = DatasetAttr(name=name, load_from=load_from, dataset_name=entry[key])
            break
    else:
        raise DatasetInfoError(f"entry {name!r} has no file_name (or hf_hub_url/ms_hub_url): add \"file_name\"")
    attr.formatting = entry.get("formatting", "alpaca")
    attr.ranking = entry.get("ranking", False)
    attr.split = entry.get("split", "train")
    attr.subset, attr.folder, attr.num_samples = entry.get("subset"), entry.get("folder"), entry.get("num_samples")
    attr.columns = _default_columns()
    if isinstance(entry.get("columns"), dict):
        attr.columns = {c: entry["columns"].get(c) for c in COLUMN_NAMES}
    attr.tags = _default_tags()
    if isinstance(entry.get("tags"), dict):
        attr.tags = {t: entry["tags"].get(t) for t in TAG_NAMES}
    return attr


def file_type(path: str | os.PathLike) -> str | None:
    """LLaMA-Factory's loader type of a data file (``json``, ``csv``, ...), or ``None`` when it refuses the name."""
    return FILEEXT2TYPE.get(Path(path).name.split(".")[-1])


def data_files(dataset_dir: str | os.PathLike, attr: DatasetAttr) -> list[Path]:
    """The local paths behind a ``file_name`` entry, as LLaMA-Factory lists them: the file itself, or everything in
    the folder (dot files and sub-folders included: LLaMA-Factory loads them too, so they must not be there), sorted.
    """
    path = Path(dataset_dir) / attr.dataset_name
    if path.is_dir():
        return sorted(path.iterdir())
    return [path]


def iter_file_records(path: Path) -> Iterator[object]:
    """Yield the raw records of one data file, streaming (constant memory, whatever the file size).

    ``.json``: a JSON array, or JSON Lines despite the name (both load in LLaMA-Factory); ``.jsonl``: JSON Lines;
    ``.parquet``/``.arrow`` through pyarrow in batches; ``.csv`` as string columns; ``.txt`` one ``{"text": line}``
    per line. A decoding error raises :class:`DatasetInfoError` naming the file and line.
    """
    kind = file_type(path)
    if kind == "json":
        yield from _iter_json(path)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif kind == "arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield from reader.get_batch(i).to_pylist()
                return
            for batch in reader:
                yield from batch.to_pylist()
    elif kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)
    elif kind == "text":
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield {"text": line.rstrip("\n")}
    else:
        raise DatasetInfoError(
            f"{path}: LLaMA-Factory cannot load this file type; allowed: {', '.join(FILEEXT2TYPE)}")


_CHUNK = 1 << 20


def _iter_json(path: Path) -> Iterator[object]:
    """A JSON array element by element (``raw_decode`` over a sliding buffer), or JSON Lines line by line."""
    with open(path, encoding="utf-8") as f:
        head = f.read(_CHUNK)
        bom = head.startswith("\ufeff")
        body = head.removeprefix("\ufeff").lstrip()
        if body.startswith("["):
            if bom:  # pyarrow cannot read an array, and datasets' json.load fallback refuses the BOM
                raise DatasetInfoError(f"{path}: starts with a UTF-8 byte-order mark (BOM), which LLaMA-Factory's "
                                       "JSON loader refuses before a JSON array; re-save the file as UTF-8 without BOM")
            yield from _iter_json_array(f, path, body, 1)
            return
        f.seek(0)
        if bom:
            f.read(1)  # JSON Lines: pyarrow, LLaMA-Factory's reader, skips a BOM
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield from _objects_of_line(line)
                except json.JSONDecodeError as e:
                    raise DatasetInfoError(
                        f"{path}: line {lineno} is not valid JSON ({e.msg}: column {e.colno}); a .json/.jsonl file "
                        "must be a JSON array of records or JSON Lines (one complete record per line)") from None


_DECODER = json.JSONDecoder()


def _objects_of_line(line: str) -> Iterator[object]:
    """The JSON values of one line: usually one, but pyarrow's reader (datasets, LLaMA-Factory) also accepts several
    objects written back to back on a line, so this does too."""
    pos, end = 0, len(line.rstrip())
    while True:
        value, pos = _DECODER.raw_decode(line, len(line) - len(line[pos:].lstrip()))
        yield value
        if pos >= end:
            return


def _iter_json_array(f, path: Path, buf: str, pos: int) -> Iterator[object]:
    decoder = json.JSONDecoder()
    lines_before = 0  # newlines in the text already dropped from the buffer

    def more() -> bool:
        nonlocal buf, pos, lines_before
        chunk = f.read(_CHUNK)
        if not chunk:
            return False
        lines_before += buf.count("\n", 0, pos)
        buf, pos = buf[pos:] + chunk, 0
        return True

    def next_char() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    def error(what: str, at: int) -> DatasetInfoError:
        line = lines_before + buf.count("\n", 0, at) + 1
        return DatasetInfoError(f"{path}: not valid JSON near line {line} ({what}); was the file truncated?")

    first = True
    while True:
        c = next_char()
        if c == "]":
            return
        if not first:
            if c != ",":
                raise error("expected ',' or ']' between records", pos)
            pos += 1
            c = next_char()
        if not c:
            raise error("the array is not closed", pos)
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if more():
                    continue
                raise error(e.msg, e.pos) from None
            if end == len(buf) and more():  # a number may go on in the next chunk: decode again
                continue
            break
        yield value
        pos, first = end, False


def to_turns(record: dict, attr: DatasetAttr) -> tuple[list[tuple[str, object]], list, list]:
    """Canonical ``(role, content)`` turns plus image and video lists of one record, as LLaMA-Factory aligns it.

    sharegpt (and openai): messages with the entry's tags mapped to ``system``/``user``/``assistant``/
    ``observation``/``function``; a role that matches no tag is kept as-is so the validator reports it; a leading
    system message is the system prompt, else the ``system`` column is. alpaca: history pairs, then instruction and
    input (newline-joined) as the user turn and output as the assistant turn (none when the entry maps no response
    column: pre-training text). Ranking entries: the ``chosen`` answer is the assistant turn.
    """
    images = _as_list(record.get(attr.column("images"))) if attr.column("images") else []
    videos = _as_list(record.get(attr.column("videos"))) if attr.column("videos") else []
    turns: list[tuple[str, object]] = []
    system = record.get(attr.column("system")) if attr.column("system") else None
    if attr.formatting in ("sharegpt", "openai"):
        role_tag, content_tag = attr.tag("role_tag") or "", attr.tag("content_tag") or ""
        role_map = {attr.tag(t): role for t, role in TAG_ROLES.items() if attr.tag(t) is not None}
        messages = record.get(attr.column("messages") or "")
        if messages is None:
            messages = []
        if not isinstance(messages, list):
            raise ValueError(f"column {attr.column('messages')!r} is {type(messages).__name__}, expected a list")
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"a message is {type(m).__name__}, expected an object with {role_tag}/{content_tag}")
        first_is_system = bool(messages) and attr.tag("system_tag") and messages[0].get(role_tag) == attr.tag(
            "system_tag")
        if system and not first_is_system:
            turns.append(("system", system))
        if attr.formatting == "openai":
            messages = _openai_aligned(messages, attr, role_tag, content_tag)
        for m in messages:
            role = m.get(role_tag)
            turns.append((role_map.get(role, str(role)), m.get(content_tag)))
        if attr.ranking and isinstance(record.get(attr.column("chosen") or ""), dict):
            chosen = record[attr.column("chosen")]
            turns.append((role_map.get(chosen.get(role_tag), str(chosen.get(role_tag))), chosen.get(content_tag)))
    else:
        if system:
            turns.append(("system", system))
        history = record.get(attr.column("history")) if attr.column("history") else None
        if isinstance(history, list):
            for pair in history:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"a history item is {pair!r}, expected a [question, answer] pair")
                turns += [("user", pair[0]), ("assistant", pair[1])]
        parts = [record.get(attr.column(c)) for c in ("prompt", "query") if attr.column(c)]
        parts = [p for p in parts if p]
        user = "\n".join(parts) if all(isinstance(p, str) for p in parts) else (parts[0] if parts else "")
        turns.append(("user", user))
        answer_column = attr.column("chosen") if attr.ranking else attr.column("response")
        if answer_column:
            turns.append(("assistant", record.get(answer_column)))
    return turns, images, videos


def _openai_aligned(messages: list[dict], attr: DatasetAttr, role_tag: str, content_tag: str) -> list[dict]:
    """LLaMA-Factory's OpenAIDatasetConverter: an assistant message's ``tool_calls`` become one function-call turn
    (their ``function`` objects as JSON), and consecutive tool (observation) messages one observation turn."""
    observation, function = attr.tag("observation_tag"), attr.tag("function_tag")
    aligned: list[dict] = []
    responses: list = []
    for m in messages:
        role, content = m.get(role_tag), m.get(content_tag)
        calls = m.get("tool_calls")
        if role in (attr.tag("assistant_tag"), function) and isinstance(calls, list) and calls:
            functions = [c.get("function") if isinstance(c, dict) else c for c in calls]
            role, content = function, json.dumps(functions, ensure_ascii=False)
        if role == observation:
            responses.append(content)
            continue
        if responses:
            aligned.append({role_tag: observation, content_tag: "\n</tool_response>\n<tool_response>\n".join(
                str(r) for r in responses)})
            responses = []
        aligned.append({role_tag: role, content_tag: content})
    return aligned


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def iter_dataset(dataset_info_path: str | os.PathLike, name: str) -> Iterator[tuple[list[tuple[str, object]], list, list]]:
    """Yield canonical ``(turns, images, videos)`` for every record of a local dataset entry, in file order."""
    info_path = Path(dataset_info_path)
    if info_path.is_dir():
        info_path = info_path / DATA_CONFIG
    info = read_dataset_info(info_path)
    if name not in info:
        raise DatasetInfoError(f"Undefined dataset {name} in {info_path}: known names are {', '.join(sorted(info))}")
    attr = parse_entry(name, info[name])
    for path in data_files(info_path.parent, attr):
        for record in iter_file_records(path):
            yield to_turns(record, attr)
