"""What every profile module shares: the placeholders, the text-counter type, the error, and the LLaMA-Factory
arguments that change token counts (:class:`LfArgs`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..errors import MmdataError

DEFAULT_PROFILE = "qwen2_vl"
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's IMAGE_PLACEHOLDER / VIDEO_PLACEHOLDER (extras/constants.py)
VIDEO_PLACEHOLDER = "<video>"

TextCounter = Callable[[str], int]


class ProfileError(MmdataError):
    """An unknown model profile name, or a model folder no profile can be read from."""

    exit_code = 2


# ------------------------------------------------------------------------------------------- LLaMA-Factory args


@dataclass(frozen=True)
class LfArgs:
    """The LLaMA-Factory arguments that change a record's token count, with LLaMA-Factory 0.9.5's defaults.

    ``hparams/model_args.py`` ``ProcessorArguments`` (image/video bounds, pan-and-scan, crop_to_patches, video
    sampling) and ``hparams/data_args.py`` (thinking, history masking, default system). ``model/patcher.py``
    ``patch_processor`` always copies them onto the processor, so the plugins' own ``getattr`` fallbacks (InternVL's
    ``1024 * 1024``) never apply. Pixel bounds are areas in pixels, for every model.
    """

    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    image_do_pan_and_scan: bool = False  # Gemma 3 only
    crop_to_patches: bool = False  # InternVL only: forces tiling with max 12 tiles
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    enable_thinking: bool | None = True  # reasoning templates only (qwen3_vl)
    preserve_thinking: bool = False
    mask_history: bool = False
    default_system: str | None = None  # overrides the template's default system prompt

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LfArgs:
        """The fields of a LLaMA-Factory YAML/dict that matter here; other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})
