"""Reading a finished build for the report: its manifest, its datasets' records (streamed, sampled), rejects."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import lfdata
from .. import tokens as qwen_tokens
from ..errors import MmdataError
from ..layout import manifest_dataset_info, read_manifest

REPORT_DIR = "report"
SAMPLE_RECORDS = 10_000
LF_IMAGE_MAX_PIXELS = qwen_tokens.IMAGE_MAX_PIXELS  # LLaMA-Factory's default image_max_pixels
LF_IMAGE_MIN_PIXELS = qwen_tokens.IMAGE_MIN_PIXELS  # LLaMA-Factory's default image_min_pixels
LF_CUTOFF_LEN = qwen_tokens.LF_CUTOFF_LEN
MAX_PIXEL_CHOICES = (256 * 256, 512 * 512, 768 * 768, 1024 * 1024)
REJECT_EXAMPLES = 3  # rejected rows shown per reason
REJECT_SCAN_LINES = 200_000  # rejects.jsonl lines read at most while looking for examples
THUMB_SIDE = 320
TEXT_LIMIT = 1500  # characters of one message shown in the gallery
PLACEHOLDER = re.compile(r"<image>|<video>|<audio>")

class ReportError(MmdataError):
    """The folder is not a finished build (no manifest, datasets missing from ``dataset_info.json``)."""

    exit_code = 6

# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Record:
    """One sampled record: where it is, its canonical turns and its image paths (as written in the record)."""

    dataset: str
    split: str
    index: int
    turns: list[tuple[str, Any]]
    images: list[str]


@dataclass
class Build:
    """A finished build folder: its manifest, its ``dataset_info.json`` and the datasets the manifest lists."""

    root: Path
    manifest: dict
    info_path: Path
    attrs: dict[str, lfdata.DatasetAttr]

    @classmethod
    def open(cls, build_dir: str | os.PathLike) -> Build:
        root = Path(build_dir).expanduser().resolve()
        manifest = read_manifest(root, ReportError)
        info_path = manifest_dataset_info(root, manifest)
        info = lfdata.read_dataset_info(info_path) if manifest.get("datasets") else {}  # none: all rows rejected
        missing = [name for name in manifest.get("datasets", {}) if name not in info]
        if missing:
            raise ReportError(f"{info_path}: datasets {missing} of this build are not registered; rebuild it")
        attrs = {name: lfdata.parse_entry(name, info[name]) for name in manifest.get("datasets", {})}
        return cls(root, manifest, info_path, attrs)

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    @property
    def media_dir(self) -> Path:
        """Image paths in records are relative to the folder of ``dataset_info.json`` (LLaMA-Factory's media_dir)."""
        return self.info_path.parent

    def iter_records(self) -> Iterator[tuple[str, int, Any]]:
        """``(dataset, index, raw record)`` of every record, streamed in file order."""
        for name, attr in self.attrs.items():
            index = 0
            for path in lfdata.data_files(self.media_dir, attr):
                for raw in lfdata.iter_file_records(path):
                    yield name, index, raw
                    index += 1

    def sample(self, k: int, seed: int) -> list[Record]:
        """A uniform reservoir sample (Algorithm R) of ``k`` records, in dataset order; one streaming pass."""
        rng = random.Random(seed)
        reservoir: list[tuple[str, int, Any]] = []
        for n, item in enumerate(self.iter_records()):
            if n < k:
                reservoir.append(item)
            else:
                j = rng.randrange(n + 1)
                if j < k:
                    reservoir[j] = item
        order = {name: i for i, name in enumerate(self.attrs)}
        reservoir.sort(key=lambda item: (order[item[0]], item[1]))
        records = []
        for name, index, raw in reservoir:
            attr = self.attrs[name]
            try:
                turns, images, _ = lfdata.to_turns(raw, attr) if isinstance(raw, dict) else ([], [], [])
            except (ValueError, TypeError, IndexError):
                turns, images = [], []
            records.append(Record(name, self.manifest["datasets"][name].get("split", attr.split), index, turns,
                                  [str(p) for p in images if isinstance(p, str)]))
        return records

    def reject_examples(self, per_reason: int = REJECT_EXAMPLES) -> dict[str, list[dict]]:
        """The first few ``rejects.jsonl`` rows of every reason (the file is read only until each has enough)."""
        wanted = set(self.counts.get("rejected_by_reason", {}))
        found: dict[str, list[dict]] = {reason: [] for reason in wanted}
        path = self.root / "rejects.jsonl"
        if not wanted or not path.is_file():
            return found
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                if n >= REJECT_SCAN_LINES or all(len(v) >= per_reason for v in found.values()):
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                bucket = found.get(row.get("reason")) if isinstance(row, dict) else None
                if bucket is not None and len(bucket) < per_reason:
                    bucket.append(row)
        return found
