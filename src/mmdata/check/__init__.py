"""``mmdata validate``: lint an existing LLaMA-Factory dataset before training, hand-made ones included.

Everything LLaMA-Factory would reject, crash on or silently drop, found before a GPU is rented: unknown or misspelled
``dataset_info.json`` keys, wrong ``formatting``/``columns``/``tags``, missing data files, folders LLaMA-Factory cannot
load, records whose roles or ``<image>`` placeholders break the conversation rules, missing or unreadable images,
columns whose JSON type changes between rows (pyarrow refuses those), undefined dataset names, and (with
``--cutoff-len``) records longer than the cutoff.

Design: records stream through :mod:`mmdata.lfdata` (LLaMA-Factory's reading rules, one implementation) and the
conversation rules are :func:`mmdata.samples.conversation_problems` (the same rules a build applies). Memory stays
constant: per entry we keep the first type of each column, a bounded image-size cache, a token histogram and at most
``max_per_kind`` problems of each kind (the rest are counted). Images are opened for their header and verified, not
decoded, unless ``decode_images`` asks for it.

The package: ``problems`` (what is reported), ``entries`` (``dataset_info.json`` entries), ``records`` (the data
of one entry), and here the command that walks a ``dataset_info.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import IO

from .. import lfdata
from ..cliargs import positive_int
from ..errors import DatasetInfoError
from ..layout import MANIFEST, manifest_dataset_info, read_manifest
from ..samples import utf8_text
from ..tokens import IMAGE_MAX_PIXELS, TokenBudget, token_counter
from .entries import _UNREADABLE, did_you_mean, lint_entry
from .problems import EntrySummary, Problem, ValidationReport
from .records import _check_file_shapes, _EntryChecker, _FileShape, _open_image

__all__ = ["EntrySummary", "Problem", "ValidationReport", "_open_image", "add_validate_command", "lint_entry",
           "validate"]


# ------------------------------------------------------------------------------------------------- the command


def validate(dataset_info: str | os.PathLike, datasets: list[str] | None = None, *, media_dir: str | None = None,
             max_records: int | None = None, cutoff_len: int | None = None, tokenizer: object = None,
             image_max_pixels: int | None = None, image_min_pixels: int | None = None, check_images: bool = True,
             decode_images: bool = False, max_per_kind: int = 20, model: str | os.PathLike | None = None,
             record_tokens: str | os.PathLike | None = None) -> ValidationReport:
    """Lint ``dataset_info`` (the file or its folder, LLaMA-Factory's ``dataset_dir``) and the data of its entries.

    ``datasets`` (LLaMA-Factory's ``dataset:`` names) restricts the record checks to those entries; every entry's
    schema is still linted, and errors of unselected entries are reported as warnings (LLaMA-Factory never reads
    them). Hub, script and cloud entries are linted but not loaded (no network). ``max_records`` checks only the
    first N records of each entry. Token lengths are measured when ``cutoff_len``, ``tokenizer``, ``model`` or
    ``record_tokens`` is given: ``model`` (a profile name such as ``qwen3_vl``, or a local model folder, whose
    tokenizer then counts exactly) picks the chat template and image rule; ``record_tokens`` writes every record's
    total as a JSON line ``{dataset, index, tokens}``. A build folder whose ``dataset_info.json`` lives elsewhere
    (``output.dataset_info``) is found through its manifest, and only that build's datasets are checked.
    """
    info_path = Path(dataset_info)
    if info_path.is_dir() and (info_path / MANIFEST).is_file() and datasets is None:
        manifest = read_manifest(info_path, DatasetInfoError)
        info_path, datasets = manifest_dataset_info(info_path, manifest), list(manifest["datasets"]) or None
    elif info_path.is_dir():
        info_path = info_path / lfdata.DATA_CONFIG
    info = lfdata.read_dataset_info(info_path)
    dataset_dir = info_path.parent
    media = Path(media_dir) if media_dir else dataset_dir
    report = ValidationReport(str(info_path), max_per_kind=max_per_kind)
    selected = _selected_names(info, datasets, report)
    counter = None
    if cutoff_len is not None or tokenizer is not None or model is not None or record_tokens is not None:
        counter = token_counter(tokenizer, image_max_pixels, image_min_pixels, model)
        image_max_pixels = counter.image_max_pixels
    try:
        sink_file = open(record_tokens, "w", encoding="utf-8") if record_tokens else contextlib.nullcontext()
    except OSError as e:
        raise DatasetInfoError(f"--record-tokens {record_tokens}: cannot write it ({e.strerror})") from None
    with sink_file as sink:
        _validate_entries(info, selected, dataset_dir, media, report, counter, cutoff_len, check_images,
                          decode_images, image_max_pixels, max_records, sink)
    return report


def _validate_entries(info: dict, selected: set[str], dataset_dir: Path, media: Path, report: ValidationReport,
                      counter, cutoff_len: int | None, check_images: bool, decode_images: bool,
                      image_max_pixels: int | None, max_records: int | None, sink: IO[str] | None) -> None:
    for name, entry in info.items():
        chosen = name in selected
        schema = lint_entry(name, entry)
        for p in schema:
            report.add(p if chosen or p.severity != "error" else
                       Problem(p.entry, p.record, "warning", p.message + " (entry not selected)", p.fix, p.code))
        if not chosen or any(p.severity == "error" and p.code in _UNREADABLE for p in schema):
            continue
        attr = lfdata.parse_entry(name, entry)
        summary = report.entries.setdefault(name, EntrySummary())
        if attr.load_from != "file":
            summary.skipped = f"{attr.load_from}: {attr.dataset_name}"
            report.add(Problem(name, None, "info", f"loaded from {attr.load_from} ({attr.dataset_name}): not "
                               "checked offline", "", "skipped"))
            continue
        files = _check_files(name, attr, dataset_dir, report)
        if files is None:
            continue
        budget = TokenBudget(cutoff_len, counter) if counter is not None else None
        checker = _EntryChecker(name, attr, media, report, budget, check_images, decode_images,
                                image_max_pixels or IMAGE_MAX_PIXELS)
        checker.token_sink = sink
        summary.budget = budget
        before = report.count("error")
        summary.records = _check_records(checker, files, dataset_dir, max_records)
        checker.finish(summary.records)
        if not summary.records and report.count("error") == before:
            report.add(Problem(name, None, "error", f"{attr.dataset_name!r} holds no record: LLaMA-Factory cannot "
                               "load an empty dataset (DatasetGenerationError, or 'corresponds to no data')",
                               "put the records in the file, or remove the entry", "empty"))
        if budget is not None and budget.count and cutoff_len is not None:
            report.add(Problem(name, None, "info", budget.format(), "" if not budget.over else
                               f"cutoff_len {budget.suggested_cutoff()} keeps 99% of the records whole", "tokens"))


def _selected_names(info: dict, datasets: list[str] | None, report: ValidationReport) -> set[str]:
    if not datasets:
        return set(info)
    names = [n.strip() for d in datasets for n in d.split(",") if n.strip()]
    for name in names:
        if name not in info:
            hint = did_you_mean(name, info)
            report.add(Problem(name, None, "error", f"Undefined dataset {name} in dataset_info.json",
                               f"{hint} the dataset names are the top-level keys of dataset_info.json; add an entry "
                               f'"{name}": {{"file_name": ...}} or fix the name'.strip(), "undefined-dataset"))
    return {n for n in names if n in info}


def _check_files(name: str, attr: lfdata.DatasetAttr, dataset_dir: Path, report: ValidationReport) -> list[Path] | None:
    """The data files of a file entry, or None after reporting why LLaMA-Factory could not load them."""
    path = dataset_dir / attr.dataset_name
    if not path.exists() and path.is_symlink():
        report.add(Problem(name, None, "error", f"data file {attr.dataset_name!r} is a symbolic link to nothing "
                           f"(a broken or looping link: {os.readlink(path)!r})", "point the link at the data file, or "
                           "replace it with the file", "missing-file"))
        return None
    if not path.exists():
        try:
            siblings = [p.name for p in dataset_dir.iterdir()]
        except OSError:
            siblings = []
        hint = did_you_mean(attr.dataset_name, siblings)
        report.add(Problem(name, None, "error", f"data file {attr.dataset_name!r} not found in {dataset_dir} "
                           f"(LLaMA-Factory: 'File {path} not found.')",
                           f"{hint} file_name is relative to the folder of dataset_info.json".strip(),
                           "missing-file"))
        return None
    files = lfdata.data_files(dataset_dir, attr)
    if not files:
        report.add(Problem(name, None, "error", f"folder {attr.dataset_name!r} is empty", "put the data files in it",
                           "missing-file"))
        return None
    kinds = {f.name: (None if f.is_dir() else lfdata.file_type(f)) for f in files}
    first = Counter(k for k in kinds.values() if k is not None).most_common(1)[0][0] if any(kinds.values()) else None
    odd = [n for n, k in kinds.items() if k is None or k != first]
    if odd or first is None:
        report.add(Problem(name, None, "error", f"{attr.dataset_name!r}: LLaMA-Factory loads every entry of the "
                           f"folder and needs one supported type ({', '.join(lfdata.FILEEXT2TYPE)}); offending: "
                           f"{', '.join(odd) or files[0].name}",
                           "remove the other files (hidden ones such as .DS_Store or leftover .tmp too) or move "
                           "them out of the folder", "file-types"))
        return None
    return files


def _check_records(checker: _EntryChecker, files: list[Path], dataset_dir: Path, max_records: int | None) -> int:
    index = 0
    shapes: list[_FileShape] = []
    for path in files:
        shown = str(path.relative_to(dataset_dir)) if len(files) > 1 else None
        shape = _FileShape(path, shown or path.name)
        shapes.append(shape)
        try:
            for record in lfdata.iter_file_records(path):
                if max_records is not None and index >= max_records:
                    return index
                checker.check(index, record, shown)
                shape.add(record)
                index += 1
        except DatasetInfoError as e:
            checker.problem(index, "error", str(e), "fix or regenerate the file; LLaMA-Factory fails on it too",
                            "bad-file", shown)
        except (OSError, UnicodeDecodeError) as e:
            checker.problem(index, "error", f"{path}: cannot read ({e})", "check the file's encoding (UTF-8) and "
                            "permissions", "bad-file", shown)
    _check_file_shapes(checker, shapes)
    return index


# datasets' JSON loader (LLaMA-Factory's) parses JSON Lines in chunks of this many bytes; the schema comes from the
# first chunk it reads, of whichever file ``os.listdir`` lists first, and every later chunk is cast to it.

def add_validate_command(subparsers) -> None:
    """Register ``mmdata validate`` (the CLI calls this; the logic is :func:`validate`)."""
    p = subparsers.add_parser("validate", help="lint an existing LLaMA-Factory dataset before training",
                              description="Check a dataset_info.json and the data of its entries the way "
                                          "LLaMA-Factory reads them. Exit status 1 when there are errors.")
    p.add_argument("dataset_info", help="dataset_info.json or the folder holding it (LLaMA-Factory's dataset_dir)")
    p.add_argument("--dataset", action="extend", nargs="+", metavar="NAME",
                   help="only these entries' data (names as in LLaMA-Factory's dataset:, comma lists allowed)")
    p.add_argument("--media-dir", help="LLaMA-Factory's media_dir (default: the dataset_info.json folder)")
    p.add_argument("--max-records", type=positive_int, metavar="N", help="check only the first N records of each entry")
    p.add_argument("--cutoff-len", type=positive_int, metavar="N", help="report records longer than N tokens (cutoff_len)")
    p.add_argument("--tokenizer", metavar="PATH", help="a local tokenizer folder for exact text token counts")
    p.add_argument("--model", metavar="NAME|DIR", help="count tokens for this model: a profile (qwen2_vl, qwen2_5_vl, "
                   "qwen3_vl, qwen3_vl_nothink, gemma3, internvl) or a local model folder (its tokenizer counts exactly)")
    p.add_argument("--record-tokens", metavar="FILE", help="write every record's token total as JSON lines")
    p.add_argument("--image-max-pixels", type=positive_int, metavar="P", help="LLaMA-Factory's image_max_pixels (768*768)")
    p.add_argument("--image-min-pixels", type=positive_int, metavar="P", help="LLaMA-Factory's image_min_pixels (32*32)")
    p.add_argument("--no-images", action="store_true", help="do not open image files")
    p.add_argument("--decode-images", action="store_true", help="fully decode every image (slow, catches truncation)")
    p.add_argument("--max-problems", type=positive_int, default=20, metavar="N", help="problems shown per kind and entry")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    report = validate(args.dataset_info, args.dataset, media_dir=args.media_dir, max_records=args.max_records,
                      cutoff_len=args.cutoff_len, tokenizer=args.tokenizer, image_max_pixels=args.image_max_pixels,
                      image_min_pixels=args.image_min_pixels, check_images=not args.no_images,
                      decode_images=args.decode_images, max_per_kind=args.max_problems, model=args.model,
                      record_tokens=args.record_tokens)
    # utf8_text: a problem may quote record data, and stdout cannot print a lone surrogate
    print(utf8_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format_text()))
    return 0 if report.ok else 1
