"""The report's numbers over the sampled records: per-record and per-image measures, their distributions, and the
``cutoff_len`` / ``image_max_pixels`` recommendations."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import tokens as qwen_tokens
from .build import LF_CUTOFF_LEN, LF_IMAGE_MAX_PIXELS, LF_IMAGE_MIN_PIXELS, PLACEHOLDER, Record

# ----------------------------------------------------------------------------------------------- tokens


def smart_resize_tokens(width: int, height: int, max_pixels: int = LF_IMAGE_MAX_PIXELS,
                        min_pixels: int = LF_IMAGE_MIN_PIXELS) -> int:
    """Qwen2-VL vision tokens of one ``width`` x ``height`` image as LLaMA-Factory feeds it to the model."""
    return qwen_tokens.image_tokens(width, height, max_pixels=max_pixels, min_pixels=min_pixels)

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


def report_image_path(media_dir: Path, rel: str) -> Path:
    """The file a record's image names, if the report may read it: inside the build's media folder (a record pointing
    at ``../private/x.png`` or an absolute path elsewhere would put that image into a page meant to be shared) and a
    regular file (a FIFO would block the report forever). Raises ``FileNotFoundError`` with the reason otherwise."""
    path = Path(rel) if os.path.isabs(rel) else media_dir / rel
    try:
        path.resolve().relative_to(media_dir.resolve())
    except ValueError:
        raise FileNotFoundError("image outside the build folder (not read)") from None
    if path.exists() and not path.is_file():
        raise FileNotFoundError("image path is not a regular file (not read)")
    return path


def read_image_facts(media_dir: Path, rel: str) -> ImageFacts:
    """Size from the header only (no decode) and file size."""
    from PIL import Image

    facts = ImageFacts(rel)
    try:
        path = report_image_path(media_dir, rel)
        facts.file_bytes = path.stat().st_size
        with Image.open(path) as img:
            facts.width, facts.height = img.size
    except FileNotFoundError as e:
        facts.error = str(e) if "not read" in str(e) else "image file not found"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        facts.error = f"unreadable image ({type(e).__name__})"
    return facts


def text_of(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def measure(records: list[Record], media_dir: Path, counter: qwen_tokens.TokenCounter) -> Measures:
    """Per-record and per-image numbers; totals are :func:`mmdata.tokens.record_tokens` (the one token model: the
    counter's model profile, its template and image rule, at the counter's image_max_pixels)."""
    m = Measures()
    for rec in records:
        prompt = "".join(PLACEHOLDER.sub("", text_of(c)) for role, c in rec.turns if role != "assistant")
        answer = "".join(PLACEHOLDER.sub("", text_of(c)) for role, c in rec.turns if role == "assistant")
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
        total = qwen_tokens.record_tokens([(role, text_of(c)) for role, c in rec.turns], sizes, counter)
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
