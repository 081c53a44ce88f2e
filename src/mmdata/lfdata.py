"""Read LLaMA-Factory datasets: ``dataset_info.json`` entries and the records they point at.

This mirrors LLaMA-Factory's own parsing (``data/parser.py`` and ``data/converter.py``) closely enough that what we
accept here, LLaMA-Factory accepts: an entry's ``columns``/``tags`` replace the defaults key by key, and a key missing
from a given ``columns`` mapping becomes ``None`` there (not the default). Used by ``mmdata validate``, the trainer
and the report, so all three read datasets the same way.
"""

from __future__ import annotations

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
ENTRY_KEYS = {
    "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "formatting", "ranking",
    "subset", "split", "folder", "num_samples", "columns", "tags",
}
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


@dataclass
class DatasetAttr:
    """One ``dataset_info.json`` entry with LLaMA-Factory's defaults applied."""

    name: str
    load_from: str
    dataset_name: str
    formatting: str = "alpaca"
    split: str = "train"
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
    """Turn one entry into a :class:`DatasetAttr` the way LLaMA-Factory's ``get_dataset_list`` does."""
    for key, load_from in (("hf_hub_url", "hf_hub"), ("ms_hub_url", "ms_hub"), ("om_hub_url", "om_hub"),
                           ("script_url", "script"), ("cloud_file_name", "cloud_file"), ("file_name", "file")):
        if key in entry:
            attr = DatasetAttr(name=name, load_from=load_from, dataset_name=entry[key])
            break
    else:
        raise DatasetInfoError(f"entry {name!r} has no file_name (or hf_hub_url/ms_hub_url): add \"file_name\"")
    attr.formatting = entry.get("formatting", "alpaca")
    attr.split = entry.get("split", "train")
    attr.columns = _default_columns()
    if isinstance(entry.get("columns"), dict):
        attr.columns = {c: entry["columns"].get(c) for c in COLUMN_NAMES}
    attr.tags = _default_tags()
    if attr.formatting == "sharegpt" and isinstance(entry.get("tags"), dict):
        attr.tags = {t: entry["tags"].get(t) for t in TAG_NAMES}
    return attr


def data_files(dataset_dir: str | os.PathLike, attr: DatasetAttr) -> list[Path]:
    """The local files behind a ``file_name`` entry: the file itself, or every file of the folder, sorted."""
    path = Path(dataset_dir) / attr.dataset_name
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return [path]


def iter_file_records(path: Path) -> Iterator[object]:
    """Yield the raw records of one ``.json`` (a list, or JSON Lines despite the name) or ``.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            yield from json.load(f)
            return
        for line in f:
            if line.strip():
                yield json.loads(line)


def to_turns(record: dict, attr: DatasetAttr) -> tuple[list[tuple[str, object]], list, list]:
    """Canonical ``(role, content)`` turns plus image and video lists of one record.

    sharegpt: the messages column with the entry's tags mapped to system/user/assistant (unknown roles kept as-is so
    the validator reports them); a separate system column is prepended. alpaca: history pairs, then instruction +
    input as the user turn and output as the assistant turn.
    """
    images = _as_list(record.get(attr.column("images"))) if attr.column("images") else []
    videos = _as_list(record.get(attr.column("videos"))) if attr.column("videos") else []
    turns: list[tuple[str, object]] = []
    system = record.get(attr.column("system")) if attr.column("system") else None
    if attr.formatting == "sharegpt":
        role_map = {attr.tag("user_tag"): "user", attr.tag("assistant_tag"): "assistant",
                    attr.tag("system_tag"): "system"}
        messages = record.get(attr.column("messages") or "", [])
        if not isinstance(messages, list):
            raise ValueError(f"column {attr.column('messages')!r} is {type(messages).__name__}, expected a list")
        if system:
            turns.append(("system", system))
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"a message is {type(m).__name__}, expected an object with role/content")
            role = m.get(attr.tag("role_tag") or "")
            turns.append((role_map.get(role, str(role)), m.get(attr.tag("content_tag") or "")))
    else:
        if system:
            turns.append(("system", system))
        history = record.get(attr.column("history")) if attr.column("history") else None
        for pair in history or []:
            turns += [("user", pair[0]), ("assistant", pair[1])]
        prompt = record.get(attr.column("prompt") or "") or ""
        query = record.get(attr.column("query") or "") if attr.column("query") else ""
        user = "\n".join(p for p in (prompt, query) if p) if isinstance(prompt, str) and isinstance(query or "", str) else prompt
        turns.append(("user", user))
        turns.append(("assistant", record.get(attr.column("response") or "", "")))
    return turns, images, videos


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
