"""Grounding boxes: conversions round-trip within their grid, clamp, and write each model's text form."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmdata.boxes import (
    BoxError,
    clamp_box,
    clean_box,
    convert_box,
    convert_point,
    format_box,
    format_boxes,
    format_point,
    is_degenerate,
    order_box,
    parse_boxes,
)
from mmdata.profiles import load_profile

QWEN2, QWEN25, QWEN3, INTERN, GEMMA = (load_profile(n) for n in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl",
                                                                    "gemma3"))


@st.composite
def image_and_box(draw, max_side=8000):
    w = draw(st.integers(min_value=2, max_value=max_side))
    h = draw(st.integers(min_value=2, max_value=max_side))
    xs = sorted(draw(st.lists(st.floats(0, w), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.floats(0, h), min_size=2, max_size=2)))
    return w, h, (xs[0], ys[0], xs[1], ys[1])


def close(a, b, tol):
    return all(abs(x - y) <= tol + 1e-9 for x, y in zip(a, b, strict=True))


def within(got, want, tol_x, tol_y):
    """Per axis: x coordinates within ``tol_x``, y within ``tol_y``."""
    return all(abs(a - b) <= (tol_x if i % 2 == 0 else tol_y) + 1e-9 for i, (a, b) in enumerate(zip(got, want,
                                                                                                     strict=True)))


@settings(max_examples=120, deadline=None)
@given(image_and_box())
def test_relative_round_trip_is_lossless(case):
    w, h, box = case
    rel = convert_box(box, "pixels", "relative", w, h)
    assert all(0 <= v <= 1 for v in rel)
    assert close(convert_box(rel, "relative", "pixels", w, h), box, 1e-6 * max(w, h))


@settings(max_examples=120, deadline=None)
@given(image_and_box())
def test_thousand_round_trip_moves_at_most_half_a_unit(case):
    w, h, box = case
    k = convert_box(box, "pixels", "thousand", w, h)
    assert all(isinstance(v, int) and 0 <= v <= 1000 for v in k)
    back = convert_box(k, "thousand", "pixels", w, h)
    assert within(back, box, w / 2000, h / 2000)
    if max(w, h) <= 2000:
        assert close(back, box, 1.0)


@settings(max_examples=100, deadline=None)
@given(image_and_box(), st.sampled_from([QWEN25, QWEN2, QWEN3]), st.sampled_from([None, 256 * 256, 1024 * 1024]))
def test_resized_round_trip_moves_at_most_half_a_resized_pixel(case, profile, max_pixels):
    w, h, box = case
    rw, rh = profile.model_input_size(w, h, max_pixels)
    r = convert_box(box, "pixels", "resized", w, h, profile, max_pixels)
    assert all(isinstance(v, int) for v in r) and r[2] <= rw and r[3] <= rh
    back = convert_box(r, "resized", "pixels", w, h, profile, max_pixels)
    assert within(back, box, w / rw / 2, h / rh / 2)
    if rw * 2 >= w and rh * 2 >= h:
        assert close(back, box, 1.0)


@settings(max_examples=100, deadline=None)
@given(image_and_box(max_side=2000))
def test_between_model_conventions_through_pixels(case):
    """Qwen2-VL's 0-1000 to Qwen2.5-VL's resized pixels and back stays within a pixel or two of the original."""
    w, h, box = case
    k = convert_box(box, "pixels", "thousand", w, h)
    r = convert_box(k, "thousand", "resized", w, h, QWEN25)
    back = convert_box(r, "resized", "pixels", w, h, QWEN25)
    rw, rh = QWEN25.model_input_size(w, h)
    assert within(back, box, w / 2000 + w / rw / 2, h / 2000 + h / rh / 2)


def test_resized_frame_is_what_transformers_smart_resize_gives():
    """Qwen2.5-VL's absolute coordinates live in the image its processor makes: LLaMA-Factory shrinks 1920x1080 to
    1024x576 (image_max_pixels 768*768), transformers' smart_resize snaps that to 1036x588."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(576, 1024, factor=28, min_pixels=3136, max_pixels=12845056)
    assert convert_box((0, 0, 1920, 1080), "pixels", "resized", 1920, 1080, QWEN25) == (0, 0, w, h) == (0, 0, 1036, 588)
    assert convert_point((960, 540), "pixels", "resized", 1920, 1080, QWEN25) == (518, 294)
    with pytest.raises(ValueError, match="profile"):
        convert_box((0, 0, 1, 1), "pixels", "resized", 10, 10)


def test_clamping_ordering_and_degenerate_boxes():
    assert order_box((50, 60, 10, 20)) == (10, 20, 50, 60)
    assert clamp_box((-5, -5, 120, 40), 100, 50) == (0, 0, 100, 40)
    assert convert_box((-10, 0, 300, 100), "pixels", "thousand", 200, 100) == (0, 0, 1000, 1000)
    assert is_degenerate((10, 10, 10, 30)) and not is_degenerate((10, 10, 11, 30))
    assert clean_box((150, 10, 180, 20), 100, 100) is None  # entirely outside
    assert clean_box((5, 5, 5, 50), 100, 100) is None
    assert clean_box((90, 10, 180, 20), 100, 100) == (90, 10, 100, 20)
    with pytest.raises(BoxError, match="no area"):
        format_box((10, 10, 10, 40), 100, 100, QWEN2)
    with pytest.raises(BoxError, match="no area"):
        format_box((200, 10, 300, 40), 100, 100, QWEN3)


def test_each_model_s_text_form():
    w, h, box = 640, 480, (64, 48, 320, 240)
    assert format_box(box, w, h, QWEN2, "cat") == (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>")
    assert format_box(box, w, h, QWEN2) == "<|box_start|>(100,100),(500,500)<|box_end|>"
    assert json.loads(format_box(box, w, h, QWEN3, "cat")) == {"bbox_2d": [100, 100, 500, 500], "label": "cat"}
    rw, rh = QWEN25.model_input_size(w, h)  # 644x476 after LLaMA-Factory's 768*768 bound and the 28-px grid
    assert (rw, rh) == (644, 476)
    assert json.loads(format_box(box, w, h, QWEN25, "猫")) == {"bbox_2d": [64, 48, 322, 238], "label": "猫"}
    assert "猫" in format_box(box, w, h, QWEN25, "猫")  # not escaped
    assert format_box(box, w, h, INTERN, "cat") == "<ref>cat</ref><box>[[100, 100, 500, 500]]</box>"
    assert json.loads(format_point((320, 240), w, h, QWEN3, "eye")) == {"point_2d": [500, 500], "label": "eye"}
    with pytest.raises(BoxError, match="no documented grounding"):
        format_box(box, w, h, GEMMA)
    with pytest.raises(BoxError, match="point"):
        format_point((1, 1), w, h, QWEN2)


@settings(max_examples=60, deadline=None)
@given(st.lists(image_and_box(max_side=3000), min_size=1, max_size=4),
       st.sampled_from([QWEN2, QWEN25, QWEN3, INTERN]))
def test_parse_reads_back_what_format_writes(cases, profile):
    w, h = cases[0][0], cases[0][1]
    items = [(clean_box(b, w, h), f"obj {i}") for i, (_, _, b) in enumerate(cases)]
    items = [(b, label) for b, label in items if b is not None]
    text = format_boxes(items, w, h, profile)
    parsed = parse_boxes(f"Sure! ```json\n{text}\n```" if text.startswith("[") else f"Here: {text}.", w, h, profile)
    assert [label for _, label in parsed] == [label for _, label in items]
    rw, rh = profile.model_input_size(w, h) if profile is QWEN25 else (1000, 1000)
    for (got, _), (want, _) in zip(parsed, items, strict=True):
        assert within(got, want, w / rw / 2 + 1e-6, h / rh / 2 + 1e-6)


def test_parse_ignores_text_without_boxes():
    assert parse_boxes("no boxes here", 100, 100, QWEN3) == []
    assert parse_boxes("<|box_start|>(1,2)<|box_end|>", 100, 100, QWEN2) == []
    assert parse_boxes('{"bbox_2d": [1, 2, 3]}', 100, 100, QWEN25) == []
