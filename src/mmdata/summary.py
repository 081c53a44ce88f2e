"""The build summary printed at the end of every build: where the data is, what was read, written and rejected.

One headline (``read N  written N  rejected N``, and ``skipped N`` for rows a ``where:`` left out) and a table of the same exact counts from the manifest: datasets per
split, records per source (mixtures), rejects per reason with their share of the rows read, the token budget, the
grouped split and leakage lines of builds with ``dedup``/``split.group_by``, then the files to open.
"""

from __future__ import annotations

import json


def format_summary(result) -> str:
    c = result.counts
    lines = []
    if result.up_to_date:
        lines.append(f"up to date: {result.output_dir} (nothing to do)")
    elif result.shard != (0, 1):
        lines.append(f"built shard {result.shard[0]}/{result.shard[1]} into {result.output_dir}; "
                     "run `mmdata merge` once every shard is built")
    else:
        lines.append(f"built {result.output_dir}")
    skipped = f"  skipped {c['skipped']}" if c.get("skipped") else ""
    lines.append(f"  read {c['read']}  written {c['written']}  rejected {c['rejected']}{skipped}")
    rows: list[tuple[str, str, str, str]] = []
    splits = _dataset_splits(result)
    for name, path in result.datasets.items():
        split = splits.get(name, "train")
        rows.append(("dataset", name, _int(c.get("by_split", {}).get(split, 0)), f"{split:<6} {path}"))
    for source, n in c.get("by_source", {}).items():
        rows.append(("source", source, _int(n), f"{_share(n, c['written'])} of written"))
    for reason, n in c.get("rejected_by_reason", {}).items():
        rows.append(("rejected", reason, _int(n), f"{_share(n, c['read'])} of read"))
    for reason, n in c.get("skipped_by_reason", {}).items():
        rows.append(("skipped", f"by {reason}:", _int(n), f"{_share(n, c['read'])} of read"))
    if rows:
        width = max(len(r[1]) for r in rows)
        count_width = max(7, *(len(r[2]) for r in rows))
        lines.append("")
        lines.append(f"  {'':<8}  {'name':<{width}}  {'records':>{count_width}}")
        lines += [f"  {kind:<8}  {name:<{width}}  {n:>{count_width}}  {note}" for kind, name, n, note in rows]
        lines.append("")
    tokens = getattr(result, "tokens", None)
    if tokens and tokens.get("records"):
        lines.append(f"  {tokens['summary']}")
    grouped = _manifest_section(result, "grouped_split")
    if grouped:
        asked = ", ".join(f"{s} {n:,}" for s, n in grouped["asked"].items() if n) or "val 0, test 0"
        lines.append(f"  split grouped by {grouped['by']}: {grouped['groups']:,} groups kept whole (asked {asked})")
    leakage = getattr(result, "leakage", None)
    if leakage is not None:
        found = ", ".join(f"{kind.replace('_', ' ')} {n:,}" for kind, n in leakage.items())
        lines.append(f"  leakage: val/test records sharing with train: {found}"
                     + (f" (examples: mmdata check-leakage {result.output_dir})" if any(leakage.values()) else ""))
    if result.dataset_info:
        lines.append(f"  dataset_info: {result.dataset_info}")
    if c["rejected"]:
        lines.append(f"  rejects: {result.output_dir / 'rejects.jsonl'}")
    if getattr(result, "report", None):
        lines.append(f"  report: {result.report}")
    return "\n".join(lines)


def _manifest_section(result, key: str):
    """A section of the build's manifest (``grouped_split``), or None."""
    try:
        return json.loads(result.manifest.read_text(encoding="utf-8")).get(key)
    except (AttributeError, OSError, ValueError, TypeError):
        return None


def _dataset_splits(result) -> dict[str, str]:
    """Split of each dataset from the manifest; falls back to the name suffix when the manifest is unreadable."""
    try:
        datasets = json.loads(result.manifest.read_text(encoding="utf-8"))["datasets"]
        return {name: d["split"] for name, d in datasets.items()}
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        by_split = result.counts.get("by_split", {})
        return {name: name.rsplit("_", 1)[-1] if name.rsplit("_", 1)[-1] in by_split else "train"
                for name in result.datasets}


def _int(n: int) -> str:
    return f"{n:,}"


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"
