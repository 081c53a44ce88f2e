"""Dataset report of a build folder: exact counts, distributions over a seeded sample, a gallery, as HTML and JSON.

``mmdata report BUILD_DIR`` writes ``BUILD_DIR/report/``: ``index.html`` (self-contained: inline CSS, no script,
thumbnails embedded as ``data:`` JPEGs, plots as relative PNGs, nothing fetched from the network), ``plots/*.png``
and ``stats.json`` with the same numbers for machines.

Where numbers come from, so a 50k- or 5M-record build reports in seconds:

- exact: every count (read / written / rejected by reason / per split / per source) is the build manifest's
  ``mmdata_build.json``; nothing is recounted;
- sampled: distributions and recommendations come from a seeded reservoir sample of at most ``max_records`` records,
  drawn while the records are streamed once through :mod:`mmdata.lfdata` (memory holds the sample, never the
  dataset). Image width/height are read from file headers only; the only full decodes are the gallery thumbnails.

Token counts: the one token model of :mod:`mmdata.tokens` (a real tokenizer when one is given, ``tokenizer=``,
otherwise its estimator, labelled as such), for the build's model profile (``model=``, default the recipe's
``model``, else Qwen2-VL): its LLaMA-Factory template and image rule, after LLaMA-Factory's ``image_max_pixels``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import lfdata
from . import tokens as qwen_tokens
from ._version import __version__
from .atomic import write_text_atomic
from .errors import MmdataError
from .layout import manifest_dataset_info, read_manifest

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


# ----------------------------------------------------------------------------------------------- tokens


def smart_resize_tokens(width: int, height: int, max_pixels: int = LF_IMAGE_MAX_PIXELS,
                        min_pixels: int = LF_IMAGE_MIN_PIXELS) -> int:
    """Qwen2-VL vision tokens of one ``width`` x ``height`` image as LLaMA-Factory feeds it to the model."""
    return qwen_tokens.image_tokens(width, height, max_pixels=max_pixels, min_pixels=min_pixels)


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


# ----------------------------------------------------------------------------------------------- statistics


@dataclass
class ImageFacts:
    path: str
    width: int | None = None
    height: int | None = None
    file_bytes: int | None = None
    error: str | None = None


@dataclass
class Measures:
    """Per-record and per-image numbers of the sample; lists of equal length per key."""

    records: dict[str, list[float]] = field(default_factory=dict)
    images: dict[str, list[float]] = field(default_factory=dict)
    image_errors: Counter = field(default_factory=Counter)
    record_max_pixels: list[int] = field(default_factory=list)  # largest image (w*h) per record, 0 without images

    def add(self, table: dict[str, list[float]], **values: float) -> None:
        for key, value in values.items():
            table.setdefault(key, []).append(value)


def read_image_facts(media_dir: Path, rel: str) -> ImageFacts:
    """Size from the header only (no decode) and file size."""
    from PIL import Image

    path = Path(rel) if os.path.isabs(rel) else media_dir / rel
    facts = ImageFacts(rel)
    try:
        facts.file_bytes = path.stat().st_size
        with Image.open(path) as img:
            facts.width, facts.height = img.size
    except FileNotFoundError:
        facts.error = "image file not found"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        facts.error = f"unreadable image ({type(e).__name__})"
    return facts


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def measure(records: list[Record], media_dir: Path, counter: qwen_tokens.TokenCounter) -> Measures:
    """Per-record and per-image numbers; totals are :func:`mmdata.tokens.record_tokens` (the one token model: the
    counter's model profile, its template and image rule, at the counter's image_max_pixels)."""
    m = Measures()
    for rec in records:
        prompt = "".join(PLACEHOLDER.sub("", _text(c)) for role, c in rec.turns if role != "assistant")
        answer = "".join(PLACEHOLDER.sub("", _text(c)) for role, c in rec.turns if role == "assistant")
        prompt_tokens, answer_tokens = counter.text(prompt), counter.text(answer)
        facts = [read_image_facts(media_dir, p) for p in rec.images]
        largest = 0
        for f in facts:
            if f.error:
                m.image_errors[f.error] += 1
                continue
            tokens = counter.model.image_tokens(f.width, f.height)
            largest = max(largest, f.width * f.height)
            m.add(m.images, width=f.width, height=f.height, file_kb=f.file_bytes / 1024, image_tokens=tokens)
        messages = sum(1 for role, _ in rec.turns if role != "system")
        sizes = [(f.width, f.height) for f in facts if not f.error]
        total = qwen_tokens.record_tokens([(role, _text(c)) for role, c in rec.turns], sizes, counter)
        m.add(m.records, prompt_chars=len(prompt), answer_chars=len(answer), prompt_tokens=prompt_tokens,
              answer_tokens=answer_tokens, turns=sum(1 for role, _ in rec.turns if role == "assistant"),
              messages=messages, images_per_record=len(rec.images),
              total_tokens=total)
        m.record_max_pixels.append(largest)
    return m


def describe(values: list[float]) -> dict[str, float]:
    """count, mean, min, p50, p90, p99, max (percentiles are values present in the data: nearest rank)."""
    if not values:
        return {"count": 0}
    xs = sorted(values)

    def rank(q: float) -> float:
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    out = {"count": len(xs), "mean": sum(xs) / len(xs), "min": xs[0], "p50": rank(0.5), "p90": rank(0.9),
           "p99": rank(0.99), "max": xs[-1]}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def recommendations(m: Measures, written: int, sample_size: int, max_pixels: int, choices: list[int],
                    counter: qwen_tokens.TokenCounter) -> dict:
    totals = m.records.get("total_tokens", [])
    rec: dict[str, Any] = {}
    if totals:
        p99 = describe(totals)["p99"]
        over_default = sum(1 for t in totals if t > LF_CUTOFF_LEN)
        rec["cutoff_len"] = {
            "value": int(math.ceil(p99 / 64) * 64), "p99_tokens": p99, "max_tokens": max(totals),
            "image_max_pixels": max_pixels, "covers": 0.99,
            "records_over_default_2048": _scale(over_default, sample_size, written),
            "note": "text tokens " + ("counted" if counter.exact else "estimated") + f" + {counter.profile.family} image tokens at "
                    f"image_max_pixels={max_pixels} + chat-template tokens; rounded up to a multiple of 64",
        }
    rows = []
    widths, heights = m.images.get("width", []), m.images.get("height", [])
    for choice in choices:
        above = sum(1 for w, h in zip(widths, heights, strict=True) if w * h > choice)
        records_above = sum(1 for px in m.record_max_pixels if px > choice)
        tokens = [counter.model.image_tokens(w, h, choice) for w, h in zip(widths, heights, strict=True)]
        rows.append({"image_max_pixels": choice, "side": f"{math.isqrt(choice)}^2" if math.isqrt(choice) ** 2 == choice
                     else str(choice), "images_downscaled_in_sample": above, "images_in_sample": len(widths),
                     "records_downscaled": _scale(records_above, sample_size, written),
                     "image_tokens_p50": describe(tokens).get("p50"), "image_tokens_p99": describe(tokens).get("p99")})
    rec["image_max_pixels"] = rows
    return rec


def _scale(count_in_sample: int, sample_size: int, total: int) -> int:
    """A sample count projected onto all written records (exact when the sample is everything)."""
    if not sample_size:
        return 0
    return count_in_sample if sample_size >= total else round(count_in_sample * total / sample_size)


# ----------------------------------------------------------------------------------------------- plots

PLOTS = [  # file name, title, [(table, key, label)], x label
    ("text_chars.png", "Text length (characters)",
     [("records", "prompt_chars", "prompt"), ("records", "answer_chars", "answer")], "characters per record"),
    ("text_tokens.png", "Text length (tokens)",
     [("records", "prompt_tokens", "prompt"), ("records", "answer_tokens", "answer")], "tokens per record"),
    ("total_tokens.png", "Sequence length: text + image + template tokens",
     [("records", "total_tokens", "total")], "tokens per record"),
    ("image_size.png", "Image size (pixels)", [("images", "width", "width"), ("images", "height", "height")], "pixels"),
    ("file_size.png", "Image file size", [("images", "file_kb", "file size")], "KiB"),
    ("image_tokens.png", "Qwen2-VL image tokens", [("images", "image_tokens", "image tokens")], "tokens per image"),
    ("turns.png", "Turns per record (assistant replies)", [("records", "turns", "turns")], "turns"),
]


def write_plots(m: Measures, folder: Path, marker: float | None, max_pixels: int) -> list[tuple[str, str]]:
    """One small PNG per distribution (ASCII labels only: no CJK font needed); returns (file, title) pairs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, series, xlabel in PLOTS:
        data = [(label, getattr(m, table).get(key, [])) for table, key, label in series]
        data = [(label, values) for label, values in data if values]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=90)
        lo = min(min(values) for _, values in data)
        hi = max(max(values) for _, values in data)
        for label, values in data:
            if name == "turns.png":
                c = Counter(int(v) for v in values)
                ax.bar(list(c), list(c.values()), width=0.6, label=label, color="#4c72b0")
                ax.set_xticks(sorted(c))
            else:  # shared bins, so overlaid series compare bar for bar
                ax.hist(values, bins=40 if hi > lo else 1, range=(lo, hi if hi > lo else lo + 1), alpha=0.6,
                        label=label)
        if name == "total_tokens.png" and marker:
            ax.axvline(marker, color="#c44e52", linestyle="--", linewidth=1.2, label=f"cutoff_len {int(marker)}")
        if name == "image_tokens.png":
            title = f"{title} at image_max_pixels={max_pixels:,}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("count", fontsize=9)
        ax.tick_params(labelsize=8)
        if len(data) > 1 or name == "total_tokens.png":
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append((name, title))
    return written


# ----------------------------------------------------------------------------------------------- gallery


def thumbnail_data_uri(media_dir: Path, rel: str, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a ``data:`` URI (the one place the report decodes images); None if unreadable."""
    from PIL import Image

    path = Path(rel) if os.path.isabs(rel) else media_dir / rel
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (side, side))
            img.seek(0)
            img.thumbnail((side, side))
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                canvas = Image.new("RGB", img.size, "white")
                canvas.paste(img, mask=img.getchannel("A"))
                img = canvas
            elif img.mode != "RGB":
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - shown as "unreadable" in the gallery
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def gallery(records: list[Record], media_dir: Path, n: int, seed: int) -> list[dict]:
    picked = random.Random(seed).sample(records, min(n, len(records)))
    picked.sort(key=lambda r: (r.dataset, r.index))
    out = []
    for rec in picked:
        images = []
        for rel in rec.images[:4]:
            facts = read_image_facts(media_dir, rel)
            uri = None if facts.error else thumbnail_data_uri(media_dir, rel)
            images.append({"path": rel, "width": facts.width, "height": facts.height, "data_uri": uri,
                           "error": facts.error or (None if uri else "cannot decode image")})
        out.append({"dataset": rec.dataset, "split": rec.split, "index": rec.index, "images": images,
                    "more_images": max(0, len(rec.images) - 4), "turns": [(role, _text(c)) for role, c in rec.turns]})
    return out


# ----------------------------------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1d1d1f; --muted:#6b6b70; --line:#e3e3e8; --bg:#fafafa; --accent:#3559c7; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: var(--bg); color: var(--fg);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", "Source Han Sans SC",
  "WenQuanYi Micro Hei", "PingFang SC", "Microsoft YaHei", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 32px 0 10px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; } h3 { font-size: 14px; margin: 18px 0 6px; }
.muted { color: var(--muted); } code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; margin-left: 6px;
  vertical-align: 1px; }
.exact { background: #e2f3e5; color: #1e6b2f; } .sampled { background: #fdf0d8; color: #8a5a00; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 140px; }
.card .v { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 12px; }
.plots img { width: 100%; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
.rec { display: grid; grid-template-columns: 340px 1fr; gap: 16px; background: #fff; border: 1px solid var(--line);
  border-radius: 8px; padding: 12px; margin-bottom: 12px; }
.rec .imgs img { max-width: 320px; max-height: 320px; display: block; margin-bottom: 6px; border: 1px solid var(--line);
  background: repeating-conic-gradient(#eee 0% 25%, #fff 0% 50%) 50% / 16px 16px; }
.rec .missing { color: #b00020; font-size: 12px; }
.msg { margin: 0 0 8px; } .role { font-size: 11px; font-weight: 600; text-transform: uppercase; color: var(--accent); }
.msg.assistant .role { color: #1e6b2f; } .msg.system .role { color: var(--muted); }
.content { white-space: pre-wrap; word-break: break-word; margin: 2px 0 0; font-size: 13.5px; }
.where { font-size: 12px; color: var(--muted); margin-bottom: 6px; }
.reco { background: #fff; border-left: 4px solid var(--accent); padding: 8px 14px; margin: 8px 0; }
"""


MEASURE_LABELS = {
    "prompt_chars": "prompt length (characters; system + user turns)", "answer_chars": "answer length (characters)",
    "prompt_tokens": "prompt length (text tokens)", "answer_tokens": "answer length (text tokens)",
    "turns": "turns per record (assistant replies)", "messages": "messages per record (without system)",
    "images_per_record": "images per record",
    "total_tokens": "sequence length (text + image + template tokens)", "width": "image width (px)",
    "height": "image height (px)", "file_kb": "image file size (KiB)", "image_tokens": "Qwen2-VL tokens per image",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _n(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}" if isinstance(value, (int, float)) else _e(value)


def _badge(exact: bool, sample_size: int = 0, total: int = 0) -> str:
    if exact:
        return '<span class="badge exact">exact</span>'
    if total and sample_size >= total:
        return f'<span class="badge exact">all {total:,} records</span>'
    return f'<span class="badge sampled">sample of {sample_size:,}</span>'


def _count_cell(key: str, value: int) -> str:
    return f'<td class="num" data-count="{_e(key)}">{value:,}</td>'


def render_html(stats: dict, plots: list[tuple[str, str]], items: list[dict], rejects: dict[str, list[dict]]) -> str:
    c = stats["counts"]
    n = stats["sample"]["size"]
    name = stats["build"]["name"]
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">', f"<title>mmdata report: {_e(name)}</title>", f"<style>{CSS}</style>",
        "</head><body>",
        f"<h1>Dataset report: {_e(name)}</h1>",
        f'<div class="muted">build folder <code>{_e(stats["build"]["dir"])}</code> · mmdata {_e(__version__)}</div>',
        f'<p class="muted">Numbers marked {_badge(True)} come from the build manifest. '
        + (f"Distributions and recommendations {_badge(False, n, c['written'])} cover every written record. "
           if n >= c["written"] else
           f"Numbers marked {_badge(False, n)} come from a seeded random sample of {n:,} of the "
           f"{c['written']:,} written records (seed {stats['sample']['seed']}); record counts projected from it "
           "are rounded. ")
        + f"Text tokens are {_e(stats['tokens']['text'])}.</p>",
        "<h2>Counts " + _badge(True) + "</h2>", '<div class="cards">',
    ]
    for key in ("read", "written", "rejected"):
        out.append(f'<div class="card"><div class="muted">{key}</div>'
                   f'<div class="v" data-count="{key}">{c[key]:,}</div></div>')
    out.append("</div>")
    if c.get("by_split"):
        out.append('<h3>Per split</h3><table><tr><th>split</th><th class="num">records</th><th>dataset</th></tr>')
        datasets = {d.get("split"): ds for ds, d in stats["build"]["datasets"].items()}
        for split, value in c["by_split"].items():
            out.append(f"<tr><td>{_e(split)}</td>{_count_cell('by_split:' + split, value)}"
                       f"<td><code>{_e(datasets.get(split, ''))}</code></td></tr>")
        out.append("</table>")
    if c.get("by_source"):
        out.append('<h3>Per source</h3><table><tr><th>source</th><th class="num">records written</th></tr>')
        for source, value in c["by_source"].items():
            out.append(f"<tr><td>{_e(source)}</td>{_count_cell('by_source:' + source, value)}</tr>")
        out.append("</table>")
    if c.get("rejected_by_reason"):
        out.append('<h3>Rejected, by reason</h3><table><tr><th>reason</th><th class="num">records</th>'
                   "<th>examples from <code>rejects.jsonl</code></th></tr>")
        for reason, value in c["rejected_by_reason"].items():
            examples = "".join(
                f'<div><code>#{_e(r.get("position"))}</code>'
                + (f' id <code>{_e(r["id"])}</code>' if r.get("id") is not None else "")
                + (f' source <code>{_e(r["source"])}</code>' if r.get("source") else "")
                + f' <span class="muted">{_e(_clip(str(r.get("message", "")), 300))}</span></div>'
                for r in rejects.get(reason, []))
            out.append(f"<tr><td>{_e(reason)}</td>{_count_cell('rejected_by_reason:' + reason, value)}"
                       f"<td>{examples}</td></tr>")
        out.append("</table>")

    out.append(f"<h2>Recommendations {_badge(False, n, c['written'])}</h2>")
    reco = stats["recommendations"]
    if "cutoff_len" in reco:
        cl = reco["cutoff_len"]
        out.append(f'<div class="reco"><b>cutoff_len: {cl["value"]:,}</b> covers 99% of records '
                   f'(p99 {_n(cl["p99_tokens"])} tokens, longest {_n(cl["max_tokens"])}). '
                   + (f'About {over:,} records are longer than LLaMA-Factory\'s default 2048 and would be truncated '
                      "with it. " if (over := cl["records_over_default_2048"]) else
                      "LLaMA-Factory's default 2048 truncates none of them. ")
                   + f'<span class="muted">{_e(cl["note"])}.</span></div>')
    out.append('<h3>What <code>image_max_pixels</code> would downscale</h3><table><tr><th>image_max_pixels</th>'
               '<th class="num">images above it (sample)</th><th class="num">records downscaled (projected)</th>'
               '<th class="num">image tokens p50</th><th class="num">image tokens p99</th></tr>')
    for row in reco["image_max_pixels"]:
        mark = " (used in this report)" if row["image_max_pixels"] == stats["image_max_pixels"] else ""
        out.append(f'<tr><td>{row["image_max_pixels"]:,} = {_e(row["side"])}{mark}</td>'
                   f'<td class="num">{row["images_downscaled_in_sample"]:,} of {row["images_in_sample"]:,}</td>'
                   f'<td class="num">{row["records_downscaled"]:,}</td>'
                   f'<td class="num">{_n(row["image_tokens_p50"] or 0)}</td>'
                   f'<td class="num">{_n(row["image_tokens_p99"] or 0)}</td></tr>')
    out.append("</table>")
    if stats["image_errors"]:
        out.append('<p class="missing">Images that could not be read in the sample: '
                   + ", ".join(f"{_e(k)}: {v:,}" for k, v in stats["image_errors"].items()) + "</p>")

    out.append(f"<h2>Distributions {_badge(False, n, c['written'])}</h2>")
    out.append('<table><tr><th>measure</th><th class="num">n</th><th class="num">mean</th><th class="num">min</th>'
               '<th class="num">p50</th><th class="num">p90</th><th class="num">p99</th><th class="num">max</th></tr>')
    for key, d in stats["distributions"].items():
        if d.get("count"):
            out.append(f"<tr><td>{_e(MEASURE_LABELS.get(key, key))}</td>" + "".join(f'<td class="num">{_n(d[k])}</td>' for k in
                       ("count", "mean", "min", "p50", "p90", "p99", "max")) + "</tr>")
    out.append("</table>")
    out.append('<div class="plots">' + "".join(f'<img src="plots/{_e(f)}" alt="{_e(t)}">' for f, t in plots)
               + "</div>")

    out.append(f'<h2>Gallery <span class="muted">({len(items)} records, seed {stats["sample"]["seed"]})</span></h2>')
    out.append('<div class="gallery">')
    for item in items:
        imgs = []
        for im in item["images"]:
            if im["data_uri"]:
                imgs.append(f'<img src="{im["data_uri"]}" alt="{_e(im["path"])}" title="{_e(im["path"])} '
                            f'({im["width"]}x{im["height"]})"><div class="muted" style="font-size:11px">'
                            f'{im["width"]}x{im["height"]}</div>')
            else:
                imgs.append(f'<div class="missing">{_e(im["error"])}: <code>{_e(im["path"])}</code></div>')
        if item["more_images"]:
            imgs.append(f'<div class="muted">+{item["more_images"]} more images</div>')
        if not item["images"]:
            imgs.append('<div class="muted">no image</div>')
        msgs = "".join(f'<div class="msg {_e(role)}"><div class="role">{_e(role)}</div>'
                       f'<div class="content">{_e(_clip(content, TEXT_LIMIT))}</div></div>'
                       for role, content in item["turns"])
        out.append(f'<div class="rec"><div class="imgs">{"".join(imgs)}</div><div>'
                   f'<div class="where">{_e(item["dataset"])} · split {_e(item["split"])} · record {item["index"]:,}'
                   f"</div>{msgs}</div></div>")
    out.append("</div>")
    out.append('<p class="muted">Machine-readable: <code>stats.json</code> next to this page.</p></body></html>')
    return "\n".join(out)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit:,} more characters)"


# ----------------------------------------------------------------------------------------------- entry points


def write_report(build_dir: str | os.PathLike, samples: int = 24, seed: int = 0, tokenizer: Any = None, *,
                 max_records: int = SAMPLE_RECORDS, image_max_pixels: int | None = None,
                 model: str | os.PathLike | None = None) -> Path:
    """Write ``<build_dir>/report/{index.html, stats.json, plots/}`` and return the path of ``index.html``.

    ``samples``: gallery size; ``seed``: drives the statistics sample and the gallery; ``tokenizer``: a
    ``transformers`` name/path or tokenizer object for exact text tokens; ``max_records``: statistics sample size;
    ``image_max_pixels``: budget for image-token numbers (default: the recipe's ``images.max_pixels``, else
    LLaMA-Factory's 768*768); ``model``: a profile name or local model folder whose template and image rule count
    (default: the recipe's ``model``, else Qwen2-VL).
    """
    build = Build.open(build_dir)
    counts = build.counts
    recipe = build.manifest.get("recipe") or {}
    max_pixels = image_max_pixels or build.manifest.get("image_max_pixels") or LF_IMAGE_MAX_PIXELS
    counter = qwen_tokens.token_counter(tokenizer, max_pixels, model=model or recipe.get("model"))
    records = build.sample(max_records, seed)
    m = measure(records, build.media_dir, counter)
    choices = sorted(set(MAX_PIXEL_CHOICES) | {max_pixels})
    stats = {
        "mmdata_version": __version__,
        "build": {"name": build.manifest.get("name") or recipe.get("name"), "dir": str(build.root),
                  "dataset_info": str(build.info_path), "datasets": build.manifest.get("datasets", {})},
        "counts": counts,
        "sample": {"size": len(records), "of": counts["written"], "seed": seed, "max_records": max_records},
        "tokens": {"text": counter.label, "model": counter.profile.name,
                   "image": f"{counter.profile.family} image rule after LLaMA-Factory's image_max_pixels",
                   "template": f"LLaMA-Factory template {counter.profile.lf_template}"},
        "image_max_pixels": max_pixels,
        "distributions": {**{k: describe(v) for k, v in m.records.items()},
                          **{k: describe(v) for k, v in m.images.items()}},
        "image_errors": dict(m.image_errors),
        "recommendations": recommendations(m, counts["written"], len(records), max_pixels, choices, counter),
    }
    out = build.root / REPORT_DIR
    if (out / "plots").is_dir():
        shutil.rmtree(out / "plots")
    out.mkdir(parents=True, exist_ok=True)
    marker = stats["recommendations"].get("cutoff_len", {}).get("value")
    plots = write_plots(m, out / "plots", marker, max_pixels)
    stats["plots"] = [f"plots/{name}" for name, _ in plots]
    items = gallery(records, build.media_dir, samples, seed)
    page = render_html(stats, plots, items, build.reject_examples())
    write_text_atomic(out / "stats.json", json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
    write_text_atomic(out / "index.html", page)
    return out / "index.html"


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.build_dir, samples=args.samples, seed=args.seed, tokenizer=args.tokenizer,
                        max_records=args.max_records, image_max_pixels=args.image_max_pixels, model=args.model)
    print(f"report: {path}")
    return 0


def add_report_command(subparsers) -> None:
    p = subparsers.add_parser("report", help="write report/index.html (stats, plots, gallery) for a build folder")
    p.add_argument("build_dir", help="a build's output.dir (the folder holding mmdata_build.json)")
    p.add_argument("--samples", type=int, default=24, help="records shown in the gallery (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the statistics sample and the gallery")
    p.add_argument("--max-records", type=int, default=SAMPLE_RECORDS,
                   help=f"records sampled for distributions (default {SAMPLE_RECORDS})")
    p.add_argument("--image-max-pixels", type=int, default=None,
                   help="budget for image-token numbers (default: the recipe's, else 768*768 like LLaMA-Factory)")
    p.add_argument("--tokenizer", default=None, help="transformers tokenizer name or path for exact text tokens")
    p.add_argument("--model", default=None, metavar="NAME|DIR",
                   help="count tokens for this model profile or local model folder (default: the recipe's model)")
    p.set_defaults(func=cmd_report)
