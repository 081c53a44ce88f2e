"""Train/eval leakage: ``mmdata check-leakage BUILD [--against OTHER ...]``, and the readers that fingerprint any
LLaMA-Factory dataset (also used by ``dedup.against``).

A val/test record *leaks* when it shares with some train record:

- ``exact_image``: an image with the same bytes (``sha256``);
- ``near_image``: an image within the pHash threshold (exact copies included), when near hashes are at hand: a
  ``dedup: near`` build stored them in ``fingerprints.npz``; ``--near`` computes them (decoding every image once);
- ``text``: the same normalised conversation (:func:`mmdata.dedup.normalize_text`).

Fingerprints come from the build's ``fingerprints.npz`` when it has one (written by builds with ``dedup`` or
``split.group_by``); otherwise the records are read through :mod:`mmdata.lfdata` and their images hashed. For an
mmdata build that copied or converted its images the file names already are the first 128 bits of the content
hash (``images/ab/<sha256[:32]>.jpg``), so nothing is read; linked images and other datasets are hashed.

``--against`` compares the build's records (every split) with other builds or ``dataset_info.json`` files
(``PATH#name1,name2`` picks entries). Exit status: 0 whether or not leaks are found (it is a report), unless
``--fail-on-leak``, which exits 7 when there is any leak: the switch for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import lfdata
from .cliargs import positive_int
from .dedup import (
    Fingerprints,
    image_key_of_file,
    leak_matches,
    perceptual_hash,
    text_key,
)
from .errors import MmdataError
from .layout import MANIFEST, SPLITS, manifest_dataset_info, read_manifest
from .recipes import NEAR_THRESHOLD

FINGERPRINTS = "fingerprints.npz"
EXAMPLES = 5
KINDS = ("exact_image", "near_image", "text")
_CONTENT_NAME = re.compile(r"(?:^|/)images/[0-9a-f]{2}/([0-9a-f]{32})\.[A-Za-z0-9]+$")


class LeakageError(MmdataError):
    """A path is neither a build nor a dataset_info.json, or names no dataset with local files: nothing was
    compared (an exit status of its own, so a CI job never reads a wrong path as "leaks found")."""

    exit_code = 8


class LeaksFound(LeakageError):
    """``check-leakage --fail-on-leak`` found leaks."""

    exit_code = 7


@dataclass
class Records:
    """Records of one or more LLaMA-Factory datasets and their fingerprints (``fp.position``: the input row for a
    build's records, else the record's index in its dataset)."""

    origin: str
    fp: Fingerprints
    names: list[str]  # dataset names, indexed by ``dataset``
    dataset: np.ndarray  # int32 per record
    index: np.ndarray  # int64 per record: its index in its dataset
    split: np.ndarray | None = None  # uint8 per record for a build: 0 train, 1 val, 2 test
    media_dir: Path | None = None
    attrs: dict[str, lfdata.DatasetAttr] = field(default_factory=dict)
    unreadable: int = 0  # images that could not be read (missing files): left out of the image keys
    skipped: list[str] = field(default_factory=list)  # dataset_info entries without local files

    def take(self, index: np.ndarray) -> Records:
        return Records(self.origin, self.fp.take(index), self.names, self.dataset[index], self.index[index],
                       None if self.split is None else self.split[index], self.media_dir, self.attrs, self.unreadable,
                       self.skipped)

    def where(self, i: int) -> dict:
        """How a person finds record ``i``: dataset, index (and the input position for a build)."""
        out = {"dataset": self.names[int(self.dataset[i])], "index": int(self.index[i])}
        if self.split is not None:
            out = {"split": SPLITS[int(self.split[i])], **out}
            if self.fp.position[i] >= 0:
                out["position"] = int(self.fp.position[i])
        return out


# ----------------------------------------------------------------------------------------------- reading


def read_build(build_dir: str | os.PathLike, near: bool = False) -> Records:
    """A finished build's records with split codes: from ``fingerprints.npz`` when it has one (and pHashes, if
    ``near``), else read and hashed."""
    root = Path(build_dir).expanduser().resolve()
    manifest = read_manifest(root, LeakageError)
    info_path = manifest_dataset_info(root, manifest)
    split_of = {name: d.get("split", "train") for name, d in manifest["datasets"].items()}
    names = list(manifest["datasets"])
    attrs = {}
    if names:
        info = lfdata.read_dataset_info(info_path)
        attrs = {name: lfdata.parse_entry(name, info[name]) for name in names if name in info}
    stored = root / FINGERPRINTS
    if stored.is_file():
        with np.load(stored, allow_pickle=False) as z:
            if not near or "phash" in z:
                fp = Fingerprints(z["position"], z["text"], z["offsets"], z["image"],
                                  z["phash"] if "phash" in z else None)
                split = z["split"].astype(np.uint8)
                dataset_of_split = np.full(len(SPLITS), -1, dtype=np.int32)
                for name, split_name in split_of.items():
                    dataset_of_split[SPLITS.index(split_name)] = names.index(name)
                return Records(str(root), fp, names, dataset_of_split[split], z["index"].astype(np.int64), split,
                               info_path.parent, attrs)
    mode = ((manifest.get("recipe") or {}).get("images") or {}).get("mode", "copy")
    records = read_datasets(info_path, names, near=near, named_by_content=mode in ("copy", "convert"), origin=str(root))
    records.split = np.array([SPLITS.index(split_of[records.names[int(k)]]) for k in records.dataset], dtype=np.uint8)
    records.fp.position = np.full(len(records.fp), -1, dtype=np.int64)  # input rows are not in the records
    return records


def read_datasets(info_path: str | os.PathLike, names: list[str] | None = None, near: bool = False,
                  named_by_content: bool = False, origin: str | None = None) -> Records:
    """Fingerprint local LLaMA-Factory datasets (``names``: entries of ``info_path``; None: every entry with local
    files). Each distinct image file is read once (its pHash decoded once with ``near``); a missing or unreadable
    image is counted in ``unreadable`` and left out."""
    info_path = Path(info_path)
    if info_path.is_dir():
        info_path = info_path / lfdata.DATA_CONFIG
    info = lfdata.read_dataset_info(info_path)
    media_dir = info_path.parent
    wanted = names if names is not None else list(info)
    unknown = [n for n in wanted if n not in info]
    if unknown:
        raise LeakageError(f"{info_path}: no dataset {', '.join(unknown)} (it has {', '.join(info) or 'none'})")
    position, text, counts, image, phashes, dataset, index = [], [], [], [], [], [], []
    attrs, used, skipped = {}, [], []
    key_of: dict[str, int | None] = {}
    phash_of: dict[int, tuple | None] = {}
    referenced, unreadable, first_unreadable = 0, 0, None
    for name in wanted:
        attr = _local_entry(media_dir, info, name)
        if attr is None:
            if names is not None:
                raise LeakageError(f"{info_path}: dataset {name} has no local files to read")
            skipped.append(name)
            continue
        attrs[name] = attr
        code = len(used)
        used.append(name)
        n = 0
        for path in lfdata.data_files(media_dir, attr):
            for raw in lfdata.iter_file_records(path):
                try:
                    turns, images, _ = lfdata.to_turns(raw, attr) if isinstance(raw, dict) else ([], [], [])
                except (ValueError, TypeError, IndexError):
                    turns, images = [], []
                keys = []
                for rel in images:
                    if not isinstance(rel, str):
                        continue
                    referenced += 1
                    key = _image_key(media_dir, rel, named_by_content, key_of)
                    if key is None or (near and _phash(media_dir, rel, key, phash_of) is None):
                        unreadable += 1
                        first_unreadable = first_unreadable or _resolve(media_dir, rel)
                        continue
                    keys.append(key)
                    if near:
                        phashes.append(phash_of[key])
                position.append(n)
                text.append(text_key(turns))
                counts.append(len(keys))
                image += keys
                dataset.append(code)
                index.append(n)
                n += 1
    if names is None and not used:
        raise LeakageError(_nothing_local(info_path, skipped))
    if referenced and unreadable == referenced:  # compared by text alone, a moved image folder would pass
        raise LeakageError(f"{info_path}: none of its {referenced:,} image(s) could be read (first: {first_unreadable});"
                           " put its image folder back beside it")
    fp = Fingerprints(np.array(position, dtype=np.int64), np.array(text, dtype=np.uint64),
                      np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
                      np.array(image, dtype=np.uint64),
                      np.array(phashes, dtype=np.uint64).reshape(-1, 5) if near else None)
    return Records(origin or str(info_path), fp, used, np.array(dataset, dtype=np.int32),
                   np.array(index, dtype=np.int64), None, media_dir, attrs, unreadable, skipped)


def _local_entry(media_dir: Path, info: dict, name: str) -> lfdata.DatasetAttr | None:
    """The parsed entry ``name`` when its data files are here on disk, else None (hub or missing entries)."""
    attr = lfdata.parse_entry(name, info[name]) if isinstance(info[name], dict) else None
    if attr is None or attr.load_from != "file" or not all(p.exists() for p in lfdata.data_files(media_dir, attr)):
        return None
    return attr


def _resolve(media_dir: Path, rel: str) -> Path:
    return Path(rel) if os.path.isabs(rel) else media_dir / rel


def _image_key(media_dir: Path, rel: str, named_by_content: bool, cache: dict[str, int | None]) -> int | None:
    if rel in cache:
        return cache[rel]
    match = _CONTENT_NAME.search(rel.replace(os.sep, "/")) if named_by_content else None
    if match:
        key = int(match.group(1)[:16], 16)
    else:
        try:
            key = image_key_of_file(_resolve(media_dir, rel))
        except OSError:
            key = None
    cache[rel] = key
    return key


def _phash(media_dir: Path, rel: str, key: int, cache: dict[int, tuple | None]) -> tuple | None:
    if key not in cache:
        try:
            cache[key] = perceptual_hash(_resolve(media_dir, rel))
        except Exception:  # noqa: BLE001 - PIL raises many types for a file it cannot decode
            cache[key] = None
    return cache[key]


def read_reference(spec: str, near: bool = False, base_dir: str | os.PathLike | None = None) -> Records:
    """``--against`` / ``dedup.against``: a build folder, a ``dataset_info.json`` (or its folder), optionally
    ``#name1,name2`` to pick entries."""
    target, names = _reference_target(spec, base_dir)
    if (target / MANIFEST).is_file() and names is None:
        records = read_build(target, near=near)
        records.split = None
        return records
    return read_datasets(target, names, near=near, origin=spec)


def check_reference(spec: str, base_dir: str | os.PathLike | None = None) -> None:
    """Fail before a build reads its source when a ``dedup.against`` reference has nothing to read: a wrong path,
    or a ``dataset_info.json`` whose picked (or, unpicked, every) entry lacks local files. Its images are read,
    and checked, when the build finalises."""
    target, names = _reference_target(spec, base_dir)
    if (target / MANIFEST).is_file() and names is None:
        return
    info_path = target / lfdata.DATA_CONFIG if target.is_dir() else target
    info = lfdata.read_dataset_info(info_path)
    wanted = names if names is not None else list(info)
    missing = [n for n in wanted if n not in info or _local_entry(info_path.parent, info, n) is None]
    if names is not None and missing:
        raise LeakageError(f"{info_path}: dataset {', '.join(missing)} has no local files to read")
    if not wanted or len(missing) == len(wanted):
        raise LeakageError(_nothing_local(info_path, missing))


def _nothing_local(info_path: Path, entries: list[str]) -> str:
    listed = ", ".join(entries) if entries else "it has no entries"
    return f"{info_path}: no entry has local files to read ({listed}): nothing to compare against"


def _reference_target(spec: str, base_dir: str | os.PathLike | None) -> tuple[Path, list[str] | None]:
    """The path a reference spec names (relative to ``base_dir``), checked to exist, and its picked entries."""
    path, _, picked = spec.partition("#")
    names = [n.strip() for n in picked.split(",") if n.strip()] or None
    target = Path(path).expanduser()
    if not target.is_absolute() and base_dir is not None:
        target = Path(base_dir) / target
    target = target.resolve()
    if target.is_dir() and not (target / MANIFEST).is_file() and not (target / lfdata.DATA_CONFIG).is_file():
        raise LeakageError(f"{target}: neither a build folder ({MANIFEST}) nor a folder with {lfdata.DATA_CONFIG}")
    if not target.exists():
        raise LeakageError(f"{target}: not found (pass a build folder or a dataset_info.json)")
    return target, names


def build_records_for_dedup(specs: list[str], near: bool, base_dir: str | None) -> tuple[Records | None, list[str]]:
    """All ``dedup.against`` datasets as one set of records (in the order given), and their labels."""
    if not specs:
        return None, []
    parts = [read_reference(spec, near=near, base_dir=base_dir) for spec in specs]
    names = [f"{p.origin}#{n}" if len(p.names) > 1 or len(parts) > 1 else n for p in parts for n in p.names]
    offset, codes = 0, []
    for p in parts:
        codes.append(p.dataset + offset)
        offset += len(p.names)
    merged = Records(", ".join(specs), Fingerprints.concat([p.fp for p in parts]), names,
                     np.concatenate(codes).astype(np.int32), np.concatenate([p.index for p in parts]),
                     unreadable=sum(p.unreadable for p in parts))
    return merged, names


# ----------------------------------------------------------------------------------------------- checking


def check_leakage(build_dir: str | os.PathLike, against: list[str] = (), near: bool = False,
                  threshold: int | None = None, examples: int = EXAMPLES) -> dict:
    """Leaks of a build's val/test records into its train records, and of its records into ``against`` datasets.

    ``near``: also near copies (computed when the build did not store pHashes); ``threshold``: their largest
    distance (default: the build's ``dedup.threshold``, else 10). Returns a JSON-ready dict (see ``--json``)."""
    root = Path(build_dir).expanduser().resolve()
    manifest = read_manifest(root, LeakageError)
    dedup = (manifest.get("recipe") or {}).get("dedup") or {}
    stored_near = False
    if (root / FINGERPRINTS).is_file():
        with np.load(root / FINGERPRINTS, allow_pickle=False) as z:
            stored_near = "phash" in z
    use_near = near or stored_near
    if threshold is None:
        threshold = dedup.get("threshold", NEAR_THRESHOLD) if dedup.get("mode") == "near" else NEAR_THRESHOLD
    records = read_build(root, near=use_near)
    train = np.flatnonzero(records.split == 0)
    held = np.flatnonzero(records.split > 0)
    report = {"build": str(root), "near": use_near, "threshold": threshold if use_near else None,
              "records": {s: int((records.split == i).sum()) for i, s in enumerate(SPLITS)},
              "unreadable_images": records.unreadable}
    within = _compare(records.take(held), records.take(train), threshold if use_near else None, examples)
    report["within"] = within
    report["against"] = []
    others = []
    for spec in against:
        other = read_reference(spec, near=use_near)
        others.append(other)
        result = _compare(records, other, threshold if use_near else None, examples)
        result["against"] = other.origin
        result["datasets"] = other.names
        result["skipped_datasets"] = other.skipped
        result["unreadable_images"] = other.unreadable
        report["against"].append(result)
    report["leaks"] = within["leaking"] + sum(r["leaking"] for r in report["against"])
    _fill_example_paths(report, records, others)
    return report


def _compare(query: Records, reference: Records, threshold: int | None, examples: int) -> dict:
    matches = leak_matches(query.fp, reference.fp, threshold)
    out = {kind: int((m >= 0).sum()) for kind, m in matches.items()}
    out["checked"] = len(query.fp)
    out["leaking"] = int(np.logical_or.reduce([m >= 0 for m in matches.values()]).sum()) if len(query.fp) else 0
    if query.split is not None:
        out["by_split"] = {SPLITS[c]: {kind: int(((m >= 0) & (query.split == c)).sum()) for kind, m in matches.items()}
                           for c in sorted(set(query.split.tolist()))}
    out["examples"] = {kind: [{"record": query.where(i), "matches": reference.where(int(m[i]))}
                              for i in np.flatnonzero(m >= 0)[:examples].tolist()] for kind, m in matches.items()}
    return out


def _fill_example_paths(report: dict, records: Records, others: list[Records]) -> None:
    """Add the image paths of every example record (one streaming pass per dataset, stopping at the last one)."""
    wanted: dict[tuple[int, str, int], list] = {}
    sources = [records, *others]
    results = [(0, report["within"], "record"), (0, report["within"], "matches")]
    for k, result in enumerate(report["against"], 1):
        results += [(0, result, "record"), (k, result, "matches")]
    for source_index, result, side in results:
        for items in result["examples"].values():
            for item in items:
                where = item[side]
                wanted.setdefault((source_index, where["dataset"], where["index"]), []).append(where)
    for source_index, source in enumerate(sources):
        for name, attr in source.attrs.items():
            need = {i for (s, n, i) in wanted if s == source_index and n == name}
            if not need or source.media_dir is None:
                continue
            index = 0
            for path in lfdata.data_files(source.media_dir, attr):
                for raw in lfdata.iter_file_records(path):
                    if index in need:
                        try:
                            _, images, _ = lfdata.to_turns(raw, attr)
                        except (ValueError, TypeError, IndexError):
                            images = []
                        for where in wanted[(source_index, name, index)]:
                            where["images"] = [str(p) for p in images]
                    index += 1
                    if index > max(need):
                        break
                if index > max(need):
                    break


def format_leakage(report: dict) -> str:
    """The human-readable report printed by ``mmdata check-leakage``."""
    r = report["records"]
    near = f"near image (pHash within {report['threshold']} bits)" if report["near"] else None
    lines = [f"leakage check of {report['build']}",
             f"  records: train {r['train']:,}  val {r['val']:,}  test {r['test']:,}"]

    def block(title: str, result: dict) -> None:
        lines.append(f"  {title}: {result['leaking']:,} of {result['checked']:,} records leak")
        for kind in KINDS:
            if kind not in result:
                continue
            label = near if kind == "near_image" else kind.replace("_", " ")
            split_note = ""
            if "by_split" in result:
                split_note = "  (" + ", ".join(f"{s} {v[kind]:,}" for s, v in result["by_split"].items()) + ")"
            lines.append(f"    {label:<34} {result[kind]:>8,}{split_note}")
        for kind in KINDS:
            for item in result["examples"].get(kind, [])[:3]:
                lines.append(f"      e.g. [{kind}] {_where(item['record'])} = {_where(item['matches'])}")

    block("val/test vs train", report["within"])
    if not report["near"]:
        lines.append("    (near copies not checked: pass --near, or build with dedup: near)")
    for result in report["against"]:
        block(f"this build vs {result['against']}", result)
        if result["skipped_datasets"]:
            lines.append(f"    (entries without local files, not read: {', '.join(result['skipped_datasets'])})")
        if result["unreadable_images"]:
            lines.append(f"    {result['unreadable_images']:,} image(s) of {result['against']} could not be read and "
                         "were left out: records holding them were compared by their text and other images only")
    if report["unreadable_images"]:
        lines.append(f"  {report['unreadable_images']:,} image(s) of the build could not be read and were left out")
    lines.append(f"  total: {report['leaks']:,} leaking record(s)" + ("" if report["leaks"] else " - no leak found"))
    return "\n".join(lines)


def _where(w: dict) -> str:
    parts = [f"{w.get('split', w['dataset'])} #{w['index']}"]
    if w.get("position", -1) >= 0:
        parts.append(f"row {w['position']}")
    if w.get("images"):
        parts.append(", ".join(w["images"][:2]))
    return " ".join(parts)


def cmd_check_leakage(args: argparse.Namespace) -> int:
    report = check_leakage(args.build_dir, against=args.against or [], near=args.near, threshold=args.threshold,
                           examples=args.examples)
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else format_leakage(report))
    if args.fail_on_leak and report["leaks"]:
        raise LeaksFound(f"{report['leaks']} leaking record(s) (--fail-on-leak)")
    return 0


def _threshold(text: str) -> int:
    """``--threshold``: bits of the 64-bit pHash, within the range ``dedup.threshold`` allows (0-32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 32:
        raise argparse.ArgumentTypeError(f"{value}: must be 0-32 bits (of the 64-bit pHash), as dedup.threshold")
    return value


def add_check_leakage_command(subparsers) -> None:
    p = subparsers.add_parser("check-leakage", help="count val/test records that share images or text with train "
                                                    "(and a build's records with other datasets)")
    p.add_argument("build_dir", help="a build's output.dir (the folder holding mmdata_build.json)")
    p.add_argument("--against", action="append", metavar="BUILD|DATASET_INFO[#NAME,...]",
                   help="also compare every record of the build with another build or LLaMA-Factory dataset "
                        "(repeatable)")
    p.add_argument("--near", action="store_true", help="also near copies (perceptual hash; decodes every image "
                                                      "unless the build was made with dedup: near)")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help=f"near: largest pHash distance in bits, 0-32 (default: the build's, else {NEAR_THRESHOLD})")
    p.add_argument("--examples", type=positive_int, default=EXAMPLES, help=f"examples kept per kind (default {EXAMPLES})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fail-on-leak", action="store_true", help=f"exit {LeaksFound.exit_code} when any leak is found "
                   f"({LeakageError.exit_code}: nothing could be compared)")
    p.set_defaults(func=cmd_check_leakage)
