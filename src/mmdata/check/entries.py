"""The ``dataset_info.json`` entry checks: every key LLaMA-Factory reads, with the closest valid key for a typo."""

from __future__ import annotations

import difflib
import json

from .. import lfdata
from .problems import Problem

# Keys LLaMA-Factory once read and now ignores: not worth an error.
LEGACY_ENTRY_KEYS = {"file_sha1", "revision"}
MEDIA_COLUMNS = ("images", "videos", "audios")
_SHAREGPT_ONLY = {"messages"}
_ALPACA_ONLY = {"prompt", "query", "response", "history"}
_CORE_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag")

# Schema errors after which the records cannot be read the way LLaMA-Factory would.
_UNREADABLE = {"entry-type", "no-source", "bad-value", "bad-formatting"}

# --------------------------------------------------------------------------------------------------- entries


def closest(word: str, choices, n: int = 1) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices) -> str:
    match = closest(word, choices)
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
        hint = did_you_mean(key, lfdata.ENTRY_KEYS)
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
        hint = did_you_mean(str(formatting), lfdata.FORMATTINGS)
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
            hint = did_you_mean(k, allowed)
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
