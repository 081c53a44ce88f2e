"""The ``boxes:`` recipe transform: source boxes become the target model's convention and text form."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image
from tests.conftest import read_jsonl_dir, write_recipe

import mmdata
from mmdata.boxes import parse_boxes
from mmdata.profiles import get_profile


def make_source(tmp_path, boxes: list, size=(640, 480)):
    """A CSV (boxes as JSON text, as people export them) beside one image."""
    import csv

    Image.new("RGB", size, (20, 90, 160)).save(tmp_path / "a.png")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "bbox", "name"])
        for i, b in enumerate(boxes):
            writer.writerow(["a.png", json.dumps(b), f"thing {i}"])


def build(tmp_path, model, boxes_spec, **extra):
    spec = {"name": "g", "model": model, "source": {"type": "csv", "path": "d.csv"},
            "fields": {"image": "image", "answer": "boxes"}, "prompt": "Find it: {name}", "boxes": boxes_spec,
            "output": {"dir": str(tmp_path / f"out_{model}")}, **extra}
    return mmdata.build(str(write_recipe(tmp_path / f"{model}.yaml", spec)), num_proc=1)


@pytest.mark.parametrize("model", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"])
def test_pixel_boxes_round_trip_through_each_models_form(tmp_path, model):
    rng = random.Random(3)
    boxes = []
    for _ in range(20):
        x1, y1 = rng.uniform(0, 500), rng.uniform(0, 380)
        boxes.append([round(x1, 1), round(y1, 1), round(x1 + rng.uniform(5, 130), 1), round(y1 + rng.uniform(5, 90), 1)])
    make_source(tmp_path, boxes)
    result = build(tmp_path, model, {"column": "bbox", "label": "name"})
    assert result.written == 20
    profile = get_profile(model)
    for record, box in zip(read_jsonl_dir(result.datasets["g"]), boxes, strict=True):
        answer = record["messages"][-1]["content"]
        [(back, label)] = [(b, lbl) for b, lbl in parse_boxes(answer, 640, 480, profile)]
        assert label == f"thing {boxes.index(box)}"
        clamped = [min(max(v, 0), s) for v, s in zip(box, (640, 480, 640, 480), strict=True)]
        assert max(abs(a - b) for a, b in zip(back, clamped, strict=True)) <= 1.0, (answer, box)
    if model in ("qwen2_vl", "qwen3_vl", "internvl"):  # 0-1000 integers
        first = read_jsonl_dir(result.datasets["g"])[0]["messages"][-1]["content"]
        assert str(round(boxes[0][0] / 640 * 1000)) in first


def test_coco_xywh_and_relative_sources_and_a_converted_image(tmp_path):
    """COCO's [x, y, w, h] pixels of the original, on an image the build downsizes: Qwen2.5-VL gets absolute
    coordinates of the processor's resize of the *written* image."""
    make_source(tmp_path, [[64, 48, 320, 240]], size=(1280, 960))
    result = build(tmp_path, "qwen2_5_vl", {"column": "bbox", "layout": "xywh"},
                   images={"mode": "convert", "max_pixels": 320 * 240})
    answer = json.loads(read_jsonl_dir(result.datasets["g"])[0]["messages"][-1]["content"])
    profile = get_profile("qwen2_5_vl")
    w, h = profile.model_input_size(320, 240, 320 * 240)
    assert answer == [{"bbox_2d": [round(0.05 * w), round(0.05 * h), round(0.3 * w), round(0.3 * h)]}]


def test_bad_boxes_are_rejects_with_a_reason(tmp_path):
    make_source(tmp_path, [[1, 2, 3], "nope", [10, 10, 10, 10], [5, 5, 50, 50]])
    result = build(tmp_path, "qwen3_vl", {"column": "bbox"})
    rejects = [json.loads(x) for x in (result.output_dir / "rejects.jsonl").read_text().splitlines()]
    assert result.written == 1 and result.read == result.written + result.rejected
    assert {r["reason"] for r in rejects} == {"bad boxes"}
