"""Image and video rules: how LLaMA-Factory's plugin resizes an image (or samples a video) and how the model's
processor turns it into placeholder tokens. Three image rules cover the families (:class:`QwenImages`,
:class:`FixedImages`, :class:`TiledImages`) and one video rule (:class:`QwenVideo`); each docstring names the
LLaMA-Factory 0.9.5 / transformers function it transcribes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ._common import LfArgs

# ------------------------------------------------------------------------------------------------- images


def lf_resize(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """LLaMA-Factory's ``MMPluginMixin._preprocess_image`` (data/mm_plugin.py), as sizes: scale down into
    ``max_pixels`` then up to ``min_pixels``, truncating like its ``int(width * factor)``.

    Total over positive sizes: where the shrink truncates a side to 0 (LLaMA-Factory itself then fails, PIL refusing
    the resize) the side counts as 1 pixel, so a count is always defined; :func:`lf_image_problem` reports such
    images (the same rule as :func:`mmdata.tokens.lf_image_size`).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    if width * height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width, height


def lf_image_problem(width: int, height: int, max_pixels: int) -> str | None:
    """Why LLaMA-Factory cannot train on a ``width`` x ``height`` image under ``image_max_pixels``, or ``None``: its
    shrink truncates a side below ``1 / factor`` to 0 pixels and PIL's resize raises, stopping the run. Same rule for
    every plugin (the base ``_preprocess_image`` runs first)."""
    if width * height <= max_pixels:
        return None
    scale = math.sqrt(max_pixels / (width * height))
    if int(width * scale) >= 1 and int(height * scale) >= 1:
        return None
    return (f"image {width}x{height} is too thin for image_max_pixels {max_pixels}: LLaMA-Factory would shrink a side "
            "to 0 pixels and stop training (PIL: height and width must be > 0)")


def qwen_lf_resize(width: int, height: int, max_pixels: int, min_pixels: int, min_side: int = 28) -> tuple[int, int]:
    """LLaMA-Factory's ``Qwen2VLPlugin._preprocess_image`` (inherited by ``Qwen3VLPlugin``): :func:`lf_resize`, then
    sides at least ``min_side`` (28, also for Qwen3-VL's 32-px grid), then a 180:1 crop once past 200:1 (the
    processor's ``smart_resize`` refuses more than 200:1)."""
    width, height = lf_resize(width, height, max_pixels, min_pixels)
    if min(width, height) < min_side:
        width, height = max(width, min_side), max(height, min_side)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    return width, height


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' ``smart_resize`` (models/qwen2_vl/image_processing_qwen2_vl.py), line for line; Qwen2.5-VL and
    Qwen3-VL images use the same function. Returns ``(height, width)``; ``ValueError`` past 200:1."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen3-VL video ``smart_resize`` (models/qwen3_vl/video_processing_qwen3_vl.py): like
    :func:`smart_resize` but the pixel bounds are over the whole clip (frames x height x width), and frames smaller
    than one grid cell are first scaled up."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenImages:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: LLaMA-Factory's Qwen plugin resize, then the processor's ``smart_resize`` to
    multiples of ``factor = patch_size * merge_size`` within ``[min_pixels, max_pixels]``; one ``<|image_pad|>`` per
    ``factor x factor`` block (``image_grid_thw.prod() // merge_size**2``, ``Qwen2VLPlugin.process_messages``),
    wrapped in ``<|vision_start|>`` ... ``<|vision_end|>``.

    ``min_pixels``/``max_pixels`` are the processor's: ``preprocessor_config.json`` ``min_pixels``/``max_pixels``
    (Qwen2-VL, Qwen2.5-VL) or ``size.shortest_edge``/``size.longest_edge`` (Qwen3-VL); both spellings are areas in
    pixels, and ``min_pixels``/``max_pixels`` win when a file has both (``Qwen2VLImageProcessor.__init__``).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 12845056
    token: str = "<|image_pad|>"
    start: str = "<|vision_start|>"
    end: str = "<|vision_end|>"
    lf_min_side: int = 28
    kind: str = "smart_resize"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def lf_size(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        return qwen_lf_resize(width, height, lf.image_max_pixels, lf.image_min_pixels, self.lf_min_side)

    def input_size(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        w, h = self.lf_size(width, height, lf)
        h_bar, w_bar = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        return w_bar, h_bar

    def tokens(self, width: int, height: int, lf: LfArgs) -> int:
        w, h = self.input_size(width, height, lf)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def compact(self, width: int, height: int, lf: LfArgs) -> str:
        return self.start + self.end

    def specials(self) -> tuple[str, ...]:
        return (self.start, self.end, self.token)


@dataclass(frozen=True)
class FixedImages:
    """Gemma 3: every image (or pan-and-scan crop) is resized to ``image_size`` square and costs ``tokens_per_image``
    soft tokens (config ``mm_tokens_per_image``, processor ``image_seq_length``).

    LLaMA-Factory's ``Gemma3Plugin.process_messages`` writes the processor's ``full_image_sequence``:
    ``"\\n\\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\\n\\n"``
    (``Gemma3Processor.__init__``). With ``image_do_pan_and_scan`` it adds crops (LLaMA-Factory hard-codes min crop
    256, max 4 crops, ratio 1.2 in ``_get_mm_inputs``) and, for every image, the sentence ``"Here is the original
    image ... and here are some crops to help you see better ..."``. The resize before is the base plugin's (no
    28-px rule).
    """

    tokens_per_image: int = 256
    image_size: int = 896
    token: str = "<image_soft_token>"
    start: str = "<start_of_image>"
    end: str = "<end_of_image>"
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio: float = 1.2
    kind: str = "fixed"

    def lf_size(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        return lf_resize(width, height, lf.image_max_pixels, lf.image_min_pixels)

    def input_size(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        return self.image_size, self.image_size

    def crops(self, width: int, height: int, lf: LfArgs) -> int:
        """Pan-and-scan crops of one image: transformers' ``Gemma3ImageProcessor.pan_and_scan_batched``."""
        if not lf.image_do_pan_and_scan:
            return 0
        width, height = self.lf_size(width, height, lf)
        long, short = max(width, height), min(width, height)
        if long / short < self.pan_and_scan_min_ratio:
            return 0
        n = min(int(math.floor(long / self.pan_and_scan_min_crop_size)), int(math.floor(long / short + 0.5)))
        n = min(self.pan_and_scan_max_num_crops, max(2, n))
        crop_long = int(math.ceil(long / n))
        if min(crop_long, short) < self.pan_and_scan_min_crop_size:
            return 0
        return n

    def tokens(self, width: int, height: int, lf: LfArgs) -> int:
        return self.tokens_per_image * (1 + self.crops(width, height, lf))

    def sequence(self, pads: bool = True) -> str:
        return f"\n\n{self.start}{self.token * self.tokens_per_image if pads else ''}{self.end}\n\n"

    def compact(self, width: int, height: int, lf: LfArgs, pads: bool = False) -> str:
        """Unlike transformers' processor, LLaMA-Factory writes the pan-and-scan sentence for every image once the
        option is on, also for images that get no crops."""
        seq = self.sequence(pads)
        if not lf.image_do_pan_and_scan:
            return seq
        return (f"Here is the original image {seq} and here are some crops to help you see better "
                + " ".join([seq] * self.crops(width, height, lf)))

    def specials(self) -> tuple[str, ...]:
        return (self.start, self.end, self.token)


def tile_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """``(columns, rows)`` of transformers' ``get_optimal_tiled_canvas`` (models/got_ocr2/image_processing_got_ocr2.py):
    the arrangement with the closest aspect ratio; ties go to more tiles while the image covers more than half of
    them."""
    arrangements = sorted(((w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
                           if min_tiles <= w * h <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in arrangements:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


@dataclass(frozen=True)
class TiledImages:
    """InternVL (the ``-hf`` checkpoints LLaMA-Factory's ``intern_vl`` template loads): ``tile_size`` tiles of
    ``tokens_per_tile`` tokens each (processor ``image_seq_length`` = (448 / 14)**2 * 0.5**2 = 256).

    Tiling (``GotOcr2ImageProcessor.crop_image_to_patches``) runs when LLaMA-Factory's ``crop_to_patches`` is set
    (then with ``min_patches=1, max_patches=12``, ``InternVLPlugin._get_mm_inputs``) or the folder's
    ``preprocessor_config.json`` says ``crop_to_patches: true`` (then with its ``min_patches``/``max_patches``); a
    thumbnail tile is added whenever there is more than one tile. ``InternVLPlugin.process_messages`` writes
    ``"<img>" + "<IMG_CONTEXT>" * 256 * tiles + "</img>"``. The resize before is the base plugin's.
    """

    tile_size: int = 448
    tokens_per_tile: int = 256
    min_tiles: int = 1
    max_tiles: int = 12
    crop_to_patches: bool = False
    use_thumbnail: bool = True
    token: str = "<IMG_CONTEXT>"
    start: str = "<img>"
    end: str = "</img>"
    kind: str = "tiles"

    def lf_size(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        return lf_resize(width, height, lf.image_max_pixels, lf.image_min_pixels)

    def grid(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        """``(columns, rows)`` of tiles, ``(1, 1)`` when tiling is off."""
        if lf.crop_to_patches:
            min_tiles, max_tiles = 1, 12
        elif self.crop_to_patches:
            min_tiles, max_tiles = self.min_tiles, self.max_tiles
        else:
            return 1, 1
        width, height = self.lf_size(width, height, lf)
        return tile_grid(width, height, self.tile_size, min_tiles, max_tiles)

    def tiles(self, width: int, height: int, lf: LfArgs) -> int:
        cols, rows = self.grid(width, height, lf)
        n = cols * rows
        return n + 1 if self.use_thumbnail and n != 1 else n

    def input_size(self, width: int, height: int, lf: LfArgs) -> tuple[int, int]:
        cols, rows = self.grid(width, height, lf)
        return cols * self.tile_size, rows * self.tile_size

    def tokens(self, width: int, height: int, lf: LfArgs) -> int:
        return self.tokens_per_tile * self.tiles(width, height, lf)

    def compact(self, width: int, height: int, lf: LfArgs) -> str:
        return self.start + self.end

    def specials(self) -> tuple[str, ...]:
        return (self.start, self.end, self.token)


# ------------------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class QwenVideo:
    """Qwen video: LLaMA-Factory samples ``video_fps`` frames per second (at most ``video_maxlen``, padded to an even
    count), shrinks each frame into ``[video_min_pixels, video_max_pixels]`` like an image, then the video
    processor snaps frames to the grid; frames pair up (``temporal_patch_size`` 2) and each pair costs
    ``grid_h * grid_w / merge_size**2`` ``<|video_pad|>`` tokens.

    Qwen2-VL/2.5-VL: per-frame :func:`smart_resize`, one ``<|vision_start|>...<|vision_end|>`` around the video.
    Qwen3-VL: :func:`smart_resize_video` with bounds over the whole clip, and each frame pair is written
    ``"<{t:.1f} seconds><|vision_start|>" + pads + "<|vision_end|>"`` (``Qwen3VLPlugin.process_messages``).
    Source: ``Qwen2VLPlugin._get_qwen_video_grid_metadata`` / ``_get_video_sample_indices`` (LLaMA-Factory 0.9.5),
    with transformers' default ``cap_pixels_per_frame=False``.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 12845056
    whole_clip: bool = False
    timestamps: bool = False
    token: str = "<|video_pad|>"
    start: str = "<|vision_start|>"
    end: str = "<|vision_end|>"

    def lf_frames(self, duration_s: float, total_frames: int, lf: LfArgs) -> int:
        """Frames LLaMA-Factory feeds the processor: ``_get_video_sample_indices`` plus the Qwen plugin's padding
        to an even count (``total_frames == 0`` means a stream of unknown length: ``video_maxlen`` frames)."""
        if total_frames == 0:
            n = lf.video_maxlen
        else:
            n = min(total_frames, lf.video_maxlen, max(1, math.floor(duration_s * lf.video_fps)))
        return n + n % 2

    def grid(self, width: int, height: int, num_frames: int, lf: LfArgs) -> tuple[int, int, int]:
        """``video_grid_thw`` of a clip of ``num_frames`` frames (already sampled) of ``width`` x ``height``."""
        num_frames += num_frames % 2  # Qwen2VLPlugin._regularize_videos duplicates the last frame of an odd count
        w, h = qwen_lf_resize(width, height, lf.video_max_pixels, lf.video_min_pixels)
        factor = self.patch_size * self.merge_size
        if self.whole_clip:
            h, w = smart_resize_video(num_frames, h, w, self.temporal_patch_size, factor, self.min_pixels,
                                      self.max_pixels)
        else:
            h, w = smart_resize(h, w, factor, self.min_pixels, self.max_pixels)
        return math.ceil(num_frames / self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def tokens(self, width: int, height: int, num_frames: int, lf: LfArgs) -> int:
        t, gh, gw = self.grid(width, height, num_frames, lf)
        return t * gh * gw // self.merge_size ** 2

    def frame_times(self, sample_times_s: Sequence[float]) -> list[float]:
        """Qwen3-VL's per-pair timestamps: ``Qwen3VLProcessor._calculate_timestamps`` (pairs averaged, an odd list
        padded with its last entry)."""
        times = list(sample_times_s)
        if len(times) % self.merge_size:
            times += [times[-1]] * (self.merge_size - len(times) % self.merge_size)
        return [(times[i] + times[i + self.merge_size - 1]) / 2 for i in range(0, len(times), self.merge_size)]

    def compact(self, width: int, height: int, num_frames: int, lf: LfArgs,
                sample_times_s: Sequence[float] | None = None) -> str:
        """The text LLaMA-Factory puts for ``<video>`` with the pad tokens left out. Qwen3-VL's timestamps are the
        sampled frames' times in seconds (``sample_times_s``); without them, frames are taken as evenly spaced at
        ``video_fps``, which gives the same text length for evenly sampled clips and a close one otherwise."""
        if not self.timestamps:
            return self.start + self.end
        t = self.grid(width, height, num_frames, lf)[0]
        if sample_times_s is None:
            sample_times_s = [i / lf.video_fps for i in range(2 * t)]
        times = self.frame_times(sample_times_s)[:t]
        return "".join(f"<{s:.1f} seconds>{self.start}{self.end}" for s in times)

    def specials(self) -> tuple[str, ...]:
        return (self.start, self.end, self.token)
