"""Model profiles count what the real processors and LLaMA-Factory produce.

Every expected number here comes from a real implementation, never from mmdata: transformers' image/video
processors built offline from the published ``preprocessor_config.json`` values of each model (written inline
below), and LLaMA-Factory 0.9.5's resize rules, transcribed in :func:`lf_plugin_size` from ``data/mm_plugin.py``.
When LLaMA-Factory's source is at hand (``MMDATA_LF_SRC=/path/containing/llamafactory``, or the conformance venv in
``.cache/lf-venv``) the tests marked ``lf`` also run its own ``process_messages`` and ``encode_multiturn``.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import json
import math
import os
import random
import sys
import types
from pathlib import Path

import pytest
from PIL import Image
from tests.conftest import REPO

from mmdata import tokens
from mmdata.profiles import (
    DEFAULT_PROFILE,
    PROFILES,
    LfArgs,
    ProfileError,
    count_with_specials,
    load_profile,
    profile_from_folder,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")

# ------------------------------------------------------------------------------ the real models' published configs

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]
MODELS = {
    "Qwen2-VL-2B-Instruct": {
        "config.json": {"model_type": "qwen2_vl", "vision_config": {
            "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}},
        "preprocessor_config.json": {
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor"},
    },
    "Qwen2.5-VL-3B-Instruct": {
        "config.json": {"model_type": "qwen2_5_vl", "vision_config": {
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}},
        "preprocessor_config.json": {
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"},
    },
    "Qwen3-VL-2B-Instruct": {
        "config.json": {"model_type": "qwen3_vl", "vision_config": {
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}},
        "preprocessor_config.json": {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": HALF, "image_std": HALF, "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast"},
        "video_preprocessor_config.json": {
            "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": HALF, "image_std": HALF, "processor_class": "Qwen3VLProcessor",
            "video_processor_type": "Qwen3VLVideoProcessor"},
    },
    "gemma-3-4b-it": {
        "config.json": {"model_type": "gemma3", "mm_tokens_per_image": 256, "boi_token_index": 255999,
                        "eoi_token_index": 256000, "image_token_index": 262144,
                        "vision_config": {"model_type": "siglip_vision_model", "image_size": 896, "patch_size": 14}},
        "preprocessor_config.json": {
            "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
            "do_resize": True, "image_mean": HALF, "image_processor_type": "Gemma3ImageProcessor",
            "image_seq_length": 256, "image_std": HALF, "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
            "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
            "size": {"height": 896, "width": 896}},
        "processor_config.json": {"image_seq_length": 256, "processor_class": "Gemma3Processor"},
    },
    "InternVL3-1B-hf": {
        "config.json": {"model_type": "internvl", "downsample_ratio": 0.5, "vision_config": {
            "model_type": "internvl_vision", "image_size": [448, 448], "patch_size": [14, 14]}},
        "preprocessor_config.json": {
            "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "image_processor_type": "GotOcr2ImageProcessorFast", "max_patches": 12, "min_patches": 1,
            "processor_class": "InternVLProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": 448, "width": 448}},
        "processor_config.json": {"image_seq_length": 256, "processor_class": "InternVLProcessor"},
    },
}
# Gemma3Processor.__init__'s full_image_sequence for 256 soft tokens (models/gemma3/processing_gemma3.py).
GEMMA3_FULL_IMAGE_SEQUENCE = "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
QWEN_MODELS = {"qwen2_vl": "Qwen2-VL-2B-Instruct", "qwen2_5_vl": "Qwen2.5-VL-3B-Instruct",
               "qwen3_vl_nothink": "Qwen3-VL-2B-Instruct"}


def model_folder(root: Path, model: str, **edits: dict) -> Path:
    """A model folder with the real model's config files (``edits`` replace whole files), no weights."""
    folder = root / model
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in {**MODELS[model], **edits}.items():
        (folder / name).write_text(json.dumps(content) if not isinstance(content, str) else content)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {model: model_folder(root, model) for model in MODELS}


# ------------------------------------------------------------------- LLaMA-Factory's resize, transcribed from source


def lf_plugin_size(width, height, max_pixels, min_pixels, qwen):
    """``MMPluginMixin._preprocess_image`` then, for Qwen, ``Qwen2VLPlugin._preprocess_image`` (mm_plugin.py,
    LLaMA-Factory 0.9.5), written out on sizes: each ``image.resize((width, height))`` becomes an assignment."""
    if (width * height) > max_pixels:
        resize_factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * resize_factor), int(height * resize_factor)
    if min(width, height) == 0:
        return width, height  # PIL raises here: LLaMA-Factory cannot train on this image
    if (width * height) < min_pixels:
        resize_factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * resize_factor), int(height * resize_factor)
    if qwen:
        if min(width, height) < 28:
            width, height = max(width, 28), max(height, 28)
        if width / height > 200:
            width, height = height * 180, height
        if height / width > 200:
            width, height = width, width * 180
    return width, height


def random_sizes(n, seed, max_side=6000):
    """Ordinary photos, thin strips past the processor's 200:1 limit, tiny and huge images."""
    rng = random.Random(seed)
    sizes = [(1, 1), (3, 3), (1, 1000), (1000, 1), (27, 2000), (28, 28), (5000, 10), (10, 5000), (20000, 15000),
             (30000, 40), (224, 224), (1920, 1080)]
    while len(sizes) < n:
        shape = rng.random()
        if shape < 0.6:
            sizes.append((rng.randint(1, max_side), rng.randint(1, max_side)))
        elif shape < 0.85:  # extreme aspect ratios, both sides of 200:1
            short = rng.randint(1, 60)
            sizes.append(rng.choice([(short, short * rng.randint(50, 600)), (short * rng.randint(50, 600), short)]))
        else:
            sizes.append((rng.randint(1, 40), rng.randint(1, 40)))
    return sizes


def qwen_tokens_from_processor(processor, sizes, merge_size):
    """Run the real processor on black images of the given sizes; tokens from ``image_grid_thw``."""
    grids = []
    for i in range(0, len(sizes), 40):
        images = [Image.new("RGB", size) for size in sizes[i:i + 40]]
        grids += processor(images, return_tensors="pt")["image_grid_thw"].tolist()
    return [(t * h * w) // merge_size ** 2 for t, h, w in grids], grids


# ------------------------------------------------------------------------------------------------ tests: images


def test_qwen2_vl_profile_reproduces_today_s_token_model():
    profile = load_profile(DEFAULT_PROFILE)
    assert profile.name == "qwen2_vl" and profile.lf_template == "qwen2_vl"
    for max_pixels, min_pixels in [(768 * 768, 32 * 32), (256 * 256, 32 * 32), (1024 * 1024, 64 * 64),
                                   (4096 * 4096, 28 * 28)]:
        for w, h in random_sizes(400, seed=max_pixels, max_side=9000):
            fails = min(lf_plugin_size(w, h, max_pixels, min_pixels, qwen=False)) == 0  # LF crashes (PIL, 0 px)
            assert (profile.lf_image_problem(w, h, max_pixels) is not None) == fails
            assert profile.image_tokens(w, h, max_pixels, min_pixels) == tokens.image_tokens(w, h, max_pixels,
                                                                                             min_pixels), (w, h)
            assert profile.lf_image_size(w, h, max_pixels, min_pixels) == tokens.lf_image_size(w, h, max_pixels,
                                                                                               min_pixels)
    assert min(lf_plugin_size(2_000_000, 1, 768 * 768, 32 * 32, qwen=True)) == 0
    assert "too thin" in profile.lf_image_problem(2_000_000, 1)
    assert profile.image_tokens(2_000_000, 1) == tokens.image_tokens(2_000_000, 1)


@pytest.mark.parametrize("name", sorted(QWEN_MODELS))
def test_qwen_image_tokens_equal_the_real_processor(name, folders):
    """LLaMA-Factory's resize (transcribed), then the real image processor, then ``grid.prod() // merge**2``: real
    calls on forty sizes, the processor's own patch count (``get_number_of_image_patches``) on a thousand."""
    from transformers import AutoImageProcessor

    folder = folders[QWEN_MODELS[name]]
    processor = AutoImageProcessor.from_pretrained(folder)
    profile = load_profile(folder)
    assert profile.name == name
    cases = []
    for lf_max, lf_min in [(768 * 768, 32 * 32), (128 * 128, 32 * 32), (300 * 200, 100 * 100)]:
        for w, h in random_sizes(350, seed=lf_max % 1000 + len(name)):
            lf_size = lf_plugin_size(w, h, lf_max, lf_min, qwen=True)
            if min(lf_size) > 0:
                cases.append(((w, h), lf_max, lf_min, lf_size))
    real = cases[:15] + cases[350:360] + cases[700:715]
    expected, grids = qwen_tokens_from_processor(processor, [c[3] for c in real], processor.merge_size)
    for ((w, h), lf_max, lf_min, lf_size), want, (_, gh, gw) in zip(real, expected, grids, strict=True):
        assert profile.lf_image_size(w, h, lf_max, lf_min) == lf_size
        assert profile.image_tokens(w, h, lf_max, lf_min) == want, (w, h, lf_max)
        assert profile.model_input_size(w, h, lf_max, lf_min) == (gw * processor.patch_size, gh * processor.patch_size)
    for (w, h), lf_max, lf_min, (lw, lh) in cases:
        want = processor.get_number_of_image_patches(lh, lw, {}) // processor.merge_size ** 2
        assert profile.image_tokens(w, h, lf_max, lf_min) == want, (w, h, lf_max)


def test_qwen_pil_backend_and_processor_ceiling_agree(folders):
    """The PIL backend (transformers' other Qwen2-VL processor) and images big enough that the processor's own
    ``max_pixels`` binds, not LLaMA-Factory's (``image_max_pixels`` raised to 4096**2)."""
    from transformers import Qwen2VLImageProcessorPil

    for name, model in QWEN_MODELS.items():
        cfg = {k: v for k, v in MODELS[model]["preprocessor_config.json"].items() if not k.endswith("_type")
               and k != "processor_class"}
        pil = Qwen2VLImageProcessorPil(**cfg)
        profile = load_profile(folders[model])
        sizes = random_sizes(12, seed=7)
        lf_sizes = [lf_plugin_size(w, h, 768 * 768, 32 * 32, qwen=True) for w, h in sizes]
        want, _ = qwen_tokens_from_processor(pil, lf_sizes, pil.merge_size)
        assert [profile.image_tokens(w, h) for w, h in sizes] == want
        # The processor's ceiling: its own patch count (the helper vLLM relies on) over big LF-resized sizes, and
        # one real call on a 13-megapixel image.
        big = [(5000, 4000), (4096, 4096), (12000, 3000), (3900, 3300)]
        for w, h in big:
            lw, lh = lf_plugin_size(w, h, 4096 * 4096, 32 * 32, qwen=True)
            patches = pil.get_number_of_image_patches(lh, lw, {})
            assert profile.image_tokens(w, h, max_pixels=4096 * 4096) == patches // pil.merge_size ** 2, (name, w, h)


def test_folder_pixel_values_win_like_the_processor_reads_them(tmp_path):
    """``min_pixels``/``max_pixels`` override ``size`` (``Qwen2VLImageProcessor.__init__``); a folder's custom bound
    changes the count exactly as it changes the processor's output."""
    from transformers import AutoImageProcessor

    base = MODELS["Qwen2.5-VL-3B-Instruct"]["preprocessor_config.json"]
    variants = {
        "small-max": {**base, "max_pixels": 256 * 28 * 28},
        "size-only": {k: v for k, v in base.items() if k not in ("min_pixels", "max_pixels")}
        | {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 512 * 28 * 28}},
        "both": {**base, "size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 64 * 28 * 28,
                 "max_pixels": 300 * 28 * 28},
    }
    sizes = random_sizes(15, seed=3)
    for label, cfg in variants.items():
        folder = model_folder(tmp_path / label, "Qwen2.5-VL-3B-Instruct", **{"preprocessor_config.json": cfg})
        processor = AutoImageProcessor.from_pretrained(folder)
        profile = load_profile(folder)
        lf_sizes = [lf_plugin_size(w, h, 1024 * 1024, 32 * 32, qwen=True) for w, h in sizes]
        want, _ = qwen_tokens_from_processor(processor, lf_sizes, 2)
        assert [profile.image_tokens(w, h, max_pixels=1024 * 1024) for w, h in sizes] == want, label
    assert load_profile(tmp_path / "small-max" / "Qwen2.5-VL-3B-Instruct").image.max_pixels == 256 * 28 * 28


def test_qwen_video_grids_equal_the_real_video_processors(folders):
    """Frames shrunk as LLaMA-Factory shrinks video frames, then Qwen2-VL's and Qwen3-VL's video processors."""
    import numpy as np
    from transformers import AutoVideoProcessor

    cases = [(640, 360, 4), (1920, 1080, 6), (30, 500, 2), (100, 100, 8), (4000, 30, 4), (256, 256, 5)]
    for model in ("Qwen2-VL-2B-Instruct", "Qwen3-VL-2B-Instruct"):
        processor = AutoVideoProcessor.from_pretrained(folders[model])
        profile = load_profile(folders[model])
        for w, h, frames in cases:
            lw, lh = lf_plugin_size(w, h, 256 * 256, 16 * 16, qwen=True)
            frames_even = frames + frames % 2  # Qwen2VLPlugin._regularize_videos
            clip = np.zeros((frames_even, lh, lw, 3), dtype=np.uint8)
            out = processor(videos=[clip], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
            t, gh, gw = out["video_grid_thw"][0].tolist()
            assert profile.video.grid(w, h, frames, profile.lf) == (t, gh, gw), (model, w, h, frames)
            assert profile.video_tokens(w, h, frames) == t * gh * gw // processor.merge_size ** 2


def test_lf_video_sampling_is_fps_capped_and_even():
    profile = load_profile("qwen2_vl")
    assert profile.video_frames(10.0, 300) == 20  # 2 fps
    assert profile.video_frames(3.7, 300) == 8  # floor(7.4) = 7, padded to even
    assert profile.video_frames(600.0, 18000) == 128  # video_maxlen
    assert profile.video_frames(10.0, 5) == 6  # never more than the clip has, then even
    with pytest.raises(ProfileError, match="video"):
        load_profile("gemma3").video_tokens(100, 100, 4)


def test_gemma3_fixed_tokens_and_pan_and_scan_equal_the_real_processor(folders):
    from tokenizers import Tokenizer, models
    from transformers import AutoImageProcessor, Gemma3Processor, PreTrainedTokenizerFast

    folder = folders["gemma-3-4b-it"]
    processor = AutoImageProcessor.from_pretrained(folder)
    profile = load_profile(folder)
    assert profile.name == "gemma3" and profile.lf_template == "gemma3"
    sizes = [(1200, 300), (300, 1200), (2000, 500), (640, 480), (90, 1000), (3000, 1000), (1000, 810), (1000, 830),
             (1, 1), (10, 5000), (20000, 15000)]
    cases = [(s, lf_plugin_size(*s, 768 * 768, 32 * 32, qwen=False)) for s in sizes]
    # LLaMA-Factory's pan-and-scan settings (Gemma3Plugin via MMPluginMixin._get_mm_inputs)
    out = processor([Image.new("RGB", lf) for _, lf in cases], do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
                    pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2, return_tensors="pt")
    pan = profile.with_lf_args(image_do_pan_and_scan=True)
    crops = out["num_crops"].tolist()
    assert sum(crops) > 5 and crops.count(0) >= 3  # the sizes do exercise pan-and-scan, both ways
    for ((w, h), _), n in zip(cases, crops, strict=True):
        assert pan.image_tokens(w, h) == 256 * (1 + n), (w, h)
        assert profile.image_tokens(w, h) == 256
    assert tuple(out["pixel_values"].shape[-2:]) == profile.model_input_size(640, 480)
    # The text LLaMA-Factory writes for <image> is the processor's full_image_sequence.
    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    full = Gemma3Processor(image_processor=processor, tokenizer=tok, image_seq_length=256).full_image_sequence
    rendered = profile.render([("user", "<image>"), ("assistant", "x")], [(300, 300)], expand=True)
    assert full in rendered[1] and rendered[0] == "<bos>"
    assert profile.image_total_tokens(300, 300) == 256 + 2 + 2  # soft tokens, boi/eoi, two "\n\n"


@pytest.mark.parametrize("crop", [False, True])
def test_internvl_tiles_equal_the_real_processor(folders, tmp_path, crop):
    """Real calls on six sizes (the canvas resize is slow on CPU), then the processor's own tile count
    (``get_number_of_image_patches``, used by vLLM) over hundreds."""
    from transformers import AutoImageProcessor

    edits = {"preprocessor_config.json": {**MODELS["InternVL3-1B-hf"]["preprocessor_config.json"],
                                          "crop_to_patches": crop}}
    folder = model_folder(tmp_path, "InternVL3-1B-hf", **edits)
    processor = AutoImageProcessor.from_pretrained(folder)
    profile = load_profile(folder)
    assert profile.name == "internvl" and profile.image.tokens_per_tile == 256
    sizes = [s for s in random_sizes(300, seed=5, max_side=4000) if min(lf_plugin_size(*s, 768 * 768, 1024, False))]
    lf_sizes = [lf_plugin_size(w, h, 768 * 768, 32 * 32, qwen=False) for w, h in sizes]
    real = [0, 2, 6, 20, 40, 41]
    got = processor([Image.new("RGB", lf_sizes[i]) for i in real], return_tensors="pt")["num_patches"].tolist()
    assert [profile.image_tokens(*sizes[i]) for i in real] == [256 * n for n in got]
    helper = [processor.get_number_of_image_patches(h, w, {}) for w, h in lf_sizes]
    assert [profile.image_tokens(w, h) for w, h in sizes] == [256 * n for n in helper]
    # LLaMA-Factory's own crop_to_patches=True forces tiling with max 12 tiles, whatever the folder says.
    forced_kwargs = {"crop_to_patches": True, "max_patches": 12, "min_patches": 1}
    forced = processor([Image.new("RGB", lf_sizes[i]) for i in real], return_tensors="pt",
                       **forced_kwargs)["num_patches"].tolist()
    lf_crop = profile.with_lf_args(crop_to_patches=True)
    assert [lf_crop.image_tokens(*sizes[i]) for i in real] == [256 * n for n in forced]
    helper = [processor.get_number_of_image_patches(h, w, forced_kwargs) for w, h in lf_sizes]
    assert [lf_crop.image_tokens(w, h) for w, h in sizes] == [256 * n for n in helper]
    assert max(forced) > 1 and len(set(helper)) > 4


# --------------------------------------------------------------------------------------------- tests: templates


def test_qwen2_vl_record_estimate_matches_tokens_record_tokens():
    rng = random.Random(2)
    profile = load_profile("qwen2_vl")
    words = ["cat", "LaTeX", "\\frac{a}{b}", "图像", "2024", "  ", "\n", "描述一下", "What is this?"]
    for _ in range(300):
        n_pairs = rng.randint(1, 3)
        turns = []
        if rng.random() < 0.4:
            turns.append(("system", " ".join(rng.choices(words, k=rng.randint(1, 5)))))
        images = []
        for _ in range(n_pairs):
            text = " ".join(rng.choices(words, k=rng.randint(0, 6)))
            k = rng.randint(0, 2)
            images += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(k)]
            turns += [("user", "<image>" * k + text), ("assistant", " ".join(rng.choices(words, k=rng.randint(1, 6))))]
        assert profile.record_tokens(turns, images) == tokens.record_tokens(turns, images)


def test_templates_write_what_llamafactory_0_9_5_writes():
    """Expectations read off ``data/template.py``: qwen2_vl has a default system prompt, qwen3_vl none; the reasoning
    template puts an empty thought before answers without one (after the prompt when thinking is off)."""
    turns = [("user", "<image>Hi"), ("assistant", "Hello")]
    q2 = load_profile("qwen2_vl").render(turns, [(56, 56)])
    assert q2 == ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                  "<|im_start|>user\n<|vision_start|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n",
                  "Hello<|im_end|>\n"]
    think = load_profile("qwen3_vl")
    user = "<|im_start|>user\n<|vision_start|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    assert think.render(turns, [(56, 56)]) == [user, "<think>\n\n</think>\n\n", "Hello<|im_end|>\n"]
    assert think.with_lf_args(enable_thinking=False).render(turns, [(56, 56)])[1] == "<think>\n\n</think>\n\n"
    reasoned = [("user", "Q"), ("assistant", "<think>\nhmm\n</think>\n\nA")]
    assert think.render(reasoned)[-1] == "<think>\nhmm\n</think>\n\nA<|im_end|>\n"
    assert think.with_lf_args(enable_thinking=False).render(reasoned)[-2:] == ["<think>\n\n</think>\n\n", "A<|im_end|>\n"]
    assert load_profile("qwen3_vl_nothink").render(turns, [(56, 56)]) == [user, "Hello<|im_end|>\n"]
    gemma = load_profile("gemma3").render([("system", "S"), ("user", "Q"), ("assistant", "A")])
    assert gemma == ["<bos>", "<start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\n", "A<end_of_turn>\n"]
    with pytest.raises(ValueError, match="number of images"):
        load_profile("qwen2_vl").render([("user", "<image><image>x"), ("assistant", "y")], [(10, 10)])


def test_template_overhead_counts():
    assert load_profile("qwen2_vl").template_overhead(["user", "assistant"]) == tokens.DEFAULT_SYSTEM_TOKENS + 3 * 5
    assert load_profile("qwen2_vl").template_overhead(["user", "assistant"], has_system=True) == 5 + 10
    assert load_profile("qwen3_vl_nothink").template_overhead(["user", "assistant"] * 2) == 20
    assert load_profile("qwen3_vl").template_overhead(["user", "assistant"] * 2) == 20 + 2 * 4
    assert load_profile("gemma3").template_overhead(["user", "assistant"]) == 1 + 8 + 2


def test_exact_count_uses_the_rendered_strings():
    """With a tokenizer, the count is the sum over LLaMA-Factory's strings plus the pads: here a 'tokenizer' that
    counts characters makes every string visible in the total."""
    profile = load_profile("qwen3_vl")
    turns = [("user", "<image>Describe"), ("assistant", "A cat.")]
    strings = profile.render(turns, [(400, 300)])
    total = profile.record_tokens(turns, [(400, 300)], text=len, exact=True)
    assert total == sum(map(len, strings)) + profile.image_tokens(400, 300)
    assert count_with_specials("<|im_start|>user\nab<|im_end|>", profile.specials, len) == 1 + 7 + 1


def test_lf_args_change_counts():
    q3 = load_profile("qwen3_vl_nothink")
    assert q3.with_lf_args(image_max_pixels=256 * 256).image_tokens(1920, 1080) < q3.image_tokens(1920, 1080)
    assert q3.with_lf_args(**{"image_max_pixels": 512 * 512, "cutoff_len": 4096}).lf.image_max_pixels == 512 * 512
    assert LfArgs.from_config({"template": "qwen3_vl", "enable_thinking": False}).enable_thinking is False
    custom = load_profile("qwen2_vl").with_lf_args(default_system="Be terse.")
    assert custom.render([("user", "q"), ("assistant", "a")])[0] == "<|im_start|>system\nBe terse.<|im_end|>\n"


# ------------------------------------------------------------------------------------------------ tests: folders


def test_unknown_names_suggest_and_list_known_profiles():
    with pytest.raises(ProfileError, match=r"did you mean 'qwen2_5_vl'.*qwen3_vl_nothink"):
        load_profile("qwen2.5vl")
    with pytest.raises(ProfileError, match="never downloads"):
        load_profile("someorg/some-vlm-7b")  # a hub id that names a known family counts as it (test below)
    assert load_profile(None).name == "qwen2_vl" and load_profile("Qwen2.5_VL").name == "qwen2_5_vl"
    assert set(PROFILES) >= {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_nothink", "gemma3", "internvl"}


def test_folder_family_thinking_and_processor_config(tmp_path):
    thinking = model_folder(tmp_path / "t", "Qwen3-VL-2B-Instruct",
                            **{"chat_template.jinja": "{{- '<|im_start|>assistant\\n<think>\\n' }}"})
    assert load_profile(thinking).name == "qwen3_vl"
    assert load_profile(model_folder(tmp_path / "i", "Qwen3-VL-2B-Instruct")).name == "qwen3_vl_nothink"
    # transformers 5 saves one nested processor_config.json; it wins over preprocessor_config.json.
    nested = tmp_path / "nested"
    nested.mkdir()
    image = {**MODELS["Qwen3-VL-2B-Instruct"]["preprocessor_config.json"], "size": {"shortest_edge": 1024,
                                                                                   "longest_edge": 1024 * 1024}}
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": image, "video_processor": {
        "size": {"shortest_edge": 4096, "longest_edge": 8192 * 1024}}, "processor_class": "Qwen3VLProcessor"}))
    profile = load_profile(nested)
    assert profile.family == "Qwen3-VL" and profile.image.min_pixels == 1024 and profile.video.max_pixels == 8192 * 1024
    assert profile.origin == str(nested)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ProfileError, match="model_type 'llava'.*qwen2_5_vl"):
        load_profile(odd)
    assert profile_from_folder(model_folder(tmp_path / "g", "gemma-3-4b-it")).image.tokens_per_image == 256


# ------------------------------------------------------------------------- tests: LLaMA-Factory's own code (optional)


def _lf_source() -> Path | None:
    candidates = [os.environ.get("MMDATA_LF_SRC")] + sorted(str(p) for p in (REPO / ".cache/lf-venv/lib").glob(
        "python3*/site-packages"))
    for c in candidates:
        if c and (Path(c) / "llamafactory" / "data" / "template.py").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def lf():
    """LLaMA-Factory's ``data.template`` and ``data.mm_plugin`` modules, imported without running its package
    ``__init__`` files (they pull in training-only dependencies); torchaudio, imported at module level for audio
    only, is stubbed when missing."""
    src = _lf_source()
    if src is None:
        pytest.skip("LLaMA-Factory source not found (set MMDATA_LF_SRC to a folder containing llamafactory/)")
    saved = dict(sys.modules)
    for name, path in [("llamafactory", src / "llamafactory"), ("llamafactory.data", src / "llamafactory/data")]:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    import llamafactory.data.mm_plugin as mm_plugin
    import llamafactory.data.template as template

    yield types.SimpleNamespace(template=template, mm_plugin=mm_plugin)
    for name in set(sys.modules) - set(saved):
        if name.startswith(("llamafactory", "torchaudio")):
            del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """The repo's tiny Qwen2 tokenizer plus the other templates' special tokens; the Gemma one has a bos token
    (gemma3's ``{"bos_token"}`` prefix), the Qwen one none, like the real ones."""
    from transformers import AutoTokenizer

    from mmdata.train.tiny import write_tokenizer_and_processor

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer_and_processor(folder)
    made = {}
    for kind in ("qwen", "gemma"):
        tok = AutoTokenizer.from_pretrained(str(folder))
        tok.add_tokens(["<think>", "</think>", "<bos>", "<start_of_turn>", "<end_of_turn>"], special_tokens=True)
        if kind == "gemma":
            tok.bos_token = "<bos>"
        made[kind] = tok
    return made


@pytest.mark.parametrize("model", ["Qwen2-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen3-VL-2B-Instruct"])
def test_lf_process_messages_writes_the_counted_pads(lf, folders, model):
    """LLaMA-Factory's own plugin (its real ``_preprocess_image`` on PIL images) with the real processor."""
    from transformers import AutoImageProcessor, AutoVideoProcessor

    profile = load_profile(folders[model])
    plugin_name = "qwen3_vl" if profile.family == "Qwen3-VL" else "qwen2_vl"
    plugin = lf.mm_plugin.get_mm_plugin(plugin_name, image_token="<|image_pad|>", video_token="<|video_pad|>")
    for lf_max, lf_min in [(768 * 768, 32 * 32), (160 * 160, 64 * 64)]:
        processor = types.SimpleNamespace(
            image_processor=AutoImageProcessor.from_pretrained(folders[model]),
            video_processor=AutoVideoProcessor.from_pretrained(folders[model]),
            image_max_pixels=lf_max, image_min_pixels=lf_min, model_input_names=[])
        sizes = [s for s in random_sizes(20, seed=lf_max % 97, max_side=2500) if max(s) < 20000]
        sizes = [s for s in sizes if min(lf_plugin_size(*s, lf_max, lf_min, qwen=False)) > 0]
        messages = [{"role": "user", "content": "<image>" * len(sizes) + "hi"}, {"role": "assistant", "content": "x"}]
        images = [Image.new("RGB", s) for s in sizes]
        out = plugin.process_messages(messages, images, [], [], processor)
        runs = out[0]["content"].split("<|vision_end|>")[:-1]
        got = [run.count("<|image_pad|>") for run in runs]
        assert got == [profile.image_tokens(w, h, lf_max, lf_min) for w, h in sizes]


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "gemma3", "internvl"])
def test_lf_encode_multiturn_equals_rendered_strings(lf, tiny_tokenizers, name):
    """Token ids of :meth:`render` equal LLaMA-Factory's ``encode_multiturn`` over varied conversations."""
    profile = load_profile(name)
    tiny_tokenizer = tiny_tokenizers["gemma" if name == "gemma3" else "qwen"]
    assert (tiny_tokenizer.bos_token_id is None) == (name != "gemma3")
    rng = random.Random(1)
    answers = ["A cat.", "<think>\nlet me see\n</think>\n\nA cat.", "plain", "</think>only closing", ""]
    systems = [None, "Be brief.", ""]
    for case in range(40):
        n = rng.randint(1, 3)
        turns = [x for _ in range(n) for x in (("user", rng.choice(["Describe", "What is it?", "图"])),
                                              ("assistant", rng.choice(answers)))]
        system = rng.choice(systems)
        thinking = rng.choice([True, False, None])
        mask_history = rng.random() < 0.3
        variant = profile.with_lf_args(enable_thinking=thinking, mask_history=mask_history)
        mine = [i for s in variant.render(turns, system=system) for i in tiny_tokenizer.encode(s, add_special_tokens=False)]
        template = dataclasses.replace(lf.template.TEMPLATES[profile.lf_template], enable_thinking=thinking)
        messages = [{"role": r, "content": c} for r, c in turns]
        pairs = template.encode_multiturn(tiny_tokenizer, messages, system, None,
                                          mask_history and not template.preserve_thinking)
        theirs = [i for source, target in pairs for i in source + target]
        assert mine == theirs, (name, case, turns, system, thinking, mask_history)
        assert variant.record_tokens(turns, system=system, exact=True,
                                     text=lambda s: len(tiny_tokenizer.encode(s, add_special_tokens=False))) == len(theirs)


def test_lf_gemma3_and_internvl_plugins_write_the_counted_tokens(lf, folders):
    from transformers import AutoImageProcessor

    gemma = load_profile(folders["gemma-3-4b-it"])
    ip = AutoImageProcessor.from_pretrained(folders["gemma-3-4b-it"])
    sizes = [(1200, 300), (300, 300), (2000, 500), (640, 480), (90, 1000)]
    plugin = lf.mm_plugin.get_mm_plugin("gemma3", image_token="<image_soft_token>")

    def nested_num_crops(images, **kwargs):
        """LLaMA-Factory 0.9.5 indexes ``num_crops[0][i]``: the nested layout of the transformers it pins (<= 5.6);
        this transformers returns a flat list."""
        out = ip(images, **kwargs)
        out["num_crops"] = [out["num_crops"].tolist()]
        return out

    for pan in (False, True):
        proc = types.SimpleNamespace(image_processor=nested_num_crops, boi_token="<start_of_image>",
                                     full_image_sequence=GEMMA3_FULL_IMAGE_SEQUENCE, image_do_pan_and_scan=pan,
                                     image_max_pixels=768 * 768, image_min_pixels=32 * 32)
        variant = gemma.with_lf_args(image_do_pan_and_scan=pan)
        for w, h in sizes:
            out = plugin.process_messages([{"role": "user", "content": "<image>q"}], [Image.new("RGB", (w, h))], [],
                                          [], proc)
            assert out[0]["content"] == variant.substitute_media(["<image>q"], [(w, h)], expand=True)[0]
    intern = load_profile(folders["InternVL3-1B-hf"])
    ip = AutoImageProcessor.from_pretrained(folders["InternVL3-1B-hf"])
    plugin = lf.mm_plugin.get_mm_plugin("intern_vl", image_token="<image>", video_token="<video>")
    for crop in (False, True):
        proc = types.SimpleNamespace(image_processor=ip, image_seq_length=256, crop_to_patches=crop,
                                     image_max_pixels=768 * 768, image_min_pixels=32 * 32)
        variant = intern.with_lf_args(crop_to_patches=crop)
        for w, h in sizes:
            out = plugin.process_messages([{"role": "user", "content": "<image>"}], [Image.new("RGB", (w, h))], [],
                                          [], proc)
            assert out[0]["content"] == variant.substitute_media(["<image>"], [(w, h)], expand=True)[0]


@pytest.mark.parametrize("model", ["Qwen2-VL-2B-Instruct", "Qwen2.5-VL-3B-Instruct", "Qwen3-VL-2B-Instruct"])
def test_validate_per_record_totals_equal_llamafactory_on_a_build(lf, folders, tiny_tokenizers, tmp_path, model):
    """End to end: ``mmdata validate BUILD --model DIR --tokenizer TOK --record-tokens F`` on an mmdata build gives,
    for every record, the number of ids LLaMA-Factory's own pipeline makes of it (its plugin expands the images with
    the real processor, its template encodes the conversation)."""
    from transformers import AutoImageProcessor, AutoVideoProcessor

    import mmdata
    from mmdata.check import validate

    rng = random.Random(7)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(24):
        sizes = [(rng.randint(20, 1800), rng.randint(20, 1800)) for _ in range(rng.choice([0, 1, 1, 2]))]
        for k, size in enumerate(sizes):
            Image.new("RGB", size, (i * 9 % 255, k * 60, 90)).save(tmp_path / "imgs" / f"{i}_{k}.png")
        messages = ([{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []) + [
            {"role": "user", "content": "<image>" * len(sizes) + rng.choice(["What is shown?", "描述这张图", "x^2?"])},
            {"role": "assistant", "content": rng.choice(["A cat.", "两只猫", "\\frac{a}{b}", "<think>\nhm\n</think>\n\nok"])}]
        rows.append({"messages": messages, "images": [f"imgs/{i}_{k}.png" for k in range(len(sizes))]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    (tmp_path / "r.yaml").write_text(json.dumps({"name": "e2e", "source": {"type": "jsonl", "path": "d.jsonl"},
                                                  "output": {"dir": str(tmp_path / "out")}}))
    result = mmdata.build(str(tmp_path / "r.yaml"), num_proc=1)
    assert result.written == 24
    tok = tiny_tokenizers["qwen"]
    validate(result.output_dir, model=folders[model], tokenizer=tok, record_tokens=tmp_path / "t.jsonl")
    mine = [json.loads(line)["tokens"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]

    profile = load_profile(folders[model])
    plugin = lf.mm_plugin.get_mm_plugin("qwen3_vl" if profile.family == "Qwen3-VL" else "qwen2_vl",
                                        image_token="<|image_pad|>", video_token="<|video_pad|>")
    template = lf.template.TEMPLATES[profile.lf_template]
    processor = types.SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(folders[model]),
                                      video_processor=AutoVideoProcessor.from_pretrained(folders[model]),
                                      image_max_pixels=768 * 768, image_min_pixels=32 * 32, model_input_names=[])
    theirs = []
    for part in sorted(result.datasets["e2e"].glob("*.jsonl")):
        for line in part.read_text().splitlines():
            record = json.loads(line)
            messages = [dict(m) for m in record["messages"]]
            system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
            images = [Image.open(result.output_dir / p) for p in record["images"]]
            expanded = plugin.process_messages(messages, images, [], [], processor)
            pairs = template.encode_multiturn(tok, expanded, system, None)
            theirs.append(sum(len(source) + len(target) for source, target in pairs))
    assert mine == theirs


def test_hub_ids_that_name_their_family_count_as_that_family_everywhere():
    """`mmdata llamafactory --model Qwen/Qwen2.5-VL-7B-Instruct` worked while `validate --model` and a recipe's
    `model:` refused the same id ("not a local folder"); an id of no known family is still refused, naming why."""
    from mmdata.errors import MmdataError
    from mmdata.profiles import load_profile, resolve_model

    for model_id, name in [("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"), ("Qwen/Qwen3-VL-8B-Thinking", "qwen3_vl"),
                           ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl_nothink"), ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl")]:
        assert load_profile(model_id).name == name == resolve_model(model_id)[1].name
    with pytest.raises(MmdataError, match="nor a hub id that names a family"):
        load_profile("someorg/llava-1.5-7b")
    with pytest.raises(MmdataError, match="not a local folder"):
        load_profile("./missing/Qwen2-VL-2B-Instruct")
