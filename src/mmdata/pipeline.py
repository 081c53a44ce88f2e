"""The build engine: source rows -> tasks -> (normalise, check, write) in workers -> finalise.

Rows are cut into tasks of ``output.shard_size`` rows. Task ``k`` owns rows ``[k*size, (k+1)*size)``: a source with
cheap random access (``Source.random_access``) hands the worker that range to read itself; other sources are read
once, in order, by the main process, which sends each task its rows. A task writes only its own files (a staged
``part-0000k.jsonl`` of its records, its images, its rejects), then a completion marker. Everything a task writes
depends only on its rows and the recipe, so:

- any number of workers gives the same bytes (``num_proc``);
- a killed build resumes by skipping tasks that have a marker (a task's files are complete before its marker; an
  unfinished task is redone and replaces whatever it had written);
- ``--shard I/N`` builds the tasks with ``k % N == I``; ``mmdata merge`` unions the parts and finalises;
- memory stays flat: at most a few tasks are in flight, nothing holds the whole dataset.

Finalising routes the staged records, in input order, into the splits: the split is drawn over *written* records, so
``val: 4`` gives exactly 4 validation records even when some rows were rejected. Each split becomes a folder of
fixed-size JSONL shards (or one JSON array). Then rejects are concatenated, ``dataset_info.json`` is merged and the
manifest ``mmdata_build.json`` is written last. An unchanged recipe on an unchanged source finds the manifest's
fingerprint equal and returns at once ("up to date") without writing anything.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ._version import __version__
from .errors import BuildError
from .finalize import (
    BuildResult,
    check_names_free,
    check_strict,
    finalize,
    result_from_manifest,
    write_shard_manifest,
    write_skipped,
)
from .layout import (
    MANIFEST,
    SPLITS,
    Layout,
    OutputLock,
    claim_output,
    input_paths,
    read_json,
    refuse_overlap,
    registered,
)
from .normalize import effective_fields
from .recipes import Recipe
from .sources import Source, open_source
from .task import RowRange, TaskContext

__all__ = ["SPLITS", "BuildResult", "Layout", "build_recipe", "records_fingerprint"]


def build_recipe(
    recipe: Recipe,
    num_proc: int | None = None,
    shard: tuple[int, int] = (0, 1),
    engine: str = "local",
    strict: bool = False,
    quiet: bool = True,
    rebuild: bool = False,
) -> BuildResult:
    """Build ``recipe``; see the module docstring for the guarantees.

    An OS error (disk full, read-only or unwritable output, unreadable input) stops the build with one
    :class:`BuildError` naming the file: every file is renamed into place complete, so nothing half-written is left
    visible, and rerunning the same command once the cause is fixed resumes from the finished tasks.

    ``rebuild`` redoes every task even when the build looks up to date: the fingerprint covers the recipe and the
    source's data files, not the image files that CSV/JSON rows point to.
    """
    try:
        return _build_recipe(recipe, num_proc, shard, engine, strict, quiet, rebuild)
    except OSError as e:
        raise BuildError(_os_error_message(e, recipe)) from e


def _os_error_message(e: OSError, recipe: Recipe) -> str:
    # A failed write() or close() carries no file name: it was a write under the output folder.
    where = e.filename or f"writing into {Path(recipe.output.dir).expanduser().resolve()}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space, then rerun the same command: finished tasks are kept and the build resumes"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make the output folder writable or choose another output.dir, then rerun the same command"
    else:
        fix = "fix the cause, then rerun the same command: finished tasks are kept and the build resumes"
    return f"{where}: {e.strerror or e}; nothing half-written was left in place. {fix[0].upper()}{fix[1:]}"


def _build_recipe(recipe: Recipe, num_proc: int | None, shard: tuple[int, int], engine: str, strict: bool,
                  quiet: bool, rebuild: bool = False) -> BuildResult:
    layout = Layout.for_recipe(recipe)
    source = open_source(recipe.source.type, recipe.source.params(), recipe.base_dir or ".")
    refuse_overlap(layout, *input_paths(recipe, source))
    if rebuild:
        source.refresh()  # no cached copy of the input may answer for files changed in place
    fingerprint = records_fingerprint(recipe, layout, source)
    shard_index, shard_count = shard
    if not (0 <= shard_index < shard_count):
        raise BuildError(f"--shard {shard_index}/{shard_count}: the index must be in 0..{shard_count - 1}")

    with OutputLock(layout, shard) as lock:
        manifest = read_json(layout.root / MANIFEST)
        if not rebuild and manifest and manifest.get("fingerprint") == fingerprint \
                and manifest.get("shard") == list(shard) and registered(layout, manifest, recipe):
            result = result_from_manifest(layout, manifest, up_to_date=True)
            if strict:
                check_strict(layout, manifest["counts"], "this build is up to date" + (
                    " and registered without --strict" if result.datasets else "; nothing is registered"))
            return result
        if shard_count == 1:
            check_names_free(layout, recipe)  # before anything is written, not after the data
        if recipe.dedup is not None:
            from .leakage import check_reference

            for spec in recipe.dedup.against:  # a wrong reference fails now, not after the whole source is read
                check_reference(spec, recipe.base_dir)
        claim_output(layout, recipe, fingerprint, rebuild, lock)
        lock.claimed()
        num_tasks, rows_read = _run_tasks(recipe, layout, source, shard, engine, num_proc, quiet)
        write_skipped(layout, source.skipped(rows_read))
        if shard_count > 1:
            return write_shard_manifest(layout, recipe, fingerprint, shard, num_tasks)
        return finalize(layout, recipe, fingerprint, num_tasks, strict=strict)


def _run_tasks(recipe: Recipe, layout: Layout, source: Source, shard: tuple[int, int], engine: str,
               num_proc: int | None, quiet: bool) -> tuple[int, int]:
    """Cut the source's rows into tasks, run this shard's unfinished ones; returns the number of tasks and of rows
    the source yielded (the ``where:`` count is taken up to that row)."""
    shard_index, shard_count = shard
    total = source.num_rows()
    if recipe.max_samples is not None:
        total = recipe.max_samples if total is None else min(total, recipe.max_samples)
    ctx = TaskContext(recipe, layout, effective_fields(recipe, getattr(source, "default_fields", {})),
                      source.image_root, source, tuple(source.allowed_roots))
    num_proc = num_proc or recipe.num_proc or os.cpu_count() or 1
    size = recipe.output.shard_size

    def wanted(task: int) -> bool:
        return task % shard_count == shard_index and not layout.marker(task).exists()

    progress = _progress(total, quiet, recipe.name)
    num_tasks = rows = 0

    def tasks() -> Iterator[tuple[int, list | RowRange]]:
        nonlocal num_tasks, rows
        if source.random_access and total is not None:
            # Workers read their own rows: the main process reads nothing, skipped tasks cost nothing.
            chunks: Iterator = (RowRange(a, min(a + size, total)) for a in range(0, total, size))
        else:
            chunks = _chunks(_limited(source.rows(), recipe.max_samples), size)
        for task, chunk in enumerate(chunks):
            num_tasks = task + 1
            rows += len(chunk)
            if wanted(task):
                yield task, chunk
            else:
                progress.update(len(chunk))

    runner = _engine(engine)
    for stats in runner(ctx, tasks(), num_proc):
        progress.update(stats.read)
    progress.close()
    return num_tasks, rows


def _engine(name: str):
    if name == "local":
        from .engines.local import run_local

        return run_local
    if name == "ray":
        from .engines.ray import run_ray

        return run_ray
    raise BuildError(f"unknown engine {name!r}: use local or ray")


def _limited(rows: Iterator[dict], limit: int | None) -> Iterator[tuple[int, dict]]:
    return enumerate(itertools.islice(rows, limit) if limit is not None else rows)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _progress(total: int | None, quiet: bool, name: str):
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: workers are forked
    return tqdm(total=total, disable=quiet, desc=f"build {name}", unit="rows", dynamic_ncols=True)


def records_fingerprint(recipe: Recipe, layout: Layout, source: Source) -> str:
    """Everything that decides the bytes of records and images; registry-only options are left out on purpose."""
    relevant = recipe.model_dump(mode="json", exclude={"description": True, "num_proc": True, "report": True,
                                                         "output": {"overwrite", "dataset_info", "dir"}})
    payload = json.dumps({"recipe": relevant, "media_prefix": layout.media_prefix, "source": source.fingerprint(),
                          "mmdata": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
