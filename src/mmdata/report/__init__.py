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
import json
import os
from pathlib import Path
from typing import Any

from .. import tokens as qwen_tokens
from .._version import __version__
from ..atomic import write_text_atomic
from ..cliargs import positive_int
from ..layout import read_json
from .build import (
    LF_IMAGE_MAX_PIXELS,
    MAX_PIXEL_CHOICES,
    REPORT_DIR,
    SAMPLE_RECORDS,
    Build,
    ReportError,
)
from .html import duplicate_clusters, duplicates_html, gallery, render_html
from .plots import write_plots
from .stats import describe, measure, recommendations, smart_resize_tokens

__all__ = ["ReportError", "add_report_command", "smart_resize_tokens", "write_report"]



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
    _clear_own_report(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = stats["recommendations"].get("cutoff_len", {}).get("value")
    plots = write_plots(m, out / "plots", marker, max_pixels)
    stats["plots"] = [f"plots/{name}" for name, _ in plots]
    items = gallery(records, build.media_dir, samples, seed)
    dups = duplicate_clusters(build)
    if dups is not None:
        stats["duplicates"] = dups
    page = render_html(stats, plots, items, build.reject_examples(),
                       duplicates_html(dups, build.media_dir) if dups is not None else None)
    written = ["index.html", "stats.json", *stats["plots"]]
    write_text_atomic(out / OWN_FILES, json.dumps({"written": written}, indent=1) + "\n")  # first: claims them
    write_text_atomic(out / "stats.json", json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
    write_text_atomic(out / "index.html", page)
    return out / "index.html"


#: Inside ``report/``: the files the last report wrote, so the next one removes those and nothing else.
OWN_FILES = ".mmdata-report.json"


def _clear_own_report(out: Path) -> None:
    """Remove the previous report's files (as its :data:`OWN_FILES` lists them) before writing a new one; a
    ``report/`` that holds files without that list is the user's, and is refused, untouched (the report used to
    overwrite ``index.html``/``stats.json`` there and delete ``plots/``)."""
    if not out.exists():
        return
    own = read_json(out / OWN_FILES) if (out / OWN_FILES).is_file() else None
    earlier = read_json(out / "stats.json") if own is None and (out / "stats.json").is_file() else None
    if isinstance(earlier, dict) and "mmdata_version" in earlier:  # a report of a version before the list
        own = {"written": ["index.html", "stats.json", *(earlier.get("plots") or [])]}
    if not isinstance(own, dict) or not isinstance(own.get("written"), list):
        if out.is_dir() and not any(out.iterdir()):
            return
        raise ReportError(f"{out}: holds files mmdata's report did not write; move them (or the folder) away, and "
                          "run the report again")
    for rel in own["written"]:
        target = out / str(rel)
        if target.is_file() and target.resolve().is_relative_to(out.resolve()):
            target.unlink()
    (out / OWN_FILES).unlink(missing_ok=True)


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.build_dir, samples=args.samples, seed=args.seed, tokenizer=args.tokenizer,
                        max_records=args.max_records, image_max_pixels=args.image_max_pixels, model=args.model)
    print(f"report: {path}")
    return 0


def add_report_command(subparsers) -> None:
    p = subparsers.add_parser("report", help="write report/index.html (stats, plots, gallery) for a build folder")
    p.add_argument("build_dir", help="a build's output.dir (the folder holding mmdata_build.json)")
    p.add_argument("--samples", type=positive_int, default=24, help="records shown in the gallery (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the statistics sample and the gallery")
    p.add_argument("--max-records", type=positive_int, default=SAMPLE_RECORDS,
                   help=f"records sampled for distributions (default {SAMPLE_RECORDS})")
    p.add_argument("--image-max-pixels", type=positive_int, default=None,
                   help="budget for image-token numbers (default: the recipe's, else 768*768 like LLaMA-Factory)")
    p.add_argument("--tokenizer", default=None, help="transformers tokenizer name or path for exact text tokens")
    p.add_argument("--model", default=None, metavar="NAME|DIR",
                   help="count tokens for this model profile or local model folder (default: the recipe's model)")
    p.set_defaults(func=cmd_report)
