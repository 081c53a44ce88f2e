"""The ``boxes:`` recipe transform: grounding boxes from a column, written the way the target model expects them.

Sources give boxes in their own convention (COCO/RefCOCO: ``[x, y, w, h]`` pixels of the original image; others
``[x1, y1, x2, y2]`` pixels, 0-1 or 0-1000); each model family reads one (Qwen2-VL and Qwen3-VL: integers scaled to
0-1000; Qwen2.5-VL: absolute pixels of the image *as its processor resizes it*), in one text form (see
:mod:`mmdata.boxes`). The transform fills ``{boxes}`` in the prompt or answer (or ``fields.answer: boxes``) with the
record's boxes in the recipe's ``model`` form, computed from the written image's size and LLaMA-Factory's
``image_max_pixels``, so the numbers match what the model sees in training. Since a row is rendered before its image
is read, ``{boxes}`` is first a placeholder that :func:`fill_boxes` replaces once the image's size is known.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .boxes import BoxError, convert_box, format_boxes
from .errors import SampleError
from .profiles import ModelProfile
from .recipes import Boxes

#: What ``{boxes}`` renders to until :func:`fill_boxes` knows the image size (NUL never occurs in rendered text).
BOXES_SLOT = "\x00mmdata:boxes\x00"


def boxes_text(value: Any, labels: Any, spec: Boxes, original: tuple[int, int], written: tuple[int, int],
               profile: ModelProfile, max_pixels: int) -> str:
    """The record's boxes (``value``: one box or a list of boxes, each a list of 4 numbers or ``{"bbox": [...],
    "label": ...}``) in ``profile``'s text form. ``original``: the size the source's coordinates refer to;
    ``written``: the size of the image the record points at (they differ after ``images: convert``)."""
    items = []
    for box, label in _items(value, labels):
        if spec.layout == "xywh":
            box = (box[0], box[1], box[0] + box[2], box[1] + box[3])
        relative = convert_box(box, spec.convention, "relative", *original)
        items.append((relative, label))
    if not items:
        raise SampleError(f"column {spec.column!r} holds no box", kind="bad boxes")
    try:
        return format_boxes(items, *written, profile, src="relative", max_pixels=max_pixels)
    except BoxError as e:
        raise SampleError(f"boxes of column {spec.column!r}: {e}", kind="bad boxes") from None


def fill_boxes(messages: list[dict], text: str) -> None:
    """Replace the placeholder in every message with the boxes' text."""
    for m in messages:
        if isinstance(m.get("content"), str) and BOXES_SLOT in m["content"]:
            m["content"] = m["content"].replace(BOXES_SLOT, text)


def _items(value: Any, labels: Any) -> list[tuple[tuple[float, ...], str | None]]:
    if isinstance(value, str):  # a CSV cell: "[x1, y1, x2, y2]" or a JSON list of them
        try:
            value = json.loads(value)
        except ValueError:
            raise SampleError(f"boxes value {value[:80]!r} is not JSON; expected [x1, y1, x2, y2] or a list of them",
                              kind="bad boxes") from None
    if hasattr(value, "tolist"):  # numpy arrays from Arrow-backed sources
        value = value.tolist()
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value and _is_number(value[0])):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SampleError(f"boxes value is a {type(value).__name__}; expected [x1, y1, x2, y2] or a list of them",
                          kind="bad boxes")
    if labels is not None and not isinstance(labels, (list, tuple)):
        labels = [labels] * len(value)
    out = []
    for i, item in enumerate(value):
        label = None if labels is None or i >= len(labels) else labels[i]
        if isinstance(item, dict):
            label = item.get("label", label)
            item = item.get("bbox", item.get("bbox_2d", item.get("box")))
        if not (isinstance(item, (list, tuple)) and len(item) == 4 and all(_is_number(v) for v in item)):
            raise SampleError(f"box {i} is {item!r}; expected 4 finite numbers", kind="bad boxes")
        out.append((tuple(float(v) for v in item), None if label is None else str(label)))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
