"""The build summary printed at the end of every build: where the data is, what was read, written and rejected."""

from __future__ import annotations


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
    lines.append(f"  read {c['read']}  written {c['written']}  rejected {c['rejected']}")
    for reason, n in c.get("rejected_by_reason", {}).items():
        lines.append(f"    rejected  {n:>8}  {reason}")
    for name, path in result.datasets.items():
        split_counts = c.get("by_split", {})
        split = name.rsplit("_", 1)[-1] if name.rsplit("_", 1)[-1] in split_counts else "train"
        lines.append(f"  dataset {name:<30} {split_counts.get(split, 0):>8} records  {path}")
    for source, n in c.get("by_source", {}).items():
        lines.append(f"  source  {source:<30} {n:>8} records")
    if result.dataset_info:
        lines.append(f"  dataset_info: {result.dataset_info}")
    if c["rejected"]:
        lines.append(f"  rejects: {result.output_dir / 'rejects.jsonl'}")
    return "\n".join(lines)
