"""One task of a build: its rows -> samples -> images -> staged record lines, rejects and stats.

Task ``k`` owns rows ``[k*size, (k+1)*size)`` and writes only its own files (``.mmdata/parts/part-0000k.jsonl``, its
images, its rejects, and the records' fingerprints when the recipe dedups or groups), then a completion marker,
last. Everything it writes depends only on its rows and the recipe,
so any engine and any number of workers give the same bytes, and a killed task is simply redone.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .atomic import write_text_atomic
from .dedup import (
    RecordPrint,
    TaskFingerprints,
    fingerprints_needed,
    image_key_of_digest,
    image_key_of_file,
    perceptual_hash,
    task_fingerprints_path,
    text_key,
    value_key,
)
from .errors import BuildError, SampleError
from .grounding import BOXES_SLOT, boxes_text, fill_boxes
from .images import convert_image, inspect_image
from .layout import Layout
from .normalize import Draft, normalize_row
from .profiles import load_profile
from .recipes import Recipe
from .samples import Sample
from .sources import Source
from .tokens import IMAGE_MAX_PIXELS, LF_CUTOFF_LEN, TokenBudget, TokenCounter, lf_image_problem
from .writers.llamafactory import json_line, optional_keys, record_json


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


def token_budget(recipe: Recipe, data: dict | None = None) -> TokenBudget:
    """Token lengths of written records (estimated, at the image budget LLaMA-Factory will use) vs its default
    cutoff_len: the build summary's ``tokens`` line and the manifest's ``tokens``, which ``mmdata llamafactory``
    turns into ``cutoff_len``."""
    profile = load_profile(recipe.model)
    counter = TokenCounter(label=f"estimated for {profile.name} (mmdata validate --model DIR counts exactly)",
                           image_max_pixels=recipe.images.max_pixels or profile.lf.image_max_pixels,
                           image_min_pixels=profile.lf.image_min_pixels, profile=profile)
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
    digest: str  # names the stored file: sha256 of the bytes written (of the resolved path for a linked file)
    original_width: int = 0  # the size before images: convert (what source coordinates refer to)
    original_height: int = 0


def run_task(ctx: TaskContext, task: int, rows: Iterable[tuple[int, dict]] | RowRange) -> TaskStats:
    """Process one task's rows (``(position, row)`` pairs, or a :class:`RowRange` of the source) and write its files;
    the completion marker is written last."""
    layout = ctx.layout
    if isinstance(rows, RowRange):
        rows = zip(itertools.count(rows.start), ctx.source.read_rows(rows.start, rows.stop))
    stats = TaskStats(task)
    budget = token_budget(ctx.recipe)
    lines: list[str] = []
    rejects: list[str] = []
    labels: list[str] = []  # split.from_source: the source split of each line
    prints = TaskFingerprints() if fingerprints_needed(ctx.recipe) else None
    phashes: dict[int, tuple] = {}  # image key -> its pHashes in this task (images repeat under several questions)
    for position, row in rows:
        stats.read += 1
        source_name = row.pop("__source__", None) if isinstance(row, dict) else None
        source_split = row.pop("__split__", None) if isinstance(row, dict) else None
        origin = {"where": row.pop("__where__", None) if isinstance(row, dict) else None, "split": source_split}
        try:
            line, sample, sizes, fingerprint = _process_row(ctx, task, position, row,
                                                            phashes if prints is not None else None)
            if ctx.recipe.split.from_source:
                labels.append(build_split(source_split))
            lines.append(line)
            stats.key_sets.add(optional_keys(line, ctx.recipe.output.format))
            turns = [(m.role, m.content) for m in sample.messages]
            tokens = budget.add(turns, sizes)
            answer_tokens = max([0, *(budget.counter.text(content) for role, content in turns if role == "assistant")])
            stats.max_answer_tokens = max(stats.max_answer_tokens, answer_tokens)
            if prints is not None:
                prints.add(position, fingerprint, tokens, answer_tokens, _record_id(row, ctx.fields), source_name)
        except SampleError as e:
            stats.rejected[e.kind] += 1
            rejects.append(_reject_line(position, row, ctx.fields, e.kind, str(e), source_name, origin))
            continue
        except (OSError, MemoryError, BuildError):
            raise  # the output or the machine failed, not the row: the build stops and resumes after the fix
        except Exception as e:  # noqa: BLE001 - one row must never end the build: any other failure is its reject
            kind = f"internal error: {type(e).__name__}"
            message = f"{kind}: {e} (a bug in mmdata or a plug-in: please report it with this row)"
            stats.rejected[kind] += 1
            rejects.append(_reject_line(position, row, ctx.fields, kind, message, source_name, origin))
            continue
        stats.written += 1
        if source_name:
            stats.by_source[source_name] += 1
    stats.tokens = budget.to_json()
    _write_lines(layout.part(task), lines)
    _write_lines(layout.rejects_part(task), rejects)
    if ctx.recipe.split.from_source:
        _write_lines(layout.split_labels(task), labels)
    if prints is not None:
        prints.save(task_fingerprints_path(layout, task), near=_near(ctx.recipe),
                    grouped=ctx.recipe.split.group_by not in (None, "image", "near"))
    marker = layout.marker(task)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(stats.to_json()))
    return stats


def _process_row(ctx: TaskContext, task: int, position: int, row: dict, phashes: dict[int, tuple] | None = None
                 ) -> tuple[str, Sample, list[tuple[int, int]], RecordPrint | None]:
    """The line written for one row, its sample, the sizes of its images and, given a pHash cache (the recipe dedups
    or groups), its fingerprints, computed before any image is stored (an image that cannot be hashed rejects the
    row)."""
    recipe, layout = ctx.recipe, ctx.layout
    rendered = {**row, "boxes": BOXES_SLOT} if recipe.boxes else row  # filled in once the image size is known
    draft = normalize_row(rendered, position, recipe, ctx.fields, ctx.image_root, ctx.allowed_roots)
    prepared = [_prepare_image(ref, recipe) for ref in draft.images]
    if recipe.boxes:
        _write_boxes(recipe, row, draft, prepared)
    _apply_filters(recipe, draft, prepared)
    image_rels = [layout.image_rel(img.digest, img.extension) for img in prepared]
    try:
        sample = Sample.model_validate(
            {"messages": draft.messages, "videos": draft.videos,
             "images": [layout.media_prefix + rel for rel in image_rels]},
            context={"allow_empty_answer": recipe.for_prediction},
        )
    except ValidationError as e:
        raise SampleError("invalid sample: " + "; ".join(_short(err) for err in e.errors()), kind="invalid sample") from None
    fingerprint = None if phashes is None else _fingerprint(ctx, row, sample, prepared, phashes)
    for img, path in zip(prepared, (layout.root / rel for rel in image_rels), strict=True):
        if img.data is None:  # a file linked, never read whole: relinked every time (it may have been edited)
            _store_image(path, task, link=img.ref_path)
        elif not path.exists():  # content-addressed: an image that exists is this one, complete (renamed into place)
            _store_image(path, task, data=img.data)
        else:  # another task stored it meanwhile: a temporary this task left when it was killed must not stay
            path.with_name(f"{path.name}.{task}.tmp").unlink(missing_ok=True)
    return (record_json(sample, recipe.output.format), sample, [(img.width, img.height) for img in prepared],
            fingerprint)


def _near(recipe: Recipe) -> bool:
    """Perceptual hashes are computed for ``dedup: near`` and ``split.group_by: near`` only (a decode per image)."""
    return (recipe.dedup is not None and recipe.dedup.mode == "near") or recipe.split.group_by == "near"


def _fingerprint(ctx: TaskContext, row: Any, sample: Sample, prepared: list[_PreparedImage],
                 phashes: dict[int, tuple]) -> RecordPrint:
    """Content hash of each image (the stored file's name where bytes were read; a linked file's bytes are read and
    hashed here, only when fingerprints are on), the text key, the pHashes for ``dedup: near``, the group key."""
    keys, hashes = [], []
    near = _near(ctx.recipe)
    for img in prepared:
        source = img.data if img.data is not None else img.ref_path
        try:
            key = image_key_of_digest(img.digest) if img.data is not None else image_key_of_file(img.ref_path)
            keys.append(key)
            if near:
                if key not in phashes:
                    phashes[key] = perceptual_hash(source)
                hashes.append(phashes[key])
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - only the row's image is read here (PIL raises many types, OSError too)
            raise SampleError(f"image unreadable: cannot read or decode it for its fingerprint ({type(e).__name__}: "
                              f"{e}) [{img.ref_path or 'embedded bytes'}]", kind="image unreadable") from None
    group = ctx.recipe.split.group_by
    return RecordPrint(text_key((m.role, m.content) for m in sample.messages), keys, hashes if near else None,
                       value_key(row.get(group) if isinstance(row, dict) else None)
                       if group not in (None, "image", "near") else None)


def _write_boxes(recipe: Recipe, row: dict, draft: Draft, prepared: list[_PreparedImage]) -> None:
    """``boxes:``: the row's boxes, in the recipe model's form for its first image, into ``{boxes}``."""
    spec = recipe.boxes
    if not prepared:
        raise SampleError("boxes: the record has no image to place its boxes on", kind="bad boxes")
    if spec.column not in row:
        raise SampleError(f"boxes.column is {spec.column!r} but the row has no such column", kind="bad boxes")
    profile = load_profile(recipe.model)
    image = prepared[0]
    text = boxes_text(row[spec.column], row.get(spec.label) if spec.label else None, spec,
                      (image.original_width, image.original_height), (image.width, image.height), profile,
                      recipe.images.max_pixels or profile.lf.image_max_pixels)
    fill_boxes(draft.messages, text)


def _short(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


@functools.lru_cache(maxsize=1024)
def _archives_in(folder: Path) -> tuple[str, ...]:
    """Archives in ``folder`` and the one above it: hub datasets ship their images zipped (SLAKE's imgs.zip)."""
    found = []
    for where in (folder, folder.parent):
        try:
            found += [p.name for p in where.iterdir() if p.name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz"))]
        except OSError:
            continue
    return tuple(sorted(set(found))[:3])


def _archive_hint(path: Path | None) -> str:
    """For a missing image whose folder is missing too (images not extracted): the archives near the nearest folder
    that exists. A missing file in an existing folder gets no hint (and costs no listing of a large folder)."""
    if path is None or Path(path).parent.is_dir():
        return ""
    existing = next((p for p in Path(path).parents if p.is_dir()), None)
    archives = _archives_in(existing) if existing is not None else ()
    return f" ({', '.join(archives)} lies near it: extract the images first)" if archives else ""


def _prepare_image(ref, recipe: Recipe) -> _PreparedImage:
    opts = recipe.images
    try:
        # A file that will be linked is only opened for verification (PIL reads what the check needs).
        data = ref.path if opts.mode == "link" and ref.data is None else ref.read()
        if isinstance(data, Path) and not data.is_file():
            raise IsADirectoryError if data.is_dir() else FileNotFoundError
    except FileNotFoundError:
        raise SampleError(f"image file not found: {ref.path}{_archive_hint(ref.path)}",
                          kind="image file not found") from None
    except IsADirectoryError:
        raise SampleError(f"image path is a folder: {ref.path}", kind="image file not found") from None
    except OSError as e:
        raise SampleError(f"cannot read image {ref.path}: {e.strerror}", kind="image unreadable") from None
    try:
        if opts.mode == "convert":
            original = inspect_image(data, "header")
            data, info = convert_image(data, opts.max_pixels, opts.format, opts.quality)
        else:
            original = info = inspect_image(data, opts.verify)
    except SampleError as e:
        raise SampleError(f"{e} [{ref.path or 'embedded bytes'}]", kind="image unreadable") from None
    problem = lf_image_problem(info.width, info.height, opts.max_pixels or IMAGE_MAX_PIXELS)
    if problem:  # LLaMA-Factory would fail on this record at training time (a side shrunk to 0 pixels)
        raise SampleError(f"{problem} [{ref.path or 'embedded bytes'}]", kind="image too thin for image_max_pixels")
    if isinstance(data, bytes):
        digest = hashlib.sha256(data).hexdigest()[:32]
    else:  # a file to link is named after its resolved path: the same file is one link, and its bytes stay unread
        digest = hashlib.sha256(b"link\0" + os.fsencode(os.path.realpath(data))).hexdigest()[:32]
    return _PreparedImage(ref.path, data if isinstance(data, bytes) else None, info.extension, info.width, info.height,
                          digest, original.width, original.height)


def _store_image(path: Path, task: int, data: bytes | None = None, link: Path | None = None) -> None:
    """Write ``data`` (or hard-link ``link``, copied across filesystems) through a temporary name of this task's, then
    rename it into place: a reader never sees half an image, two tasks may store the same image at once, and a task
    redone after a kill replaces its own leftover. A file in the way is replaced whole, never written through, in
    case it is a hard link to someone else's file."""
    tmp = path.with_name(f"{path.name}.{task}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    if link is None:
        tmp.write_bytes(data)
    else:
        try:
            os.link(link, tmp)
        except OSError:  # another filesystem, or hard links not allowed there
            shutil.copyfile(link, tmp)
    os.replace(tmp, path)
    # renaming a name onto another hard link of the same file does nothing (POSIX rename), and leaves ``tmp``
    tmp.unlink(missing_ok=True)


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


#: A source's own split names -> the build's splits (``split.from_source``).
SOURCE_SPLITS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
                 "dev": "val", "eval": "val", "test": "test", "testing": "test"}


def build_split(source_split: str | None) -> str:
    """The build split a row of the source's split ``source_split`` goes to, under ``split.from_source``."""
    if source_split is None:
        raise BuildError("split.from_source: the source gives no split of its own for its rows; list the splits to "
                         "read in source.split (e.g. [train, validation, test]) or use split.val / split.test")
    split = SOURCE_SPLITS.get(str(source_split).lower())
    if split is None:
        raise BuildError(f"split.from_source: the source split {source_split!r} is none of "
                         f"{', '.join(SOURCE_SPLITS)}; leave it out of source.split or rename it")
    return split


def _record_id(row: Any, fields: dict) -> str | int | float | None:
    """The id a reject line names a row by: the ``id`` field's value when it is a string or a number."""
    record_id = None
    if isinstance(row, dict):
        record_id = row.get(fields.get("id") or "id")
        if not isinstance(record_id, (str, int, float)) or isinstance(record_id, bool):
            record_id = None
    return record_id


def _reject_line(position: int, row: Any, fields: dict, kind: str, message: str, source: str | None,
                 origin: dict | None = None) -> str:
    """A reject: ``position`` counts rows across the whole source; ``origin`` adds where the row is in the input
    when the source knows (``where``: ``b.jsonl line 2`` for a folder of files; ``split``: a hub split)."""
    entry = {"position": position, "id": _record_id(row, fields), "reason": kind, "message": message}
    if source:
        entry["source"] = source
    entry.update({k: v for k, v in (origin or {}).items() if v is not None})
    return json_line(entry)


def _write_lines(path: Path, lines: list[str]) -> None:
    """A task's staged lines, replaced whole; no lines, no file (a redone task may have had some before)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not lines:
        path.unlink(missing_ok=True)
        return
    write_text_atomic(path, "\n".join(lines) + "\n")
