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

import dataclasses
import errno
import hashlib
import itertools
import json
import os
import random
import shutil
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import __version__
from .errors import BuildError, SampleError
from .images import convert_image, inspect_image, link_or_copy, write_new_image
from .normalize import Draft, effective_fields, normalize_row
from .recipes import Recipe, Split
from .samples import Sample
from .sources import Source, open_source
from .tokens import LF_CUTOFF_LEN, TokenBudget, token_counter
from .writers.llamafactory import (
    dataset_info_entry,
    fill_optional_keys,
    merge_dataset_info,
    optional_keys,
    record_json,
    unregister_datasets,
    write_text_atomic,
)

MANIFEST = "mmdata_build.json"
STATE_DIR = ".mmdata"
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------- layout & split


@dataclass(frozen=True)
class Layout:
    """Where every file of a build goes. Paths in records are relative to the folder of ``dataset_info.json``."""

    root: Path
    name: str
    file_format: str
    split_enabled: bool
    dataset_info: Path

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> Layout:
        root = Path(recipe.output.dir).expanduser().resolve()
        info = Path(recipe.output.dataset_info).expanduser().resolve() if recipe.output.dataset_info else root / "dataset_info.json"
        return cls(root, recipe.dataset_name, recipe.output.file_format, recipe.split.enabled, info)

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @cached_property  # read for every record
    def media_prefix(self) -> str:
        """Relative path from the dataset_info folder to the output folder ('' when they are the same)."""
        rel = os.path.relpath(self.root, self.dataset_info.parent)
        return "" if rel == "." else rel.replace(os.sep, "/") + "/"

    def dataset_name(self, split: str) -> str:
        return f"{self.name}_{split}" if self.split_enabled else self.name

    def data_path(self, split: str) -> Path:
        """The ``file_name`` target: a shard folder (jsonl) or one JSON array file (json)."""
        base = self.root / self.dataset_name(split)
        return base if self.file_format == "jsonl" else base.with_suffix(".json")

    def part(self, task: int) -> Path:
        """A task's staged records, in input order, before finalising routes them into splits."""
        return self.state / "parts" / f"part-{task:05d}.jsonl"

    def rejects_part(self, task: int) -> Path:
        return self.state / "rejects" / f"part-{task:05d}.jsonl"

    def marker(self, task: int) -> Path:
        return self.state / "done" / f"task-{task:05d}.json"

    def image(self, task: int, position: int, k: int, extension: str) -> Path:
        return self.root / self.image_rel(task, position, k, extension)

    @staticmethod
    def image_rel(task: int, position: int, k: int, extension: str) -> str:
        """An image's path relative to the output folder, as records spell it (after ``media_prefix``)."""
        return f"images/{task:05d}/{position:09d}_{k}.{extension}"

    def owned_paths(self) -> list[Path]:
        """Everything a build of this layout may create (what a rebuild removes; nothing else is touched)."""
        return [*(self.data_path(s) for s in SPLITS), self.root / "images", self.root / "rejects.jsonl",
                self.root / MANIFEST, self.state]


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


# ----------------------------------------------------------------------------------------------- task execution


@dataclass
class TaskContext:
    """What a worker needs to process any task; built once per process."""

    recipe: Recipe
    layout: Layout
    fields: dict[str, str | None]
    image_root: Path
    source: Source | None = None  # read by workers when tasks are row ranges (``Source.random_access``)
    allowed_roots: tuple[Path, ...] = ()  # where record image paths may point (default: image_root only)


@dataclass(frozen=True)
class RowRange:
    """A task's rows by position, read by the worker itself (sources with cheap random access): nothing is pickled."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def _token_budget(recipe: Recipe, data: dict | None = None) -> TokenBudget:
    """Token lengths of written records (estimated, at the image budget LLaMA-Factory will use) vs its default
    cutoff_len: the build summary's ``tokens`` line and the manifest's ``tokens``, which ``mmdata llamafactory``
    turns into ``cutoff_len``."""
    counter = dataclasses.replace(token_counter(None, recipe.images.max_pixels),
                                  label="estimated (mmdata validate --tokenizer DIR counts exactly)")
    options = {"cutoff_len": LF_CUTOFF_LEN, "counter": counter}
    return TokenBudget.from_json(data, **options) if data else TokenBudget(**options)


@dataclass
class TaskStats:
    task: int
    read: int = 0
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    by_source: Counter = field(default_factory=Counter)
    tokens: dict | None = None  # TokenBudget.to_json() of the written records
    max_answer_tokens: int = 0
    # the optional-key sets of its lines (see the writer); None for markers written before they were recorded
    key_sets: set[frozenset[str]] | None = field(default_factory=set)

    def to_json(self) -> dict:
        return {"task": self.task, "read": self.read, "written": self.written,
                "rejected": dict(sorted(self.rejected.items())), "by_source": dict(sorted(self.by_source.items())),
                "tokens": self.tokens, "max_answer_tokens": self.max_answer_tokens,
                "key_sets": None if self.key_sets is None else sorted(sorted(k) for k in self.key_sets)}

    @classmethod
    def from_json(cls, data: dict) -> TaskStats:
        key_sets = None if data.get("key_sets") is None else {frozenset(k) for k in data["key_sets"]}
        return cls(data["task"], data["read"], data["written"], Counter(data["rejected"]),
                   Counter(data.get("by_source", {})), data.get("tokens"), data.get("max_answer_tokens", 0), key_sets)


@dataclass
class _PreparedImage:
    ref_path: Path | None
    data: bytes | None  # None: a file to link, never read whole (``images: link`` with ``verify: header``)
    extension: str
    width: int
    height: int


def run_task(ctx: TaskContext, task: int, rows: Iterable[tuple[int, dict]] | RowRange) -> TaskStats:
    """Process one task's rows (``(position, row)`` pairs, or a :class:`RowRange` of the source) and write its files;
    the completion marker is written last."""
    layout = ctx.layout
    if isinstance(rows, RowRange):
        rows = zip(itertools.count(rows.start), ctx.source.read_rows(rows.start, rows.stop))
    stats = TaskStats(task)
    budget = _token_budget(ctx.recipe)
    lines: list[str] = []
    rejects: list[str] = []
    for position, row in rows:
        stats.read += 1
        source_name = row.pop("__source__", None) if isinstance(row, dict) else None
        try:
            line, sample, sizes = _process_row(ctx, task, position, row)
            lines.append(line)
            stats.key_sets.add(optional_keys(line, ctx.recipe.output.format))
            turns = [(m.role, m.content) for m in sample.messages]
            budget.add(turns, sizes)
            stats.max_answer_tokens = max([stats.max_answer_tokens, *(
                budget.counter.text(content) for role, content in turns if role == "assistant")])
        except SampleError as e:
            stats.rejected[e.kind] += 1
            rejects.append(_reject_line(position, row, ctx.fields, e.kind, str(e), source_name))
            continue
        stats.written += 1
        if source_name:
            stats.by_source[source_name] += 1
    stats.tokens = budget.to_json()
    _write_lines(layout.part(task), lines)
    _write_lines(layout.rejects_part(task), rejects)
    marker = layout.marker(task)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(stats.to_json()))
    return stats


def _process_row(ctx: TaskContext, task: int, position: int, row: dict) -> tuple[str, Sample, list[tuple[int, int]]]:
    """The line written for one row, its sample, and the sizes of its images."""
    recipe, layout = ctx.recipe, ctx.layout
    draft = normalize_row(row, position, recipe, ctx.fields, ctx.image_root, ctx.allowed_roots)
    prepared = [_prepare_image(ref, recipe) for ref in draft.images]
    _apply_filters(recipe, draft, prepared)
    image_rels = [layout.image_rel(task, position, k, img.extension) for k, img in enumerate(prepared)]
    try:
        sample = Sample.model_validate(
            {"messages": draft.messages, "videos": draft.videos,
             "images": [layout.media_prefix + rel for rel in image_rels]},
            context={"allow_empty_answer": recipe.for_prediction},
        )
    except ValidationError as e:
        raise SampleError("invalid sample: " + "; ".join(_short(err) for err in e.errors()), kind="invalid sample") from None
    for img, path in zip(prepared, (layout.root / rel for rel in image_rels), strict=True):
        if img.ref_path is not None and recipe.images.mode == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(img.ref_path, path, img.data)
        else:
            write_new_image(path, img.data)
    return record_json(sample, recipe.output.format), sample, [(img.width, img.height) for img in prepared]


def _short(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _prepare_image(ref, recipe: Recipe) -> _PreparedImage:
    opts = recipe.images
    try:
        # A file that will be linked is only opened for verification (PIL reads what the check needs).
        data = ref.path if opts.mode == "link" and ref.data is None else ref.read()
        if isinstance(data, Path) and not data.is_file():
            raise IsADirectoryError if data.is_dir() else FileNotFoundError
    except FileNotFoundError:
        raise SampleError(f"image file not found: {ref.path}", kind="image file not found") from None
    except IsADirectoryError:
        raise SampleError(f"image path is a folder: {ref.path}", kind="image file not found") from None
    except OSError as e:
        raise SampleError(f"cannot read image {ref.path}: {e.strerror}", kind="image unreadable") from None
    try:
        if opts.mode == "convert":
            inspect_image(data, "header")
            data, info = convert_image(data, opts.max_pixels, opts.format, opts.quality)
        else:
            info = inspect_image(data, opts.verify)
    except SampleError as e:
        raise SampleError(f"{e} [{ref.path or 'embedded bytes'}]", kind="image unreadable") from None
    return _PreparedImage(ref.path, data if isinstance(data, bytes) else None, info.extension, info.width, info.height)


def _apply_filters(recipe: Recipe, draft: Draft, images: list[_PreparedImage]) -> None:
    f = recipe.filters
    answer = next((m["content"] for m in reversed(draft.messages) if m.get("role") == "assistant"), "")
    question = next((m["content"] for m in draft.messages if m.get("role") == "user"), "")
    checks = [
        (f.min_answer_chars, lambda: len(answer) < f.min_answer_chars, "answer shorter than min_answer_chars"),
        (f.max_answer_chars, lambda: len(answer) > f.max_answer_chars, "answer longer than max_answer_chars"),
        (f.min_question_chars, lambda: len(question) < f.min_question_chars, "question shorter than min_question_chars"),
        (f.max_question_chars, lambda: len(question) > f.max_question_chars, "question longer than max_question_chars"),
        (f.require_images or None, lambda: not images, "no image"),
    ]
    for img in images:
        checks += [
            (f.min_image_side, lambda i=img: min(i.width, i.height) < f.min_image_side, "image smaller than min_image_side"),
            (f.max_image_side, lambda i=img: max(i.width, i.height) > f.max_image_side, "image larger than max_image_side"),
            (f.max_aspect_ratio, lambda i=img: max(i.width, i.height) / min(i.width, i.height) > f.max_aspect_ratio,
             "image aspect ratio above max_aspect_ratio"),
        ]
    for bound, failed, reason in checks:
        if bound is not None and isinstance(answer, str) and isinstance(question, str) and failed():
            raise SampleError(f"filtered: {reason}", kind=f"filtered: {reason}")


def _reject_line(position: int, row: Any, fields: dict, kind: str, message: str, source: str | None) -> str:
    record_id = None
    if isinstance(row, dict):
        record_id = row.get(fields.get("id") or "id")
        if not isinstance(record_id, (str, int, float)) or isinstance(record_id, bool):
            record_id = None
    entry = {"position": position, "id": record_id, "reason": kind, "message": message}
    if source:
        entry["source"] = source
    return json.dumps(entry, ensure_ascii=False, default=str)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not lines:
        if path.exists():
            path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- executors

_WORKER_CTX: TaskContext | None = None


def _init_worker(ctx: TaskContext, parent: int | None = None) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ctx
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: a worker gets SIGKILL when the build process dies (``kill -9``), so no orphan keeps writing files
    while the build is resumed."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


def _run_in_worker(task: int, rows: list[tuple[int, dict]] | RowRange) -> TaskStats:
    assert _WORKER_CTX is not None
    return run_task(_WORKER_CTX, task, rows)


def run_local(ctx: TaskContext, tasks: Iterable[tuple[int, list | RowRange]], num_proc: int) -> Iterator[TaskStats]:
    """Run tasks in this process (``num_proc == 1``) or a forked process pool with a bounded number in flight."""
    if num_proc <= 1:
        for task, rows in tasks:
            yield run_task(ctx, task, rows)
        return
    import multiprocessing

    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(ctx, os.getpid())) as pool:
        pending = set()
        for task, rows in tasks:
            pending.add(pool.submit(_run_in_worker, task, rows))
            if len(pending) >= 2 * num_proc:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        for fut in pending:
            yield fut.result()


# ----------------------------------------------------------------------------------------------- the build


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
    def written(self) -> int:
        return self.counts["written"]

    @property
    def rejected(self) -> int:
        return self.counts["rejected"]


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
    fingerprint = records_fingerprint(recipe, layout, source)
    shard_index, shard_count = shard
    if not (0 <= shard_index < shard_count):
        raise BuildError(f"--shard {shard_index}/{shard_count}: the index must be in 0..{shard_count - 1}")

    manifest = _read_json(layout.root / MANIFEST)
    if not rebuild and manifest and manifest.get("fingerprint") == fingerprint \
            and manifest.get("shard") == list(shard) and _registered(layout, manifest, recipe):
        if strict:
            _check_strict(layout, manifest["counts"], "this build is up to date and registered without --strict")
        return _result_from_manifest(layout, manifest, up_to_date=True)

    _claim_output(layout, recipe, fingerprint)
    if rebuild and layout.state.exists():
        shutil.rmtree(layout.state)  # every task again: inputs changed that the fingerprint cannot see
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
    num_tasks = 0

    def tasks() -> Iterator[tuple[int, list | RowRange]]:
        nonlocal num_tasks
        if source.random_access and total is not None:
            # Workers read their own rows: the main process reads nothing, skipped tasks cost nothing.
            chunks: Iterator = (RowRange(a, min(a + size, total)) for a in range(0, total, size))
        else:
            chunks = _chunks(_limited(source.rows(), recipe.max_samples), size)
        for task, chunk in enumerate(chunks):
            num_tasks = task + 1
            if wanted(task):
                yield task, chunk
            else:
                progress.update(len(chunk))

    runner = _engine(engine)
    for stats in runner(ctx, tasks(), num_proc):
        progress.update(stats.read)
    progress.close()
    if shard_count > 1:
        return _write_shard_manifest(layout, recipe, fingerprint, shard, num_tasks)
    return finalize(layout, recipe, fingerprint, num_tasks, strict=strict)


def _engine(name: str):
    if name == "local":
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


def _claim_output(layout: Layout, recipe: Recipe, fingerprint: str) -> None:
    """Make ``layout.root`` this build's: keep finished tasks of the same fingerprint, clear a stale build's files."""
    state_file = layout.state / "state.json"
    state = _read_json(state_file)
    if state and state.get("name") != recipe.dataset_name and not recipe.output.overwrite:
        raise BuildError(
            f"{layout.root} holds the build {state.get('name')!r}; choose another output.dir, or pass --overwrite "
            "to replace it"
        )
    if state and state.get("fingerprint") != fingerprint:
        # Unregister the stale build first: its dataset_info entries must never point at files being rebuilt.
        old_manifest = _read_json(layout.root / MANIFEST) or {}
        if old_manifest.get("datasets") and old_manifest.get("dataset_info"):
            unregister_datasets((layout.root / old_manifest["dataset_info"]).resolve(),
                                {name: d.get("file_name") for name, d in old_manifest["datasets"].items()})
        old = Layout(layout.root, state["name"], state.get("file_format", layout.file_format),
                     state.get("split_enabled", layout.split_enabled), layout.dataset_info)
        for path in old.owned_paths():
            if not path.resolve().is_relative_to(layout.root):  # a tampered state.json never deletes outside
                continue
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif not state:
        (layout.root / MANIFEST).unlink(missing_ok=True)
        # Task markers without a state.json are a stale build's, caught mid-deletion by a kill (rmtree removes
        # files in directory order, state.json possibly first): resuming from them would mix two recipes' output.
        if layout.state.exists():
            shutil.rmtree(layout.state)
    layout.state.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed run: staged splits/manifest at the top, staged parts in the state folder. Image ``.tmp``
    # files are not searched for (that would walk millions of images): the unfinished task rewrites the same names.
    # A dataset_info.json's temporary file may belong to another build merging right now: those are removed under
    # that file's lock (``merge_dataset_info``), never here.
    for tmp in itertools.chain(layout.root.glob("*.tmp"), layout.state.rglob("*.tmp")):
        if not tmp.name.startswith(".dataset_info"):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    write_text_atomic(state_file, json.dumps({
        "name": recipe.dataset_name, "fingerprint": fingerprint, "file_format": layout.file_format,
        "split_enabled": layout.split_enabled}))


def _write_shard_manifest(layout: Layout, recipe: Recipe, fingerprint: str, shard: tuple[int, int],
                          num_tasks: int) -> BuildResult:
    stats = _collect_stats(layout, [t for t in range(num_tasks) if t % shard[1] == shard[0]])
    manifest = _manifest(layout, recipe, fingerprint, num_tasks, stats, datasets={})
    manifest["shard"] = list(shard)
    write_text_atomic(layout.root / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return _result_from_manifest(layout, manifest)


def finalize(layout: Layout, recipe: Recipe, fingerprint: str, num_tasks: int, strict: bool = False) -> BuildResult:
    """Check every task finished, assemble rejects (and JSON arrays), register datasets, write the manifest."""
    missing = [t for t in range(num_tasks) if not layout.marker(t).exists()]
    if missing:
        raise BuildError(f"{layout.root}: tasks {missing[:10]} are not finished; build the missing shards first")
    stats = _collect_stats(layout, range(num_tasks))
    _concat_parts([layout.rejects_part(t) for t in range(num_tasks)], layout.root / "rejects.jsonl")
    splitter = Splitter(recipe.split, sum(s.written for s in stats), recipe.split_seed)
    written, keys = _route_records(layout, [layout.part(t) for t in range(num_tasks)], splitter,
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
        _check_strict(layout, counts, f"nothing was registered in {layout.dataset_info}")
    if entries:
        merge_dataset_info(layout.dataset_info, entries, overwrite=recipe.output.overwrite)
    write_text_atomic(layout.root / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return _result_from_manifest(layout, manifest)


def _uniform_keys(stats: list[TaskStats]) -> frozenset[str] | None:
    """The optional keys of every written record when all tasks saw the same ones, else None (look at the lines)."""
    written = [s.key_sets for s in stats if s.written]
    if any(k is None for k in written):
        return None
    key_sets = set().union(*written)
    return next(iter(key_sets)) if len(key_sets) == 1 else None


def _reasons(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts["rejected_by_reason"].items())


def _check_strict(layout: Layout, counts: dict, what: str) -> None:
    if counts["rejected"]:
        raise BuildError(f"--strict: {counts['rejected']} record(s) rejected ({_reasons(counts)}); {what}; see "
                         f"{layout.root / 'rejects.jsonl'}")


def _collect_stats(layout: Layout, tasks: Iterable[int]) -> list[TaskStats]:
    return [TaskStats.from_json(json.loads(layout.marker(t).read_text())) for t in tasks if layout.marker(t).exists()]


def _manifest(layout: Layout, recipe: Recipe, fingerprint: str, num_tasks: int, stats: list[TaskStats],
              datasets: dict) -> dict:
    rejected, by_source = Counter(), Counter()
    for s in stats:
        rejected.update(s.rejected)
        by_source.update(s.by_source)
    counts = {
        "read": sum(s.read for s in stats), "written": sum(s.written for s in stats),
        "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
        "by_split": {d["split"]: d["count"] for d in datasets.values()},
    }
    if by_source:
        counts["by_source"] = dict(sorted(by_source.items()))
    assert counts["read"] == counts["written"] + counts["rejected"], counts
    budget = _token_budget(recipe)
    for s in stats:
        if s.tokens:
            budget.merge(_token_budget(recipe, s.tokens))
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


def _registered(layout: Layout, manifest: dict, recipe: Recipe) -> bool:
    """The manifest's datasets are (still) in the dataset_info.json this recipe points at."""
    if manifest.get("shard") != [0, 1]:
        return True
    if os.path.relpath(layout.dataset_info, layout.root).replace(os.sep, "/") != manifest.get("dataset_info"):
        return False
    info = _read_json(layout.dataset_info) or {}
    return all(name in info for name in manifest.get("datasets", {}))


def _result_from_manifest(layout: Layout, manifest: dict, up_to_date: bool = False) -> BuildResult:
    datasets = {name: layout.dataset_info.parent / d["file_name"] for name, d in manifest["datasets"].items()}
    return BuildResult(layout.root, layout.dataset_info if datasets else None, datasets, manifest["counts"],
                       up_to_date=up_to_date, manifest=layout.root / MANIFEST, shard=tuple(manifest["shard"]),
                       tokens=manifest.get("tokens"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _concat_parts(parts: list[Path], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            if part.exists():
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
    os.replace(tmp, dest)


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


def _route_records(layout: Layout, parts: list[Path], splitter: Splitter, shard_size: int, record_format: str,
                   uniform: frozenset[str] | None = None):
    """Stream staged records in input order into their splits; returns per-split counts and optional keys.

    ``uniform``: the optional keys of every record, when the tasks found them all alike (the common case); otherwise
    a first pass finds the keys each split has (see :class:`_SplitWriter`). The last pass writes."""
    splits = ["train"] + [s for s, chosen in (("val", splitter.val), ("test", splitter.test)) if chosen]
    if uniform is not None:
        keys = dict.fromkeys(splits, uniform)
    else:
        seen: dict[str, set[frozenset[str]]] = {split: set() for split in splits}
        for index, line in enumerate(_staged_lines(parts)):
            seen[splitter(index)].add(optional_keys(line, record_format))
        keys = {split: frozenset().union(*kinds) for split, kinds in seen.items()}
    writers = {split: _SplitWriter(layout.data_path(split), layout.file_format, shard_size, record_format,
                                   keys[split]) for split in splits}
    for index, line in enumerate(_staged_lines(parts)):
        writers[splitter(index)].write(line)
    for writer in writers.values():
        writer.close()
    counts = Counter({split: w.count for split, w in writers.items() if w.count})
    return counts, keys


def merge_shards(output_dir: str | os.PathLike, parts: list[str | os.PathLike], strict: bool = False) -> BuildResult:
    """Union shard build folders into ``output_dir`` (hard links where possible) and finalise.

    With no ``parts``, ``output_dir`` itself already holds every shard (shards built into one shared folder).
    """
    root = Path(output_dir).resolve()
    manifests = [_read_json(Path(p) / MANIFEST) for p in parts] or [_read_json(root / MANIFEST)]
    if any(m is None for m in manifests):
        raise BuildError("every shard folder needs its mmdata_build.json: build it with --shard I/N first")
    fingerprints = {m["fingerprint"] for m in manifests}
    if len(fingerprints) != 1:
        raise BuildError("the shard folders come from different recipes or sources (fingerprints differ)")
    for part in parts:
        part = Path(part).resolve()
        if part == root:
            continue
        for src in part.rglob("*"):
            if src.is_file() and src.name not in (MANIFEST, "state.json"):
                dest = root / src.relative_to(part)
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_file(src, dest)
    base = manifests[0]
    from .recipes import validate_recipe

    recipe = validate_recipe(base["recipe"], origin=str(parts[0] if parts else root), base_dir=base["recipe"].get("base_dir"))
    recipe.output.dir = str(root)
    layout = Layout.for_recipe(recipe)
    layout.state.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.state / "state.json", json.dumps({
        "name": recipe.dataset_name, "fingerprint": base["fingerprint"], "file_format": layout.file_format,
        "split_enabled": layout.split_enabled}))
    return finalize(layout, recipe, base["fingerprint"], base["num_tasks"], strict=strict)


def _link_file(src: Path, dest: Path) -> None:
    if dest.exists():
        dest.unlink()
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
