"""Finalising a build: route staged records into splits, write the split files, the rejects and the manifest, and
register the datasets; also ``mmdata merge`` of shard builds.

The split is drawn over *written* records, so ``val: 4`` gives exactly 4 validation records even when some rows were
rejected. Each split becomes a folder of fixed-size JSONL shards (or one JSON array). Then rejects are concatenated,
``dataset_info.json`` is merged and the manifest ``mmdata_build.json`` is written last.

A recipe with ``dedup`` or ``split.group_by`` finalises through :func:`_finalize_with_fingerprints` instead: the
tasks' fingerprints decide which records are duplicates (dropped, each a reject line in input order) and which
records must share a split, then the same writers run; see docs/quality.md. Every other build takes the path below,
unchanged, byte for byte.

Why over 400 lines: finalising is one ordered job (route, write, account, register, then the manifest last), and
the fingerprint path shares its writers and accounting; the split shard writer (``_SplitWriter``) is the piece to
move out when a second output format arrives.
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
from .dedup import DEDUP_REASONS, fingerprints_needed
from .errors import BuildError, DatasetInfoError
from .layout import MANIFEST, SPLITS, STATE_DIR, Layout, OutputLock, claim_output, keep_only_written, read_json
from .recipes import NEAR_THRESHOLD, Recipe, Split
from .task import TaskStats, token_budget
from .tokens import TokenBudget
from .writers.llamafactory import (
    dataset_info_entry,
    existing_dataset_info,
    fill_optional_keys,
    json_line,
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
    leakage: dict | None = None  # val/test records sharing images or text with train (builds with fingerprints)

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
        if not _failed(c):  # dedup dropped every record on purpose: the recipe's fields are not the cause
            return (f"no record was written: dedup dropped all {c['rejected']} ({_reasons(c)}): each repeats another "
                    f"record or one of dedup.against; see {self.output_dir / 'rejects.jsonl'}")
        reasons = set(c["rejected_by_reason"]) - set(DEDUP_REASONS)
        if reasons <= {"image file not found"}:  # every image missing: where they are, not the fields, is wrong
            return (f"no record was written: all {c['rejected']} were rejected ({_reasons(c)}): no image is where "
                    "the records point. Relative image paths resolve against source.image_root (default: the data "
                    "file's folder): set it to the folder the paths start from, or extract the images there; see "
                    f"{self.output_dir / 'rejects.jsonl'} for the paths tried")
        return (f"no record was written: all {c['rejected']} were rejected ({_reasons(c)}). That usually means the "
                "recipe, not the data, is wrong (a field name, a {placeholder} in the prompt); see "
                f"{self.output_dir / 'rejects.jsonl'}")

    @property
    def warnings(self) -> list[str]:
        """Things worth a look in a build that did write records: a large share of rejected rows."""
        c = self.counts
        considered = c["read"] - c.get("skipped", 0)
        failed = _failed(c)
        found = []
        if c["written"] and considered and failed / considered > REJECT_WARNING:
            found.append(f"{100 * failed / considered:.1f}% of the rows were rejected ({_reasons(c)}); see "
                         f"{self.output_dir / 'rejects.jsonl'}, or set max_rejected to fail such builds")
        for split, asked in c.get("unfilled_splits", {}).items():
            found.append(_unfilled(split, asked, c["written"]))
        if c.get("unreadable_reference_images"):
            found.append(f"{c['unreadable_reference_images']:,} image(s) of dedup.against could not be read (missing "
                         "or damaged files): a record of this build holding a copy of one of them was not dropped")
        return found

    @property
    def written(self) -> int:
        return self.counts["written"]

    @property
    def rejected(self) -> int:
        return self.counts["rejected"]


def _unfilled(split: str, asked: int | float, written: int) -> str:
    """Why a split the recipe asked for holds no record, and the fix."""
    if split == "train":
        return (f"no record went to train: split.val and split.test took all {written} written records; lower them "
                "(nothing is registered for training)")
    if _size(asked, written) == 0:
        return (f"no record went to {split}: split.{split}: {asked} of {written} written records rounds to 0; set "
                f"split.{split} to a count (split.{split}: 1) or a larger share")
    return (f"no record went to {split}: split.{split}: {asked} asks for {_size(asked, written)} of {written} "
            "records, but split.group_by keeps each group whole and none of the groups left fitted (groups fill val, "
            "then test, in a seeded order; one image under all records?); group by something finer, change "
            "split.val/split.test or split.seed, or drop split.group_by")


#: A build that rejects more than this share of its rows says so (``BuildResult.warnings``).
REJECT_WARNING = 0.1


class Splitter:
    """Seeded assignment of written records (by index) to train/val/test. Memory is O(val + test), never O(rows)."""

    def __init__(self, split: Split, total: int, seed: int):
        self.val: set[int] = set()
        self.test: set[int] = set()
        if not split.enabled or total == 0:  # nothing written: the build's problem says why, not a split error
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
    if fingerprints_needed(recipe):
        return _finalize_with_fingerprints(layout, recipe, fingerprint, num_tasks, stats, strict)
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
    return _register(layout, recipe, fingerprint, num_tasks, stats, written, keys, strict)


def _register(layout: Layout, recipe: Recipe, fingerprint: str, num_tasks: int, stats: list[TaskStats],
              written: Counter, keys: dict, strict: bool, quality: _Quality | None = None) -> BuildResult:
    """Check ``--strict``/``max_rejected``, register the written splits, write the manifest (last)."""
    datasets: dict[str, dict] = {}
    entries: dict[str, dict] = {}
    for split in SPLITS:
        if not written.get(split):
            continue
        rel = os.path.relpath(layout.data_path(split), layout.dataset_info.parent).replace(os.sep, "/")
        name = layout.dataset_name(split)
        entries[name] = dataset_info_entry(recipe.output.format, rel, keys[split])
        datasets[name] = {"split": split, "file_name": rel, "count": written[split]}
    manifest = _manifest(layout, recipe, fingerprint, num_tasks, stats, datasets, quality)
    counts = manifest["counts"]
    if strict:
        check_strict(layout, counts, f"nothing was registered in {layout.dataset_info}")
    check_reject_limit(layout, counts, recipe.max_rejected)
    if entries:
        merge_dataset_info(layout.dataset_info, entries, overwrite=recipe.output.overwrite)
    write_text_atomic(layout.root / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    keep_only_written(layout)
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


def _failed(counts: dict) -> int:
    """Rejected rows that failed, leaving out the records dedup dropped on purpose (duplicates, leaks): those are
    rejects in the counts and in rejects.jsonl, but never fail ``--strict``/``max_rejected`` nor warn."""
    return counts["rejected"] - sum(counts["rejected_by_reason"].get(r, 0) for r in DEDUP_REASONS)


def check_strict(layout: Layout, counts: dict, what: str) -> None:
    if _failed(counts):
        raise BuildError(f"--strict: {_failed(counts)} record(s) rejected ({_reasons(counts)}); {what}; see "
                         f"{layout.root / 'rejects.jsonl'}")


def check_reject_limit(layout: Layout, counts: dict, limit: int | float | None) -> None:
    """``max_rejected``: a count (int) or a share of the rows considered (float < 1); above it nothing is registered."""
    considered = counts["read"] - counts.get("skipped", 0)
    failed = _failed(counts)
    if limit is None or not failed:
        return
    over = failed > limit if isinstance(limit, int) else failed > limit * considered
    if over:
        shown = f"{limit}" if isinstance(limit, int) else f"{100 * limit:g}% of {considered}"
        raise BuildError(f"max_rejected: {failed} of {considered} rows were rejected, more than {shown} "
                         f"({_reasons(counts)}); nothing was registered in {layout.dataset_info}. See "
                         f"{layout.root / 'rejects.jsonl'}")


def check_names_free(layout: Layout, recipe: Recipe) -> None:
    """Refuse, before any data is written, a build whose dataset names ``dataset_info.json`` already gives to other
    files (a refused build must not leave its data behind for the next try to trip over)."""
    info = existing_dataset_info(layout.dataset_info)  # one mmdata could not merge into is refused now, not at the end
    if recipe.output.overwrite:
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
              datasets: dict, quality: _Quality | None = None) -> dict:
    rejected, by_source = Counter(), Counter()
    for s in stats:
        rejected.update(s.rejected)
        by_source.update(s.by_source)
    dropped = sum(quality.dropped.values()) if quality else 0
    if quality:  # dedup's drops move from written to rejected
        rejected.update(quality.dropped)
        by_source.subtract(quality.dropped_by_source)
        by_source = Counter({k: v for k, v in by_source.items() if v})
    skipped = read_json(layout.state / "skipped.json") or {}
    counts = {
        "read": sum(s.read for s in stats) + sum(skipped.values()),
        "written": sum(s.written for s in stats) - dropped,
        "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
        "by_split": {d["split"]: d["count"] for d in datasets.values()},
    }
    unfilled = {s: getattr(recipe.split, s) for s in ("val", "test") if getattr(recipe.split, s)
                and not counts["by_split"].get(s)}
    if recipe.split.enabled and not recipe.split.from_source and not counts["by_split"].get("train"):
        unfilled["train"] = 0  # (from_source: the source splits chosen may hold no train, on purpose)
    if datasets and unfilled:  # a split the recipe asked for came out empty: BuildResult.warnings says why
        counts["unfilled_splits"] = unfilled
    if skipped:
        counts["skipped"] = sum(skipped.values())
        counts["skipped_by_reason"] = skipped
    if by_source:
        counts["by_source"] = dict(sorted(by_source.items()))
    if quality and quality.unreadable_reference_images:
        counts["unreadable_reference_images"] = quality.unreadable_reference_images
    assert counts["read"] == counts["written"] + counts["rejected"] + counts.get("skipped", 0), counts
    budget = token_budget(recipe)
    for s in stats:
        if s.tokens:
            budget.merge(TokenBudget.from_json(s.tokens))  # only the counts merge: no counter (profile) per task
    max_answer = max((s.max_answer_tokens for s in stats), default=0)
    if quality and quality.tokens is not None:  # recounted over the records kept
        budget, max_answer = token_budget(recipe, quality.tokens), quality.max_answer
    tokens = {**budget.summary(), "max_answer": max_answer, "summary": budget.format()}
    manifest = {
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
    if quality:
        manifest.update((key, quality.sections[key]) for key in ("dedup", "grouped_split", "leakage")
                        if key in quality.sections)
    return manifest


def result_from_manifest(layout: Layout, manifest: dict, up_to_date: bool = False) -> BuildResult:
    datasets = {name: layout.dataset_info.parent / d["file_name"] for name, d in manifest["datasets"].items()}
    return BuildResult(layout.root, layout.dataset_info if datasets else None, datasets, manifest["counts"],
                       up_to_date=up_to_date, manifest=layout.root / MANIFEST, shard=tuple(manifest["shard"]),
                       tokens=manifest.get("tokens"), leakage=manifest.get("leakage"))


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


def _route_records(layout: Layout, parts: list[Path], labels: Callable[[], Iterator[str | None]], splits: list[str],
                   shard_size: int, record_format: str, uniform: frozenset[str] | None = None,
                   on_drop: Callable[[int, str], None] | None = None):
    """Stream staged records in input order into their splits; returns per-split counts and optional keys.

    ``labels()`` gives the split of each staged record, in order (a fresh iterator per pass); ``None`` drops the
    record (a duplicate), which the writing pass hands to ``on_drop(index, line)``. ``uniform``: the optional keys
    of every record, when the tasks found them all alike (the common case); otherwise a first pass finds the keys
    each split has (see :class:`_SplitWriter`). The last pass writes."""
    if uniform is not None:
        keys = dict.fromkeys(splits, uniform)
    else:
        seen: dict[str, set[frozenset[str]]] = {split: set() for split in splits}
        for line, split in zip(_staged_lines(parts), labels(), strict=False):  # the Splitter's labels never end
            if split is not None:
                seen[split].add(optional_keys(line, record_format))
        keys = {split: frozenset().union(*kinds) for split, kinds in seen.items()}
    writers = {split: _SplitWriter(layout.data_path(split), layout.file_format, shard_size, record_format,
                                   keys[split]) for split in splits}
    for index, (line, split) in enumerate(zip(_staged_lines(parts), labels(), strict=False)):
        if split is None:
            on_drop(index, line)
            continue
        writers[split].write(line)
    for writer in writers.values():
        writer.close()
    counts = Counter({split: w.count for split, w in writers.items() if w.count})
    return counts, keys


@dataclass
class _Quality:
    """What dedup and grouped splits change in a manifest: records dropped (by reason and by source), the token
    budget recounted over the kept records, and the manifest sections (``dedup``, ``leakage``, ``grouped_split``)."""

    dropped: Counter
    dropped_by_source: Counter
    tokens: dict | None
    max_answer: int
    sections: dict
    unreadable_reference_images: int = 0  # dedup.against images that could not be read (a warning)


_SPLIT_CODE = {split: code for code, split in enumerate(SPLITS)}
_DUPLICATE_OF = {"exact": "the same conversation on the same image bytes", "image": "the same image bytes",
                 "near": "the same image(s) up to near copies", "text": "the same conversation text"}


def _finalize_with_fingerprints(layout: Layout, recipe: Recipe, fingerprint: str, num_tasks: int,
                                stats: list[TaskStats], strict: bool) -> BuildResult:
    """``finalize`` for recipes with ``dedup`` or ``split.group_by``; everything is decided in input order from the
    staged fingerprints, so any number of workers (and a resumed build) gives the same bytes.

    1. duplicates: :func:`mmdata.dedup.find_duplicates` (the first occurrence is kept; ``dedup.against`` datasets
       count as coming first, and a record repeating one of theirs is a ``leak``);
    2. splits over the kept records: the seeded row split, the source's own splits, or whole groups
       (:func:`mmdata.dedup.assign_groups`);
    3. the split files, with the dropped records as reject lines merged into ``rejects.jsonl`` in input order;
    4. the leakage of val/test into train, ``fingerprints.npz`` (for ``check-leakage`` and the report), then
       registration and the manifest as for every build.
    """
    import numpy as np

    from .dedup import (
        assign_groups,
        find_duplicates,
        groups_by_image,
        groups_by_value,
        image_labels,
        leak_matches,
        load_task_fingerprints,
    )

    fp = load_task_fingerprints(layout, num_tasks)
    if len(fp) != sum(s.written for s in stats):
        raise BuildError(f"{layout.state}: the staged fingerprints do not match the staged records; rerun with "
                         "--rebuild")
    dedup = recipe.dedup
    near = dedup is not None and dedup.mode == "near"
    threshold = dedup.threshold if near else NEAR_THRESHOLD if recipe.split.group_by == "near" else None
    reference, reference_names = None, []
    if dedup is not None and dedup.against:
        from .leakage import build_records_for_dedup

        reference, reference_names = build_records_for_dedup(dedup.against, near, recipe.base_dir)
    found = find_duplicates(fp, dedup.mode, dedup.threshold, reference.fp if reference else None) if dedup else None
    dropped = found.dropped if found else np.zeros(len(fp), dtype=bool)
    kept = np.flatnonzero(~dropped)
    kept_fp = fp.take(kept)

    codes = np.full(len(fp), -1, dtype=np.int8)  # per staged record: -1 dropped, else its split
    sections: dict[str, Any] = {}
    if recipe.split.from_source:
        source_codes = np.array([_SPLIT_CODE[line.rstrip("\n")] for line in
                                 _staged_lines([layout.split_labels(t) for t in range(num_tasks)])], dtype=np.int8)
        codes[kept] = source_codes[kept]
        splits = list(SPLITS)
    elif recipe.split.group_by is not None and len(kept):
        k_val, k_test = _size(recipe.split.val, len(kept)), _size(recipe.split.test, len(kept))
        if k_val + k_test > len(kept):
            raise BuildError(f"split asks for {k_val} val + {k_test} test records but only {len(kept)} records were "
                             "written; lower split.val/split.test or fix the rejected rows (see rejects.jsonl)")
        if recipe.split.group_by in ("image", "near"):
            if found is not None and found.labels is not None and (near or recipe.split.group_by == "image"):
                labels = found.labels[fp.image_index(kept)]  # the clusters dedup found (near ones under dedup: near)
            else:
                labels = image_labels(kept_fp.image, kept_fp.phash if recipe.split.group_by == "near" else None,
                                      threshold or 0)
            groups = groups_by_image(kept_fp.offsets, labels)
        else:
            groups = groups_by_value(kept_fp.group, kept_fp.has_group)
        codes[kept] = assign_groups(groups, kept_fp.position, k_val, k_test, recipe.split_seed)
        sections["grouped_split"] = {"by": recipe.split.group_by, "groups": int(len(np.unique(groups))),
                                     "asked": {"val": k_val, "test": k_test}}
        splits = ["train"] + [s for c, s in ((1, "val"), (2, "test")) if (codes == c).any()]
    else:
        splitter = Splitter(recipe.split, len(kept), recipe.split_seed)
        split_of_kept = np.zeros(len(kept), dtype=np.int8)
        split_of_kept[list(splitter.val)] = 1
        split_of_kept[list(splitter.test)] = 2
        codes[kept] = split_of_kept
        splits = ["train"] + [s for s, chosen in (("val", splitter.val), ("test", splitter.test)) if chosen]

    code_list = codes.tolist()
    staged_drops = layout.state / "dedup-rejects.jsonl"
    with replaced_on_close(staged_drops) as staged:
        drops = _DropRejects(staged, layout, fp, found, recipe, reference, reference_names)
        written, keys = _route_records(layout, [layout.part(t) for t in range(num_tasks)],
                                       lambda: (None if c < 0 else SPLITS[c] for c in code_list), splits,
                                       recipe.output.shard_size, recipe.output.format, _uniform_keys(stats),
                                       on_drop=drops.add)
    task_rejects = [layout.rejects_part(t) for t in range(num_tasks)]
    if dropped.any():
        _merge_rejects(task_rejects, staged_drops, layout.root / "rejects.jsonl")
    else:
        _concat_parts(task_rejects, layout.root / "rejects.jsonl")

    kept_codes = codes[kept].astype(np.uint8)
    if recipe.split.enabled:
        train, held = np.flatnonzero(kept_codes == 0), np.flatnonzero(kept_codes > 0)
        matches = leak_matches(kept_fp.take(held), kept_fp.take(train), threshold)
        sections["leakage"] = {kind: int((m >= 0).sum()) for kind, m in matches.items()}
    index = np.zeros(len(kept), dtype=np.int64)
    for c in range(len(SPLITS)):
        index[kept_codes == c] = np.arange(int((kept_codes == c).sum()))
    arrays = {"position": kept_fp.position, "split": kept_codes, "index": index, "text": kept_fp.text,
              "offsets": kept_fp.offsets, "image": kept_fp.image}
    if kept_fp.phash is not None:
        arrays["phash"] = kept_fp.phash
    arrays["mode"] = np.array(dedup.mode if dedup else "")
    arrays["threshold"] = np.array(-1 if threshold is None else threshold, dtype=np.int64)
    from .dedup import save_arrays
    from .leakage import FINGERPRINTS

    save_arrays(layout.root / FINGERPRINTS, arrays)

    reasons = Counter()
    by_source = Counter()
    if found is not None:
        reasons.update({"duplicate": int((found.duplicate_of >= 0).sum()), "leak": int((found.leak_of >= 0).sum())})
        if fp.source is not None:
            for code in fp.source[dropped].tolist():
                if code >= 0 and fp.source_names[code]:
                    by_source[fp.source_names[code]] += 1
        sections["dedup"] = {"mode": dedup.mode, **({"threshold": dedup.threshold} if near else {}),
                             "duplicates": reasons["duplicate"], "leaks": reasons["leak"],
                             **({"against": list(dedup.against)} if dedup.against else {})}
    reasons = Counter({k: v for k, v in reasons.items() if v})
    tokens, max_answer = None, 0
    if dropped.any():
        tokens, max_answer = _kept_tokens(recipe, kept_fp.tokens), int(kept_fp.answer_tokens.max(initial=0))
    quality = _Quality(reasons, by_source, tokens, max_answer, sections, reference.unreadable if reference else 0)
    return _register(layout, recipe, fingerprint, num_tasks, stats, written, keys, strict, quality)


def _kept_tokens(recipe: Recipe, lengths) -> dict:
    """The token budget (its JSON form) of the records kept, from their per-record lengths."""
    import numpy as np

    budget = token_budget(recipe)
    buckets, counts = np.unique(lengths // budget.bucket, return_counts=True)
    return {"count": int(len(lengths)), "over": int((lengths > budget.cutoff_len).sum()),
            "max": int(lengths.max(initial=0)), "total": int(lengths.sum()),
            "hist": {str(int(b)): int(n) for b, n in zip(buckets, counts, strict=True)}}


class _DropRejects:
    """Writes the reject lines of the records dedup drops, in input order, to ``out`` (staged in
    ``.mmdata/dedup-rejects.jsonl``): position, id, reason (``duplicate`` or ``leak``), message, what it repeats and
    its images (the files stay in ``images/``, where the report shows them beside the record kept)."""

    def __init__(self, out, layout: Layout, fp, found, recipe: Recipe, reference, reference_names: list[str]):
        self._file, self.layout, self.fp, self.found, self.recipe = out, layout, fp, found, recipe
        self.reference, self.reference_names = reference, reference_names
        self._ids: tuple[int, Any] | None = None

    def _record_id(self, index: int):
        import numpy as np

        from .dedup import TaskRecordIds

        task = int(np.searchsorted(self.fp.task_starts, index, side="right") - 1)
        if self._ids is None or self._ids[0] != task:
            self._ids = (task, TaskRecordIds(self.layout, task))
        return self._ids[1][index - int(self.fp.task_starts[task])]

    def add(self, index: int, line: str) -> None:
        fp, found, dedup = self.fp, self.found, self.recipe.dedup
        entry: dict[str, Any] = {"position": int(fp.position[index]), "id": self._record_id(index)}
        what = _DUPLICATE_OF[dedup.mode] + (f" (pHash within {dedup.threshold} bits)" if dedup.mode == "near" else "")
        if found.duplicate_of[index] >= 0:
            original = int(fp.position[found.duplicate_of[index]])
            entry.update(reason="duplicate", message=f"duplicate: {what} as the record of row {original} (dedup: "
                                                     f"{dedup.mode})", duplicate_of=original)
        else:
            ref = int(found.leak_of[index])
            name = self.reference_names[int(self.reference.dataset[ref])]
            at = int(self.reference.index[ref])
            entry.update(reason="leak", message=f"leak: {what} as record {at} of {name} (dedup.against)",
                         leaks_into={"dataset": name, "index": at})
        if fp.source is not None and fp.source[index] >= 0 and fp.source_names[fp.source[index]]:
            entry["source"] = fp.source_names[fp.source[index]]
        images = json.loads(line).get("images") if '"images":' in line else None
        if images:
            entry["images"] = images
        self._file.write(json_line(entry) + "\n")


def _merge_rejects(parts: list[Path], dropped: Path, dest: Path) -> None:
    """``rejects.jsonl``: the tasks' reject lines and dedup's, merged by input position (both are in order)."""
    import heapq

    def lines(paths: list[Path]) -> Iterator[tuple[int, str]]:
        for path in paths:
            if path.exists():
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        yield json.loads(line)["position"], line

    with replaced_on_close(dest) as out:
        for _, line in heapq.merge(lines(parts), lines([dropped]), key=lambda item: item[0]):
            out.write(line)


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
        shared_info = any(((m.get("recipe") or {}).get("output") or {}).get("dataset_info") for m in manifests)
        raise BuildError("the shard folders come from different recipes or sources (fingerprints differ)" + (
            "; with output.dataset_info set, the records' image paths depend on each part's folder: build every "
            "part into one shared output.dir (--shard I/N parts run side by side there), then `mmdata merge DIR`"
            if shared_info else ""))
    base = manifests[0]
    from .recipes import validate_recipe

    recipe = validate_recipe(base["recipe"], origin=str(parts[0] if parts else root), base_dir=base["recipe"].get("base_dir"))
    recipe.output.dir = str(root)
    layout = Layout.for_recipe(recipe)
    part_dirs = [Path(p).resolve() for p in parts]
    with OutputLock(layout) as lock:
        claim_output(layout, recipe, base["fingerprint"], False, lock, beside=part_dirs)
        lock.claimed()
        for part in part_dirs:
            if part != root:
                _take_shard_part(part, root)
        return finalize(layout, recipe, base["fingerprint"], base["num_tasks"], strict=strict)


def _take_shard_part(part: Path, root: Path) -> None:
    """Link what a ``--shard`` build staged into ``root``: its resume state (task parts, markers, rejects,
    fingerprints) and its images, nothing else. A part folder may also hold a ``dataset_info.json`` (an earlier
    trial build), a report or a user's own files: linking those replaced the target's (a user's 104-entry registry
    became the part's one entry). Images are content-addressed, so one already in ``root`` is the same bytes and
    is left as it is; state files are mmdata's own in both folders."""
    for top in (STATE_DIR, "images"):
        folder = part / top
        for src in folder.rglob("*") if folder.is_dir() else ():
            inside = src.relative_to(folder).parts
            if not src.is_file() or src.is_symlink() or (top == STATE_DIR and (inside[0] == "running"
                                                                               or src.name == "state.json")):
                continue
            dest = root / src.relative_to(part)
            if top == "images" and dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_file(src, dest)


def _link_file(src: Path, dest: Path) -> None:
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
