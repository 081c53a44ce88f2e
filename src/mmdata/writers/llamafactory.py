"""LLaMA-Factory output: one JSON line per record (sharegpt or alpaca) and the ``dataset_info.json`` entries.

Entries spell out ``formatting``, ``columns`` and ``tags`` completely: LLaMA-Factory replaces the defaults of a given
``columns``/``tags`` mapping key by key, so an omitted key becomes ``None`` rather than its default. Merging into an
existing ``dataset_info.json`` holds an exclusive lock, keeps every other entry byte-for-byte in value and order,
and replaces the file atomically, so concurrent builds and crashes never lose or corrupt an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import DatasetInfoError
from ..samples import Sample, utf8_text

SHAREGPT_TAGS = {
    "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
    "system_tag": "system",
}


def record_json(sample: Sample, fmt: str) -> str:
    """The exact line written for one sample."""
    if fmt == "sharegpt":
        return sample.to_json_line()
    return json.dumps(alpaca_record(sample), ensure_ascii=False, separators=(",", ":"))


def json_line(value: object) -> str:
    """One JSON line (non-ASCII kept readable, other objects through ``str``) that UTF-8 can carry: lone surrogates
    in any string (an id, a message quoting row data) become U+FFFD, see :func:`mmdata.samples.utf8_text`. For
    rejects and other lines written from raw row data; records are already repaired by :class:`Sample`."""
    return utf8_text(json.dumps(value, ensure_ascii=False, default=str))


def alpaca_record(sample: Sample) -> dict:
    """alpaca: the last user/assistant pair is instruction/output, earlier pairs become ``history``."""
    turns = [(m.role, m.content) for m in sample.messages]
    record: dict = {}
    if turns and turns[0][0] == "system":
        record["system"] = turns[0][1]
        turns = turns[1:]
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    *history, (instruction, output) = pairs
    record = {"instruction": instruction, "input": "", "output": output, **record}
    if history:
        record["history"] = [list(p) for p in history]
    if sample.images:
        record["images"] = list(sample.images)
    if sample.videos:
        record["videos"] = list(sample.videos)
    return record


def dataset_info_entry(fmt: str, file_name: str, keys: frozenset[str] = frozenset()) -> dict:
    """The entry for one written dataset; ``keys`` are the optional record keys it has (see :data:`OPTIONAL_KEYS`).

    Only columns the records carry are declared: LLaMA-Factory indexes every declared column and raises ``KeyError``
    on a missing one (e.g. ``history`` in an alpaca set with no multi-turn record).
    """
    if fmt == "sharegpt":
        columns = {"messages": "messages"}
    else:
        columns = {"prompt": "instruction", "query": "input", "response": "output"}
    columns.update({key: key for key in OPTIONAL_KEYS[fmt] if key in keys})
    entry = {"file_name": file_name, "formatting": fmt, "columns": columns}
    if fmt == "sharegpt":
        entry["tags"] = dict(SHAREGPT_TAGS)
    return entry


# Keys a record carries only when it has them, in the order they are written. datasets' JSON loader (LLaMA-Factory's)
# refuses a folder whose files have different columns, and types each column from the first rows of whichever file it
# reads first: so every record of a dataset carries every optional key the dataset has (see fill_optional_keys).
OPTIONAL_KEYS = {"sharegpt": ("images", "videos"), "alpaca": ("system", "history", "images", "videos")}
_KEY_ORDER = {"sharegpt": ("messages", "images", "videos"),
              "alpaca": ("instruction", "input", "output", "system", "history", "images", "videos")}


def optional_keys(line: str, fmt: str) -> frozenset[str]:
    """The optional keys of one line this module wrote. A plain substring test is exact here: inside a JSON string a
    quote is always escaped, so ``"images":`` can only be a key, and these keys only occur at the top level."""
    return frozenset(key for key in OPTIONAL_KEYS[fmt] if f'"{key}":' in line)


def fill_optional_keys(line: str, keys: frozenset[str], fmt: str) -> str:
    """``line`` with each of ``keys`` it lacks added empty (``[]``, or ``""`` for ``system``), in the written order."""
    record = json.loads(line)
    full = {key: record[key] if key in record else ("" if key == "system" else [])
            for key in _KEY_ORDER[fmt] if key in record or key in keys}
    return json.dumps(full, ensure_ascii=False, separators=(",", ":")) + "\n"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``.<name>.lock`` beside ``path`` for the read-modify-write of a shared registry.

    The lock file stays (removing it would let two writers lock different inodes); it is hidden and empty."""
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise _RepeatedKey(key)
        found[key] = value
    return found


def existing_dataset_info(path: Path) -> dict:
    """An existing ``dataset_info.json`` to merge into ({} when missing or empty); one that mmdata could not rewrite
    without losing something (not JSON, not an object, a key written twice) is a :class:`DatasetInfoError`."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as e:
        raise DatasetInfoError(f"{path}: existing file is not valid JSON (line {e.lineno}: {e.msg}); fix or move it, "
                               "mmdata will not overwrite it") from None
    except _RepeatedKey as e:
        raise DatasetInfoError(
            f"{path}: the key {e.args[0]!r} appears twice (JSON readers keep only the last one, so rewriting the file "
            "would drop the other); remove one of them, mmdata will not overwrite it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetInfoError(f"{path}: cannot be read ({e}); fix or move it") from None
    if not isinstance(info, dict):
        raise DatasetInfoError(f"{path}: top level is not an object; fix or move it")
    return info


def merge_dataset_info(path: Path, entries: dict[str, dict], overwrite: bool = False) -> list[str]:
    """Add ``entries`` to the ``dataset_info.json`` at ``path`` (created if missing); returns the names written.

    An existing entry with the same name and the same value is left as is; a different one is an error unless
    ``overwrite``. Everything else in the file is preserved.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # only a lock holder writes these: a killed merge's
            stale.unlink(missing_ok=True)
        info = existing_dataset_info(path)
        clashes = [n for n, e in entries.items() if n in info and info[n] != e]
        if clashes and not overwrite:
            raise DatasetInfoError(
                f"{path}: entries {', '.join(clashes)} already exist with different content; "
                "pass --overwrite (or output.overwrite: true) to replace them, or choose another output.name"
            )
        info.update(entries)
        write_text_atomic(path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return list(entries)


def unregister_datasets(path: Path, file_names: dict[str, str | None]) -> list[str]:
    """Remove entries ``name -> file_name`` that a build registered in ``path`` (locked, atomic replace); returns the
    names removed. An entry whose ``file_name`` differs (re-registered by someone else) is left alone."""
    if not path.is_file():
        return []
    with locked(path):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []  # not ours to repair; merge_dataset_info reports it
        if not isinstance(info, dict):
            return []
        stale = [n for n, f in file_names.items() if isinstance(info.get(n), dict) and info[n].get("file_name") == f]
        if stale:
            for name in stale:
                del info[name]
            write_text_atomic(path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return stale
