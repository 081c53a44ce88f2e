"""Grounding boxes and points: convert between coordinate conventions and write them the way each model was trained.

Why: a detection dataset stores boxes in one convention (absolute pixels of the original image, usually), and each
VLM family learned another. Getting this wrong trains a model to point at the wrong place without any error, so the
rules live in one place and are pure functions (no image is opened; sizes are passed in).

Conventions (``x1, y1, x2, y2``, x to the right, y down):

- ``"pixels"``: absolute pixels of the original image (floats allowed);
- ``"relative"``: fractions 0-1 of the original width and height;
- ``"thousand"``: integers 0-1000 of the original width and height (Qwen2-VL, Qwen3-VL, InternVL);
- ``"resized"``: integer pixels of the image as the target model's processor resizes it (Qwen2.5-VL), which needs a
  :class:`~mmdata.profiles.ModelProfile` (its LLaMA-Factory resize plus ``smart_resize``:
  :meth:`~mmdata.profiles.ModelProfile.model_input_size`).

Text forms (:data:`BOX_FORMATS`, chosen by ``profile.box_format``): Qwen2-VL's special tokens
``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``; Qwen2.5-VL and Qwen3-VL's
JSON ``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` (points: ``{"point_2d": [x, y], ...}``); InternVL's
``<ref>label</ref><box>[[x1, y1, x2, y2]]</box>``. Sources are listed in ``docs/models.md``.

Integer conventions round half up and clamp to their range, so a round trip pixels -> X -> pixels moves a coordinate
by at most half a unit of X: ``width / 2000`` px for ``"thousand"``, ``width / resized_width / 2`` px for
``"resized"`` (under one pixel whenever the image is at most 2000 px, or not shrunk below half).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import MmdataError

if TYPE_CHECKING:
    from .profiles import ModelProfile

Convention = Literal["pixels", "relative", "thousand", "resized"]
Box = tuple[float, float, float, float]
Point = tuple[float, float]
CONVENTIONS: tuple[str, ...] = ("pixels", "relative", "thousand", "resized")
_INTEGER = {"thousand", "resized"}


class BoxError(MmdataError):
    """A box or point that cannot be written in the requested form (degenerate, or a model without the format)."""

    exit_code = 2


# ------------------------------------------------------------------------------------------------ geometry


def order_box(box: Box) -> Box:
    """``(x1, y1, x2, y2)`` with ``x1 <= x2`` and ``y1 <= y2`` (datasets sometimes store corners swapped)."""
    x1, y1, x2, y2 = box
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def clamp_box(box: Box, width: float, height: float) -> Box:
    """The box ordered and cut to the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = order_box(box)
    return (min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height))


def clamp_point(point: Point, width: float, height: float) -> Point:
    return min(max(point[0], 0), width), min(max(point[1], 0), height)


def is_degenerate(box: Box) -> bool:
    """No area: zero width or height (after ordering)."""
    x1, y1, x2, y2 = order_box(box)
    return x2 <= x1 or y2 <= y1


def clean_box(box: Box, width: float, height: float) -> Box | None:
    """The box ordered and clamped to the image, or ``None`` when nothing of it is left (outside, or no area)."""
    clamped = clamp_box(box, width, height)
    return None if is_degenerate(clamped) else clamped


# ------------------------------------------------------------------------------------------------ conventions


def _extent(convention: str, width: int, height: int, profile: ModelProfile | None, max_pixels: int | None,
            min_pixels: int | None) -> tuple[float, float]:
    """Width and height of the image in ``convention``'s units."""
    if convention == "pixels":
        return float(width), float(height)
    if convention == "relative":
        return 1.0, 1.0
    if convention == "thousand":
        return 1000.0, 1000.0
    if convention == "resized":
        if profile is None:
            raise ValueError("the 'resized' convention needs the target model's profile (mmdata.profiles)")
        w, h = profile.model_input_size(width, height, max_pixels, min_pixels)
        return float(w), float(h)
    raise ValueError(f"unknown box convention {convention!r}; known: {', '.join(CONVENTIONS)}")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def convert_point(point: Point, src: Convention, dst: Convention, width: int, height: int,
                  profile: ModelProfile | None = None, max_pixels: int | None = None,
                  min_pixels: int | None = None) -> Point:
    """``point`` from ``src`` to ``dst`` for an original image of ``width`` x ``height``; integer conventions are
    rounded and every result is clamped to the image. ``max_pixels``/``min_pixels`` are LLaMA-Factory's
    ``image_max_pixels``/``image_min_pixels`` (``"resized"`` only; default: the profile's)."""
    sw, sh = _extent(src, width, height, profile, max_pixels, min_pixels)
    dw, dh = (sw, sh) if dst == src else _extent(dst, width, height, profile, max_pixels, min_pixels)
    x, y = (point[0], point[1]) if dst == src else (point[0] / sw * dw, point[1] / sh * dh)
    if dst in _INTEGER:
        x, y = _round_half_up(x), _round_half_up(y)
    return clamp_point((x, y), dw, dh)


def convert_box(box: Box, src: Convention, dst: Convention, width: int, height: int,
                profile: ModelProfile | None = None, max_pixels: int | None = None,
                min_pixels: int | None = None) -> Box:
    """``box`` from ``src`` to ``dst`` (see :func:`convert_point`); the result is ordered."""
    x1, y1, x2, y2 = order_box(box)
    a = convert_point((x1, y1), src, dst, width, height, profile, max_pixels, min_pixels)
    b = convert_point((x2, y2), src, dst, width, height, profile, max_pixels, min_pixels)
    return a[0], a[1], b[0], b[1]


# ------------------------------------------------------------------------------------------------ text forms


@dataclass(frozen=True)
class BoxFormat:
    """How one family writes boxes: the coordinate ``convention`` and the text ``style``."""

    name: str
    convention: Convention
    style: Literal["qwen2_tokens", "json", "internvl"]
    source: str


BOX_FORMATS: dict[str, BoxFormat] = {f.name: f for f in (
    BoxFormat("qwen2_vl", "thousand", "qwen2_tokens",
              "Qwen2-VL report (arXiv:2409.12191) sec. 2.2: coordinates normalised to [0, 1000), "
              "'(X_topleft, Y_topleft),(X_bottomright, Y_bottomright)' between <|box_start|>/<|box_end|>, "
              "the phrase between <|object_ref_start|>/<|object_ref_end|>"),
    BoxFormat("qwen2_5_vl", "resized", "json",
              "Qwen2.5-VL report (arXiv:2502.13923) sec. 2.2 and the Qwen2.5-VL cookbook: absolute coordinates of "
              "the input image as resized by the processor, JSON {\"bbox_2d\": [...], \"label\": ...}"),
    BoxFormat("qwen3_vl", "thousand", "json",
              "Qwen3-VL README / cookbook 2d_grounding: relative coordinates scaled to 0-1000, same JSON keys"),
    BoxFormat("internvl", "thousand", "internvl",
              "InternVL docs (grounding): <ref>label</ref><box>[[x1, y1, x2, y2]]</box>, coordinates 0-1000"),
)}


def box_format(profile: ModelProfile) -> BoxFormat:
    """The profile's box format, or a :class:`BoxError` naming the families that have one."""
    if profile.box_format is None:
        raise BoxError(f"profile {profile.name!r} ({profile.family}) has no documented grounding-box format; "
                       f"families with one: {', '.join(BOX_FORMATS)}")
    return BOX_FORMATS[profile.box_format]


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def format_box(box: Box, width: int, height: int, profile: ModelProfile, label: str | None = None,
               src: Convention = "pixels", max_pixels: int | None = None, min_pixels: int | None = None) -> str:
    """One box (``src`` coordinates of a ``width`` x ``height`` original) in the profile's text form.

    The box is clamped to the image first; one without area raises :class:`BoxError` (use :func:`clean_box` to
    drop those). For Qwen2.5-VL, pass the LLaMA-Factory ``image_max_pixels`` the training will use.
    """
    fmt = box_format(profile)
    pixels = convert_box(box, src, "pixels", width, height, profile, max_pixels, min_pixels)
    if is_degenerate(pixels):
        raise BoxError(f"box {tuple(box)} has no area inside the {width}x{height} image")
    x1, y1, x2, y2 = (_num(v) for v in convert_box(pixels, "pixels", fmt.convention, width, height, profile,
                                                   max_pixels, min_pixels))
    if fmt.style == "qwen2_tokens":
        ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label is not None else ""
        return f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    if fmt.style == "internvl":
        ref = f"<ref>{label}</ref>" if label is not None else ""
        return f"{ref}<box>[[{x1}, {y1}, {x2}, {y2}]]</box>"
    return json.dumps(_json_item("bbox_2d", [x1, y1, x2, y2], label), ensure_ascii=False)


def _json_item(key: str, coords: list, label: str | None) -> dict:
    return {key: coords, **({"label": label} if label is not None else {})}


def format_boxes(items: Iterable[tuple[Box, str | None]], width: int, height: int, profile: ModelProfile,
                 src: Convention = "pixels", max_pixels: int | None = None, min_pixels: int | None = None,
                 sep: str = "\n") -> str:
    """Several ``(box, label)`` in the profile's form: a JSON array for Qwen2.5-VL/Qwen3-VL (what their grounding
    answers look like, without the markdown fence), else the boxes joined by ``sep``."""
    items = list(items)
    if box_format(profile).style == "json":
        return "[" + ", ".join(format_box(b, width, height, profile, label, src, max_pixels, min_pixels)
                               for b, label in items) + "]"
    return sep.join(format_box(b, width, height, profile, label, src, max_pixels, min_pixels) for b, label in items)


def format_point(point: Point, width: int, height: int, profile: ModelProfile, label: str | None = None,
                 src: Convention = "pixels", max_pixels: int | None = None, min_pixels: int | None = None) -> str:
    """A point as ``{"point_2d": [x, y], "label": ...}``: the JSON families only (Qwen2-VL and InternVL document no
    point form)."""
    fmt = box_format(profile)
    if fmt.style != "json":
        raise BoxError(f"profile {profile.name!r}: {profile.family} documents no point format; "
                       "points are written for Qwen2.5-VL and Qwen3-VL")
    pixels = convert_point(point, src, "pixels", width, height, profile, max_pixels, min_pixels)
    x, y = (_num(v) for v in convert_point(pixels, "pixels", fmt.convention, width, height, profile, max_pixels,
                                           min_pixels))
    return json.dumps(_json_item("point_2d", [x, y], label), ensure_ascii=False)


_QWEN2_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?"
    r"<\|box_start\|>\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)\s*,\s*\(\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\)<\|box_end\|>")
_INTERNVL_BOX = re.compile(r"(?:<ref>(?P<label>.*?)</ref>)?<box>(?P<boxes>\[.*?\]\])</box>", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _json_items(text: str) -> list[dict]:
    match = _FENCE.search(text)
    body = match.group(1) if match else text
    try:
        data = json.loads(body)
    except ValueError:
        return []
    data = [data] if isinstance(data, dict) else data
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def parse_boxes(text: str, width: int, height: int, profile: ModelProfile, dst: Convention = "pixels",
                max_pixels: int | None = None, min_pixels: int | None = None) -> list[tuple[Box, str | None]]:
    """The ``(box, label)`` pairs of a model's answer (or a dataset's target) in the profile's form, converted to
    ``dst`` (default: original pixels). Text that holds no box in that form gives ``[]``."""
    fmt = box_format(profile)
    found: list[tuple[Box, str | None]] = []
    if fmt.style == "qwen2_tokens":
        for m in _QWEN2_BOX.finditer(text):
            found.append((tuple(float(g) for g in m.groups()[1:]), m.group("label")))
    elif fmt.style == "internvl":
        for m in _INTERNVL_BOX.finditer(text):
            try:
                boxes = json.loads(m.group("boxes"))
            except ValueError:
                continue
            found += [(tuple(float(v) for v in b), m.group("label")) for b in boxes if len(b) == 4]
    else:
        for item in _json_items(text):
            coords = item.get("bbox_2d")
            if isinstance(coords, list) and len(coords) == 4:
                found.append((tuple(float(v) for v in coords), item.get("label")))
    return [(convert_box(b, fmt.convention, dst, width, height, profile, max_pixels, min_pixels), label)
            for b, label in found]
