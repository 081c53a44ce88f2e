"""Finalising a build: route staged records into splits, write the split files, the rejects and the manifest, and
register the datasets; also ``mmdata merge`` of shard builds.

The split is drawn over *written* records, so ``val: 4`` gives exactly 4 validation records even when some rows were
rejected. Each split becomes a folder of fixed-size JSONL shards (or one JSON array). Then rejects are concatenated,
``dataset_info.json`` is merged and the manifest ``mmdata_build.json`` is written last.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .atomic import replaced_on_close, write_text_atomic
from .errors import BuildError, DatasetInfoError
from .layout import MANIFEST, SPLITS, Layout, OutputLock, claim_output, read_json
from .recipes import Recipe, Split
from .task import TaskStats, token_budget
from .writers.llamafactory import (
    dataset_info_entry,
    fill_optional_keys,
    merge_dataset_info,
    optional_keys,
)


@dataclass
class BuildResult:
    """What a build produced: where, under which dataset names, and the counts (``read == written + rejected``)."""

    output_dir: Path
    dataset_info: Path | None
    datasets: dict[str, Path]
    counts: dict[str, Any]
    up_to_date: bool = False
    manifest: Path | None = None
    shard: tuple[int, int] = (0, 1)
    report: Path | None = None
    tokens: dict | None = None  # the manifest's token budget (estimated lengths vs LLaMA-Factory's cutoff_len)

    @property
    def read(self) -> int:
        return self.counts["read"]

    @property
    def skipped(self) -> int:
        """Rows the recipe's ``where:`` left out on purpose (``read == written + rejected + skipped``)."""
        return self.counts.get("skipped", 0)

    @property
    def problem(self) -> str | None:
        """Why this build is of no use as it stands (nothing read, or every row rejected), else None. ``mmdata build``
        prints it and exits non-zero; ``mmdata.build()`` also issues it as a warning."""
        c = self.counts
        if self.shard != (0, 1) or c["written"]:
            return None
        if not c["read"] - c.get("skipped", 0):
            return ("the source yielded no rows" + (f" (its where: filter left out all {c['skipped']})"
                                                   if c.get("skipped") else "") + ": nothing was written")
        return (f"no record was written: all {c['rejected']} were rejected ({_reasons(c)}). That usually means the "
                "recipe, not the data, is wrong (a field name, a {placeholder} in the prompt); see "
                f"{self.output_dir / 'rejects.jsonl'}")

    @property
    def warnings(self) -> list[str]:
        """Things worth a look in a build that did write records: a large share of rejected rows."""
        c = self.counts
        considered = c["read"] - c.get("skipped", 0)
        if c["written"] and considered and c["rejected"] / considered > REJECT_WARNING:
            return [f"{100 * c['rejected'] / considered:.1f}% of the rows were rejected ({_reasons(c)}); see "
                    f"{self.output_dir / 'rejects.jsonl'}, or set max_rejected to fail such builds"]
        return []

    @property
    def written(self) -> int:
        return self.counts["written"]

    @property
    def rejected(self) -> int:
        return self.counts["rejected"]


#: A build that rejects more than this share of its rows says so (``BuildResult.warnings``).
REJECT_WARNING = 0.1


class Splitter:
    """Seeded assignment of written records (by index) to train/val/test. Memory is O(val + test), never O(rows)."""

    def __init__(self, split: Split, total: int, seed: int):
        self.val: set[int] = set()
        self.test: set[int] = set()
        if not split.enabled:
            return
        k_val, k_test = _size(split.val, total), _size(split.test, total)
        if k_val + k_test > total:
            raise BuildError(
                f"split asks for {k_val} val + {k_test} test records but only {total} records were written; "
                "lower split.val/split.test or fix the rejected rows (see rejects.jsonl)"
            )
        if split.pick == "last":
            self.val = set(range(total - k_val, total))
            self.test = set(range(total - k_val - k_test, total - k_val))
        else:
            chosen = random.Random(seed).sample(range(total), k_val + k_test)
            self.val, self.test = set(chosen[:k_val]), set(chosen[k_val:])

    def __call__(self, position: int) -> str:
        return "val" if position in self.val else "test" if position in self.test else "train"


def _size(value: int | float, total: int) -> int:
    return int(value) if isinstance(value, int) else round(value * total)


def write_shard_manifest(layout: Layout, recipe: Recipe, fingerprint: str, shard: tuple[int, int],
                          num_tasks: int) -> BuildResult:
    stats = _collect_stats(layout, [t for t in range(num_tasks) if t % shard[1] == shard[0]])
    manifest = _manifest(layout, recipe, fingerprint, num_tasks, stats, datasets={})
    manifest["shard"] = list(shard)
    write_text_atomic(layout.root / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return result_from_manifest(layout, manifest)


def finalize(layout: Layout, recipe: Recipe, fingerprint: str, num_tasks: int, strict: bool = False) -> BuildResult:
    """Check every task finished, assemble rejects (and JSON arrays), register datasets, write the manifest."""
    missing = [t for t in range(num_tasks) if not layout.marker(t).exists()]
    if missing:
        raise BuildError(f"{layout.root}: tasks {missing[:10]} are not finished; build the missing shards first")
    stats = _collect_stats(layout, range(num_tasks))
    _concat_parts([layout.rejects_part(t) for t in range(num_tasks)], layout.root / "rejects.jsonl")
    if recipe.split.from_source:
        def labels() -> Iterator[str]:  # the source's own split of each staged record, in the same order
            return (line.rstrip("\n") for line in _staged_lines([layout.split_labels(t) for t in range(num_tasks)]))
        splits = list(SPLITS)
    else:
        splitter = Splitter(recipe.split, sum(s.written for s in stats), recipe.split_seed)
        labels = lambda: map(splitter, itertools.count())  # noqa: E731
        splits = ["train"] + [s for s, chosen in (("val", splitter.val), ("test", splitter.test)) if chosen]
    written, keys = _route_records(layout, [layout.part(t) for t in range(num_tasks)], labels, splits,
                                   recipe.output.shard_size, recipe.output.format, _uniform_keys(stats))
    datasets: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    for split in SPLITS:
        if not written.get(split):
            continue
        rel = os.path.relpath(layout.data_path(split), layout.dataset_info.parent).replace(os.sep, "/")
        name = layout.dataset_name(split)
        entries[name] = dataset_info_entry(recipe.output.format, rel, keys[split])
        datasets[name] = {"split": split, "file_name": rel, "count": written[split]}
    manifest = _manifest(layout, recipe, fingerprint, num_tasks, stats, datasets)
    counts = manifest["counts"]
    if strict:
        check_strict(layout, counts, f"nothing was registered in {layout.dataset_info}")
    check_reject_limit(layout, counts, recipe.max_rejected)
    if entries:
        merge_dataset_info(layout.dataset_info, entries, overwrite=recipe.output.overwrite)
    write_text_atomic(layout.root / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return result_from_manifest(layout, manifest)


def _uniform_keys(stats: list[TaskStats]) -> frozenset[str] | None:
    """The optional keys of every written record when all tasks saw the same ones, else None (look at the lines)."""
    written = [s.key_sets for s in stats if s.written]
    if any(k is None for k in written):
        return None
    key_sets = set().union(*written)
    return next(iter(key_sets)) if len(key_sets) == 1 else None


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts["rejected_by_reason"].items())


def check_strict(layout: Layout, counts: dict, what: str) -> None:
    if counts["rejected"]:
        raise BuildError(f"--strict: {counts['rejected']} record(s) rejected ({_reasons(counts)}); {what}; see "
                         f"{layout.root / 'rejects.jsonl'}")


def check_reject_limit(layout: Layout, counts: dict, limit: int | float | None) -> None:
    """``max_rejected``: a count (int) or a share of the rows considered (float < 1); above it nothing is registered."""
    considered = counts["read"] - counts.get("skipped", 0)
    if limit is None or not counts["rejected"]:
        return
    over = counts["rejected"] > limit if isinstance(limit, int) else counts["rejected"] > limit * considered
    if over:
        shown = f"{limit}" if isinstance(limit, int) else f"{100 * limit:g}% of {considered}"
        raise BuildError(f"max_rejected: {counts['rejected']} of {considered} rows were rejected, more than {shown} "
                         f"({_reasons(counts)}); nothing was registered in {layout.dataset_info}. See "
                         f"{layout.root / 'rejects.jsonl'}")


def check_names_free(layout: Layout, recipe: Recipe) -> None:
    """Refuse, before any data is written, a build whose dataset names ``dataset_info.json`` already gives to other
    files (a refused build must not leave its data behind for the next try to trip over)."""
    info = read_json(layout.dataset_info)
    if not isinstance(info, dict) or recipe.output.overwrite:
        return
    splits = SPLITS if layout.split_enabled else SPLITS[:1]
    clashes = []
    for split in splits:
        name = layout.dataset_name(split)
        ours = os.path.relpath(layout.data_path(split), layout.dataset_info.parent).replace(os.sep, "/")
        entry = info.get(name)
        if entry is not None and not (isinstance(entry, dict) and entry.get("file_name") == ours):
            clashes.append(name)
    if clashes:
        raise DatasetInfoError(
            f"{layout.dataset_info}: entries {', '.join(clashes)} already exist for other data; pass --overwrite "
            "(or output.overwrite: true) to replace them, or choose another output.name. Nothing was written")


def write_skipped(layout: Layout, skipped: dict[str, int]) -> None:
    """The rows the source left out on purpose (``where:``), by reason, for the manifest."""
    write_text_atomic(layout.state / "skipped.json", json.dumps(dict(sorted(skipped.items()))))


def _collect_stats(layout: Layout, tasks: Iterable[int]) -> list[TaskStats]:
    return [TaskStats.from_json(json.loads(layout.marker(t).read_text())) for t in tasks if layout.marker(t).exists()]


def _manifest(layout: Layout, recipe: Recipe, fingerprint: str, num_tasks: int, stats: list[TaskStats],
              datasets: dict) -> dict:
    rejected, by_source = Counter(), Counter()
    for s in stats:
        rejected.update(s.rejected)
        by_source.update(s.by_source)
    skipped = read_json(layout.state / "skipped.json") or {}
    counts = {
        "read": sum(s.read for s in stats) + sum(skipped.values()), "written": sum(s.written for s in stats),
        "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
        "by_split": {d["split"]: d["count"] for d in datasets.values()},
    }
    if skipped:
        counts["skipped"] = sum(skipped.values())
        counts["skipped_by_reason"] = skipped
    if by_source:
        counts["by_source"] = dict(sorted(by_source.items()))
    assert counts["read"] == counts["written"] + counts["rejected"] + counts.get("skipped", 0), counts
    budget = token_budget(recipe)
    for s in stats:
        if s.tokens:
            budget.merge(token_budget(recipe, s.tokens))
    tokens = {**budget.summary(), "max_answer": max((s.max_answer_tokens for s in stats), default=0),
              "summary": budget.format()}
    return {
        "mmdata_version": __version__,
        "name": recipe.name,
        "fingerprint": fingerprint,
        "shard": [0, 1],
        "num_tasks": num_tasks,
        "dataset_info": os.path.relpath(layout.dataset_info, layout.root).replace(os.sep, "/"),
        "datasets": datasets,
        "counts": counts,
        "image_max_pixels": recipe.images.max_pixels,
        "tokens": tokens,
        "recipe": recipe.model_dump(mode="json"),
    }


def result_from_manifest(layout: Layout, manifest: dict, up_to_date: bool = False) -> BuildResult:
    datasets = {name: layout.dataset_info.parent / d["file_name"] for name, d in manifest["datasets"].items()}
    return BuildResult(layout.root, layout.dataset_info if datasets else None, datasets, manifest["counts"],
                       up_to_date=up_to_date, manifest=layout.root / MANIFEST, shard=tuple(manifest["shard"]),
                       tokens=manifest.get("tokens"))


def _concat_parts(parts: list[Path], dest: Path) -> None:
    with replaced_on_close(dest, "wb") as out:
        for part in parts:
            if part.exists():
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)


# datasets' JSON loader reads a file in chunks of this many bytes (its ``chunksize``) and types each column from the
# first chunk it reads.
_JSON_CHUNK = 10 << 20


class _SplitWriter:
    """Streams one split's records into JSONL shards or one JSON array, swapped into place on close.

    Every line carries all the optional keys of its split (``keys``): a record without images in a split that has
    some gets ``"images": []``. Shards hold ``shard_size`` records, except in a split where some records lack a key
    that others have: there a shard ends only before a record that has them all (and the first shard only once it
    holds one). So every shard starts with a record whose lists are not empty, and LLaMA-Factory types ``images`` as
    a list of strings whichever shard it reads first (an all-empty first chunk types it as a list of nulls, and the
    next shard fails to cast).
    """

    def __init__(self, final: Path, file_format: str, shard_size: int, record_format: str,
                 keys: frozenset[str] = frozenset()):
        self.final, self.file_format, self.shard_size = final, file_format, shard_size
        self.record_format, self.keys = record_format, keys
        self.staging = final.with_name(final.name + ".tmp")
        self.count = self._in_shard = self._shards = 0
        self._untyped_bytes: int | None = 0  # bytes of shard 0 before its first complete record (None: seen one)
        self._file = None
        if self.staging.is_dir():
            shutil.rmtree(self.staging)
        if file_format == "jsonl":
            self.staging.mkdir(parents=True)

    def write(self, line: str) -> None:
        complete = optional_keys(line, self.record_format) == self.keys
        if not complete:
            line = fill_optional_keys(line, self.keys, self.record_format)
        if self.file_format == "jsonl":
            if self._file is None or (self._in_shard >= self.shard_size and complete and self._untyped_bytes is None):
                self._close_file()
                self._file = open(self.staging / f"part-{self._shards:05d}.jsonl", "w", encoding="utf-8")
                self._shards += 1
                self._in_shard = 0
            self._file.write(line)
            self._in_shard += 1
        else:
            if self._file is None:
                self._file = open(self.staging, "w", encoding="utf-8")
            self._file.write(("[\n" if self.count == 0 else ",\n") + line.rstrip("\n"))
        if self._untyped_bytes is not None:
            self._untyped_bytes = None if complete else self._untyped_bytes + len(line.encode("utf-8"))
        self.count += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self.file_format == "json" and self._file is not None:
            self._file.write("\n]\n")
        self._close_file()
        if self.file_format == "jsonl" and (self._untyped_bytes or 0) > _JSON_CHUNK // 2:
            warnings.warn(f"{self.final}/part-00000.jsonl starts with {self._untyped_bytes} bytes of records without "
                          f"{', '.join(sorted(self.keys))}: if LLaMA-Factory reads that shard first it may fail with "
                          "DatasetGenerationCastError; interleave the sources or use output.file_format: json",
                          stacklevel=2)
        if not self.count:
            if self.staging.is_dir():
                self.staging.rmdir()
            return
        if self.final.is_dir():
            shutil.rmtree(self.final)
        elif self.final.exists():
            self.final.unlink()
        os.replace(self.staging, self.final)


def _staged_lines(parts: list[Path]) -> Iterator[str]:
    for part in parts:
        if part.exists():
            with open(part, encoding="utf-8") as f:
                yield from f


def _route_records(layout: Layout, parts: list[Path], labels: Callable[[], Iterator[str]], splits: list[str],
                   shard_size: int, record_format: str, uniform: frozenset[str] | None = None):
    """Stream staged records in input order into their splits; returns per-split counts and optional keys.

    ``labels()`` gives the split of each staged record, in order (a fresh iterator per pass). ``uniform``: the
    optional keys of every record, when the tasks found them all alike (the common case); otherwise a first pass
    finds the keys each split has (see :class:`_SplitWriter`). The last pass writes."""
    if uniform is not None:
        keys = dict.fromkeys(splits, uniform)
    else:
        seen: dict[str, set[frozenset[str]]] = {split: set() for split in splits}
        for line, split in zip(_staged_lines(parts), labels(), strict=False):  # the Splitter's labels never end
            seen[split].add(optional_keys(line, record_format))
        keys = {split: frozenset().union(*kinds) for split, kinds in seen.items()}
    writers = {split: _SplitWriter(layout.data_path(split), layout.file_format, shard_size, record_format,
                                   keys[split]) for split in splits}
    for line, split in zip(_staged_lines(parts), labels(), strict=False):
        writers[split].write(line)
    for writer in writers.values():
        writer.close()
    counts = Counter({split: w.count for split, w in writers.items() if w.count})
    return counts, keys


def merge_shards(output_dir: str | os.PathLike, parts: list[str | os.PathLike], strict: bool = False) -> BuildResult:
    """Union shard build folders into ``output_dir`` (hard links where possible) and finalise.

    With no ``parts``, ``output_dir`` itself already holds every shard (shards built into one shared folder).
    """
    root = Path(output_dir).resolve()
    manifests = [read_json(Path(p) / MANIFEST) for p in parts] or [read_json(root / MANIFEST)]
    if any(m is None for m in manifests):
        raise BuildError("every shard folder needs its mmdata_build.json: build it with --shard I/N first")
    fingerprints = {m["fingerprint"] for m in manifests}
    if len(fingerprints) != 1:
        raise BuildError("the shard folders come from different recipes or sources (fingerprints differ)")
    base = manifests[0]
    from .recipes import validate_recipe

    recipe = validate_recipe(base["recipe"], origin=str(parts[0] if parts else root), base_dir=base["recipe"].get("base_dir"))
    recipe.output.dir = str(root)
    layout = Layout.for_recipe(recipe)
    part_dirs = [Path(p).resolve() for p in parts]
    with OutputLock(layout) as lock:
        claim_output(layout, recipe, base["fingerprint"], False, lock.take_over, beside=part_dirs)
        lock.claimed()
        for part in part_dirs:
            if part == root:
                continue
            for src in part.rglob("*"):
                if src.is_file() and src.name not in (MANIFEST, "state.json"):
                    dest = root / src.relative_to(part)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _link_file(src, dest)
        return finalize(layout, recipe, base["fingerprint"], base["num_tasks"], strict=strict)


def _link_file(src: Path, dest: Path) -> None:
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
