"""Model profiles: how each supported VLM family turns images, videos and a conversation into tokens in LLaMA-Factory.

One frozen :class:`ModelProfile` per family, kept as data in :data:`PROFILES` (no ``if model == ...`` chains): the
LLaMA-Factory ``template`` name and that template's strings, the image rule (how LLaMA-Factory's plugin resizes an
image and how the model's processor turns it into placeholder tokens), the video rule where the model has one, the
grounding-box convention (see :mod:`mmdata.boxes`), and the LLaMA-Factory arguments that change any of these
(:class:`LfArgs`). Three image rules cover the families:

- :class:`QwenImages` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): any resolution, snapped by ``smart_resize`` to multiples of
  ``patch_size * merge_size`` (28 or 32 px) within the processor's min/max pixels; one token per merged block;
- :class:`FixedImages` (Gemma 3): every image is resized to one square, a fixed 256 tokens (more with pan-and-scan);
- :class:`TiledImages` (InternVL): 448-px tiles of a fixed token count, dynamic tiling plus a thumbnail.

Each rule answers the same questions for a ``width`` x ``height`` image under :class:`LfArgs`: ``lf_size`` (what
LLaMA-Factory hands the processor), ``input_size`` (what the vision encoder sees), ``tokens`` (placeholder tokens),
``compact`` (the substituted text without the pads) and ``specials``; a new family is a new row, or a new rule.

Why a module of its own: the build summary, ``mmdata validate --cutoff-len``, the LLaMA-Factory config writer and
the trainer must agree on one number per record, and that number depends on the model. Every rule here is a
transcription of a named function of LLaMA-Factory 0.9.5 or transformers (cited in each docstring) and is checked
against the real processors in ``tests/test_profiles.py``; ``docs/models.md`` lists the sources.

The package: ``_common`` (LfArgs), ``vision`` (image and video rules), ``templates`` (chat templates), ``model``
(the profile and its counting API), and here the table of profiles and the reading of model folders.

A profile can also be read from a downloaded model folder (:func:`load_profile`): the folder's
``preprocessor_config.json`` / ``video_preprocessor_config.json`` / ``processor_config.json`` / ``config.json``
values win over the built-in defaults, so a checkpoint with non-default ``max_pixels`` is counted as it will train.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._common import DEFAULT_PROFILE, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, LfArgs, ProfileError, TextCounter
from .model import ImageCost, ModelProfile
from .templates import (
    GEMMA3_TEMPLATE,
    INTERN_VL_TEMPLATE,
    QWEN2_VL_TEMPLATE,
    QWEN3_VL_NOTHINK_TEMPLATE,
    QWEN3_VL_TEMPLATE,
    ChatTemplate,
    count_with_specials,
)
from .vision import FixedImages, QwenImages, QwenVideo, TiledImages

__all__ = [
    "ALIASES", "DEFAULT_PROFILE", "IMAGE_PLACEHOLDER", "PROFILES", "VIDEO_PLACEHOLDER", "ChatTemplate", "FixedImages",
    "ImageCost", "LfArgs", "ModelProfile", "ProfileError", "QwenImages", "QwenVideo", "TextCounter", "TiledImages",
    "count_with_specials", "get_profile", "load_profile", "profile_from_folder", "profile_names", "read_model_folder", "resolve_model",
]

# ------------------------------------------------------------------------------------------------ the table

_LF = "LLaMA-Factory 0.9.5 data/template.py, data/mm_plugin.py"
_HF_QWEN = "transformers models/qwen2_vl/image_processing_qwen2_vl.py (smart_resize)"

PROFILES: dict[str, ModelProfile] = {p.name: p for p in (
    ModelProfile(
        name="qwen2_vl", family="Qwen2-VL", description="Qwen2-VL-2B/7B/72B-Instruct",
        template=QWEN2_VL_TEMPLATE, image=QwenImages(), video=QwenVideo(), box_format="qwen2_vl",
        model_types=("qwen2_vl",), example_models=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
        pixel_keys="preprocessor_config.json min_pixels/max_pixels (or size.shortest_edge/longest_edge), areas in px",
        sources=(_LF, _HF_QWEN, "Qwen/Qwen2-VL-2B-Instruct preprocessor_config.json",
                 "Qwen2-VL report, arXiv:2409.12191, sec. 2.2 (grounding: <|box_start|>, [0, 1000))")),
    ModelProfile(
        name="qwen2_5_vl", family="Qwen2.5-VL", description="Qwen2.5-VL-3B/7B/32B/72B-Instruct",
        template=QWEN2_VL_TEMPLATE, image=QwenImages(), video=QwenVideo(), box_format="qwen2_5_vl",
        model_types=("qwen2_5_vl",), example_models=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
        pixel_keys="preprocessor_config.json min_pixels/max_pixels (or size.shortest_edge/longest_edge), areas in px",
        sources=(_LF, _HF_QWEN, "Qwen/Qwen2.5-VL-3B-Instruct preprocessor_config.json",
                 "Qwen2.5-VL report, arXiv:2502.13923, sec. 2.2 (absolute coordinates, JSON bbox_2d)")),
    ModelProfile(
        name="qwen3_vl", family="Qwen3-VL", description="Qwen3-VL-*-Thinking (reasoning template)",
        template=QWEN3_VL_TEMPLATE,
        image=QwenImages(patch_size=16, min_pixels=65536, max_pixels=16777216),
        video=QwenVideo(patch_size=16, min_pixels=4096, max_pixels=25165824, whole_clip=True, timestamps=True),
        box_format="qwen3_vl", model_types=("qwen3_vl", "qwen3_vl_moe"),
        example_models=("Qwen/Qwen3-VL-2B-Thinking", "Qwen/Qwen3-VL-4B-Thinking"),
        pixel_keys="preprocessor_config.json size.shortest_edge/longest_edge (video: video_preprocessor_config.json)",
        sources=(_LF, _HF_QWEN, "transformers models/qwen3_vl/video_processing_qwen3_vl.py",
                 "Qwen/Qwen3-VL-2B-Instruct preprocessor_config.json, video_preprocessor_config.json",
                 "Qwen3-VL README / cookbook 2d_grounding (relative 0-1000 coordinates, JSON bbox_2d)")),
)}
PROFILES["qwen3_vl_nothink"] = replace(
    PROFILES["qwen3_vl"], name="qwen3_vl_nothink", description="Qwen3-VL-*-Instruct (no thinking)",
    template=QWEN3_VL_NOTHINK_TEMPLATE, example_models=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct"))
PROFILES["gemma3"] = ModelProfile(
    name="gemma3", family="Gemma 3", description="Gemma 3 4B/12B/27B (vision), pan-and-scan off by default",
    template=GEMMA3_TEMPLATE, image=FixedImages(), box_format=None, model_types=("gemma3",),
    example_models=("google/gemma-3-4b-it",),
    pixel_keys="preprocessor_config.json size.height/width (896, fixed); image_seq_length / mm_tokens_per_image",
    sources=(_LF, "transformers models/gemma3/processing_gemma3.py (full_image_sequence), "
             "image_processing_gemma3.py (pan_and_scan)"))
PROFILES["internvl"] = ModelProfile(
    name="internvl", family="InternVL", description="InternVL2.5/3 -hf checkpoints (InternVLProcessor)",
    template=INTERN_VL_TEMPLATE, image=TiledImages(), box_format="internvl", model_types=("internvl", "internvl_chat"),
    example_models=("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf"),
    pixel_keys="preprocessor_config.json size.height/width (448 per tile), crop_to_patches, min/max_patches",
    sources=(_LF, "transformers models/internvl/processing_internvl.py, "
             "models/got_ocr2/image_processing_got_ocr2.py (crop_image_to_patches)",
             "InternVL docs: <ref>label</ref><box>[[x1, y1, x2, y2]]</box>, coordinates 0-1000"))

# Other spellings users type: LLaMA-Factory template names and dotted family names.
ALIASES = {"qwen2.5_vl": "qwen2_5_vl", "qwen25_vl": "qwen2_5_vl", "qwen3_vl_thinking": "qwen3_vl",
           "qwen3_vl_instruct": "qwen3_vl_nothink", "intern_vl": "internvl", "internvl3": "internvl",
           "gemma-3": "gemma3"}


def profile_names() -> list[str]:
    return sorted(PROFILES)


def get_profile(name: str | None = None) -> ModelProfile:
    """A built-in profile by name (or alias); ``None`` is :data:`DEFAULT_PROFILE`."""
    name = DEFAULT_PROFILE if name is None else name
    key = ALIASES.get(name.lower(), name.lower())
    if key in PROFILES:
        return PROFILES[key]
    close = difflib.get_close_matches(key, list(PROFILES) + list(ALIASES), n=1)
    hint = f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""
    raise ProfileError(f"unknown model profile {name!r}{hint}; known profiles: {', '.join(profile_names())}, "
                       "or pass a local model folder (config.json + preprocessor_config.json)")


def load_profile(name_or_dir: str | os.PathLike | None = None) -> ModelProfile:
    """A profile by name, or read from a local model folder (its values win over the family's defaults).

    Never downloads: a hub id that names its family (``Qwen/Qwen2.5-VL-7B-Instruct``) counts with that family's
    profile (the reference checkpoints' settings); for its own files, download it (``hf download``) and pass the
    folder.
    """
    if name_or_dir is None:
        return get_profile(None)
    path = Path(name_or_dir).expanduser()
    model_files = ("config.json", "preprocessor_config.json", "processor_config.json")
    if path.is_dir() and (str(name_or_dir).lower() not in PROFILES or any((path / f).is_file() for f in model_files)):
        return profile_from_folder(path)
    name = str(name_or_dir)
    if "/" in name or os.sep in name:
        family = _family_of_hub_id(name)
        if family is not None and not name.startswith((".", "/", "~")):  # a hub id that says its family
            return get_profile(family)
        raise ProfileError(f"{name}: not a local folder, nor a hub id that names a family mmdata knows (mmdata never "
                           f"downloads); pass a downloaded model folder or a profile name: "
                           f"{', '.join(profile_names())}")
    return get_profile(name)


# Hub ids name their family; the first pattern that matches the lower-cased id wins.
_FAMILY_BY_HUB_ID = [("qwen3-vl", None), ("qwen2.5-vl", "qwen2_5_vl"), ("qwen2_5-vl", "qwen2_5_vl"),
                     ("qwen2-vl", "qwen2_vl"), ("gemma-3", "gemma3"), ("internvl", "internvl")]


def _family_of_hub_id(model_id: str) -> str | None:
    """The profile a hub id names (``Qwen/Qwen3-VL-8B-Thinking`` -> ``qwen3_vl``; an Instruct one ->
    ``qwen3_vl_nothink``), or None."""
    lowered = model_id.lower()
    for pattern, name in _FAMILY_BY_HUB_ID:
        if pattern in lowered:
            return name or ("qwen3_vl" if "thinking" in lowered else "qwen3_vl_nothink")
    return None


def resolve_model(model: str | os.PathLike, profile: str | None = None) -> tuple[str, ModelProfile]:
    """``(model_name_or_path, profile)`` for a model given as a profile name (its first example checkpoint), a local
    model folder, or a hub id whose name says its family (``Qwen/Qwen3-VL-4B-Instruct`` -> ``qwen3_vl_nothink``;
    ``...-Thinking`` -> ``qwen3_vl``). ``profile`` names the profile outright. A path or id of no known family keeps
    the default profile, with a warning that says so (mmdata counted Qwen2-VL only before profiles existed)."""
    text = str(model)
    if profile is not None:
        return text, get_profile(profile)
    if text.lower() in PROFILES or text.lower() in ALIASES:
        profile = get_profile(text)
        return profile.example_models[0], profile
    if Path(text).expanduser().is_dir():
        return text, load_profile(text)
    family = _family_of_hub_id(text)
    if family is not None:
        return text, get_profile(family)
    import warnings

    warnings.warn(f"{text}: mmdata cannot tell which model family this is and counts it as {DEFAULT_PROFILE}; name "
                  f"the profile ({', '.join(profile_names())}) if it is another", stacklevel=2)
    return text, get_profile(None)


# ------------------------------------------------------------------------------------------------- folders

_FAMILY_BY_MODEL_TYPE = {t: p.name for p in PROFILES.values() if p.name != "qwen3_vl_nothink" for t in p.model_types}
_FAMILY_BY_PROCESSOR = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl",
                        "Qwen3VLProcessor": "qwen3_vl", "Gemma3Processor": "gemma3", "InternVLProcessor": "internvl"}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: cannot read it as JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def read_model_folder(path: str | os.PathLike) -> dict[str, Any]:
    """The configuration files of a model folder that shape token counts, as dicts (missing files are ``{}``):
    ``config``, ``image`` and ``video`` in transformers' order of precedence (``processor_config.json``'s nested
    ``image_processor``/``video_processor``, else ``preprocessor_config.json`` / ``video_preprocessor_config.json``,
    the video falling back to ``preprocessor_config.json``: ``ImageProcessingMixin.get_image_processor_dict``,
    ``BaseVideoProcessor.get_video_processor_dict``), ``processor`` (``processor_config.json``) and
    ``chat_template`` (text, from ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``)."""
    root = Path(path)
    processor = _read_json(root / "processor_config.json")
    nested_image, nested_video = processor.get("image_processor"), processor.get("video_processor")
    image = nested_image if isinstance(nested_image, dict) else _read_json(root / "preprocessor_config.json")
    video = nested_video if isinstance(nested_video, dict) else (
        _read_json(root / "video_preprocessor_config.json") or _read_json(root / "preprocessor_config.json"))
    template = ""
    if (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        for name in ("chat_template.json", "tokenizer_config.json"):
            value = _read_json(root / name).get("chat_template")
            if isinstance(value, str):
                template = value
                break
            if isinstance(value, list):  # several named templates
                template = "".join(t.get("template", "") for t in value if isinstance(t, dict))
                break
    return {"config": _read_json(root / "config.json"), "image": image, "video": video, "processor": processor,
            "chat_template": template}


def _family(files: dict[str, Any], root: Path) -> str:
    config = files["config"]
    model_type = config.get("model_type")
    if model_type in _FAMILY_BY_MODEL_TYPE:
        return _FAMILY_BY_MODEL_TYPE[model_type]
    for source in (files["image"], files["processor"], files["video"]):
        cls = source.get("processor_class")
        if cls in _FAMILY_BY_PROCESSOR:
            return _FAMILY_BY_PROCESSOR[cls]
    known = ", ".join(sorted(_FAMILY_BY_MODEL_TYPE))
    what = f"model_type {model_type!r}" if model_type else "no config.json model_type"
    raise ProfileError(f"{root}: {what} is not a model family mmdata knows (known model types: {known}); name the "
                       f"profile to count it as ({', '.join(profile_names())}): `mmdata llamafactory --profile NAME` "
                       "keeps this --model; elsewhere pass the profile name instead of the folder")


def _pixels(cfg: dict[str, Any], default_min: int, default_max: int) -> tuple[int, int]:
    """Min/max pixels the way ``Qwen2VLImageProcessor.__init__`` reads them: ``size`` first, then
    ``min_pixels``/``max_pixels`` on top."""
    size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
    lo = size.get("shortest_edge", default_min)
    hi = size.get("longest_edge", default_max)
    lo = cfg["min_pixels"] if cfg.get("min_pixels") is not None else lo
    hi = cfg["max_pixels"] if cfg.get("max_pixels") is not None else hi
    return int(lo), int(hi)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def profile_from_folder(path: str | os.PathLike) -> ModelProfile:
    """Read a profile from a downloaded model folder: family from ``config.json`` ``model_type`` (or the processor
    class), then the folder's patch/merge/temporal sizes, pixel bounds, token counts and tiling settings over the
    family defaults. Qwen3-VL folders whose chat template handles ``<think>`` (the Thinking models) get the
    ``qwen3_vl`` template, others ``qwen3_vl_nothink``."""
    root = Path(path)
    files = read_model_folder(root)
    family = _family(files, root)
    if family == "qwen3_vl" and "<think>" not in files["chat_template"]:
        family = "qwen3_vl_nothink"
    base = PROFILES[family]
    config, image_cfg, video_cfg = files["config"], files["image"], files["video"]
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    image: QwenImages | FixedImages | TiledImages
    video = base.video
    rule = base.image
    if isinstance(rule, QwenImages):
        patch = int(_first(image_cfg.get("patch_size"), vision.get("patch_size"), rule.patch_size))
        merge = int(_first(image_cfg.get("merge_size"), vision.get("spatial_merge_size"), rule.merge_size))
        temporal = int(_first(image_cfg.get("temporal_patch_size"), vision.get("temporal_patch_size"),
                              rule.temporal_patch_size))
        lo, hi = _pixels(image_cfg, rule.min_pixels, rule.max_pixels)
        image = replace(rule, patch_size=patch, merge_size=merge, temporal_patch_size=temporal, min_pixels=lo,
                        max_pixels=hi)
        if video is not None:
            vcfg = video_cfg  # Qwen2-VL folders have no video config: transformers reads preprocessor_config.json
            vlo, vhi = _pixels(vcfg, video.min_pixels, video.max_pixels)
            video = replace(video, patch_size=int(vcfg.get("patch_size", patch)),
                            merge_size=int(vcfg.get("merge_size", merge)),
                            temporal_patch_size=int(vcfg.get("temporal_patch_size", temporal)),
                            min_pixels=vlo, max_pixels=vhi)
    elif isinstance(rule, FixedImages):
        size = image_cfg.get("size") if isinstance(image_cfg.get("size"), dict) else {}
        tokens = _first(files["processor"].get("image_seq_length"), image_cfg.get("image_seq_length"),
                        config.get("mm_tokens_per_image"), rule.tokens_per_image)
        image = replace(rule, tokens_per_image=int(tokens),
                        image_size=int(_first(size.get("height"), vision.get("image_size"), rule.image_size)))
    else:
        size = image_cfg.get("size") if isinstance(image_cfg.get("size"), dict) else {}
        tile = int(_first(size.get("height"), config.get("force_image_size"), _edge(vision.get("image_size")),
                          rule.tile_size))
        seq = _first(files["processor"].get("image_seq_length"), _internvl_seq(config, vision, tile))
        image = replace(
            rule, tile_size=tile, tokens_per_tile=int(_first(seq, rule.tokens_per_tile)),
            crop_to_patches=bool(_first(image_cfg.get("crop_to_patches"), config.get("dynamic_image_size"),
                                        rule.crop_to_patches)),
            min_tiles=int(_first(image_cfg.get("min_patches"), config.get("min_dynamic_patch"), rule.min_tiles)),
            max_tiles=int(_first(image_cfg.get("max_patches"), config.get("max_dynamic_patch"), rule.max_tiles)),
            use_thumbnail=bool(_first(config.get("use_thumbnail"), rule.use_thumbnail)))
    return replace(base, image=image, video=video, origin=str(root))


def _edge(value: Any) -> int | None:
    if isinstance(value, (list, tuple)) and value:
        return int(value[0])
    return int(value) if isinstance(value, (int, float)) else None


def _internvl_seq(config: dict[str, Any], vision: dict[str, Any], tile: int) -> int | None:
    """``image_seq_length = (image_size // patch_size) ** 2 * downsample_ratio ** 2`` (InternVLProcessor docstring)."""
    patch = _edge(vision.get("patch_size"))
    ratio = _first(config.get("downsample_ratio"), vision.get("downsample_ratio"))
    if not patch or ratio is None:
        return None
    return int((tile // patch) ** 2 * float(ratio) ** 2)
