"""The :class:`ModelProfile`: one family's image rule, video rule, chat template and LLaMA-Factory arguments, and the
counting API the rest of mmdata uses (image tokens, rendered conversations, record tokens)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ._common import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, LfArgs, ProfileError, TextCounter
from .templates import ChatTemplate, count_with_specials
from .vision import FixedImages, QwenImages, QwenVideo, TiledImages, lf_image_problem

# ------------------------------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class ImageCost:
    """One image (or video) as LLaMA-Factory writes it into the text: ``pads`` repeated placeholder tokens (the
    number the processor produces), ``compact`` the rest of the substituted text with the pads left out (wrapper
    tokens, Gemma's newlines, Qwen3-VL's timestamps), whose tokens a text counter can count."""

    pads: int
    compact: str


@dataclass(frozen=True)
class ModelProfile:
    """Everything mmdata needs to know about one model family; see the module docstring. Immutable: derive variants
    with :meth:`with_lf_args` or :func:`dataclasses.replace`."""

    name: str
    family: str
    description: str
    template: ChatTemplate
    image: QwenImages | FixedImages | TiledImages
    video: QwenVideo | None = None
    box_format: str | None = None
    model_types: tuple[str, ...] = ()
    example_models: tuple[str, ...] = ()
    pixel_keys: str = ""
    sources: tuple[str, ...] = ()
    lf: LfArgs = field(default_factory=LfArgs)
    origin: str = "built-in"

    @property
    def lf_template(self) -> str:
        """The ``template:`` value for LLaMA-Factory."""
        return self.template.name

    @functools.cached_property
    def specials(self) -> tuple[str, ...]:
        video = self.video.specials() if self.video else ()
        return tuple(dict.fromkeys(self.template.specials + self.image.specials() + video))

    def with_lf_args(self, **lf_args: Any) -> ModelProfile:
        """This profile under other LLaMA-Factory arguments (``image_max_pixels=...``, ``enable_thinking=False``);
        unknown keys are ignored so a whole LLaMA-Factory config dict can be passed."""
        current = {f.name: getattr(self.lf, f.name) for f in fields(LfArgs)}
        return replace(self, lf=LfArgs.from_config({**current, **lf_args}))

    def _lf(self, max_pixels: int | None, min_pixels: int | None) -> LfArgs:
        if max_pixels is None and min_pixels is None:
            return self.lf
        return replace(self.lf, image_max_pixels=self.lf.image_max_pixels if max_pixels is None else max_pixels,
                       image_min_pixels=self.lf.image_min_pixels if min_pixels is None else min_pixels)

    # -- images ---------------------------------------------------------------------------------------------

    def lf_image_size(self, width: int, height: int, max_pixels: int | None = None,
                      min_pixels: int | None = None) -> tuple[int, int]:
        """``(width, height)`` LLaMA-Factory hands the processor (``max_pixels``/``min_pixels`` are LLaMA-Factory's
        ``image_max_pixels``/``image_min_pixels``; ``None`` takes this profile's :attr:`lf`)."""
        return self.image.lf_size(width, height, self._lf(max_pixels, min_pixels))

    def model_input_size(self, width: int, height: int, max_pixels: int | None = None,
                         min_pixels: int | None = None) -> tuple[int, int]:
        """``(width, height)`` of the image the vision encoder sees (Qwen: ``image_grid_thw * patch_size``; Gemma 3:
        896 square; InternVL: the tile canvas). Qwen2.5-VL's absolute box coordinates live in this frame."""
        return self.image.input_size(width, height, self._lf(max_pixels, min_pixels))

    def lf_image_problem(self, width: int, height: int, max_pixels: int | None = None) -> str | None:
        """Why LLaMA-Factory would fail on this image (a side shrunk to 0 pixels), or ``None``."""
        return lf_image_problem(width, height, self._lf(max_pixels, None).image_max_pixels)

    def image_tokens(self, width: int, height: int, max_pixels: int | None = None,
                     min_pixels: int | None = None) -> int:
        """Placeholder tokens (``<|image_pad|>``, ``<image_soft_token>``, ``<IMG_CONTEXT>``) one image costs in
        LLaMA-Factory training, wrappers not included (see :meth:`image_cost`)."""
        return self.image.tokens(width, height, self._lf(max_pixels, min_pixels))

    def image_cost(self, width: int, height: int, max_pixels: int | None = None,
                   min_pixels: int | None = None) -> ImageCost:
        lf = self._lf(max_pixels, min_pixels)
        return ImageCost(self.image.tokens(width, height, lf), self.image.compact(width, height, lf))

    def image_total_tokens(self, width: int, height: int, text: TextCounter | None = None,
                           max_pixels: int | None = None, min_pixels: int | None = None) -> int:
        """All tokens one image adds to a record: pads plus wrappers (2 for Qwen and InternVL; Gemma 3's
        ``<start_of_image>``/``<end_of_image>`` and two ``"\\n\\n"``). ``text`` counts the non-special text (default:
        :func:`mmdata.tokens.estimate_text_tokens`)."""
        cost = self.image_cost(width, height, max_pixels, min_pixels)
        return cost.pads + count_with_specials(cost.compact, self.specials, text or _estimate)

    # -- videos ---------------------------------------------------------------------------------------------

    def _video(self) -> QwenVideo:
        if self.video is None:
            raise ProfileError(f"profile {self.name!r}: mmdata has no video rule for {self.family}; "
                               "videos are counted for the Qwen profiles only")
        return self.video

    def video_frames(self, duration_s: float, total_frames: int) -> int:
        """Frames LLaMA-Factory samples from a clip (``video_fps``, ``video_maxlen``, padded to even)."""
        return self._video().lf_frames(duration_s, total_frames, self.lf)

    def video_tokens(self, width: int, height: int, num_frames: int) -> int:
        """``<|video_pad|>`` tokens of ``num_frames`` sampled frames of ``width`` x ``height``."""
        return self._video().tokens(width, height, num_frames, self.lf)

    def video_cost(self, width: int, height: int, num_frames: int,
                   sample_times_s: Sequence[float] | None = None) -> ImageCost:
        video = self._video()
        return ImageCost(video.tokens(width, height, num_frames, self.lf),
                         video.compact(width, height, num_frames, self.lf, sample_times_s))

    # -- conversations --------------------------------------------------------------------------------------

    def render(self, turns: Sequence[tuple[str, object]], image_sizes: Iterable[tuple[int, int]] = (),
               video_shapes: Iterable[tuple[int, int, int]] = (), system: str | None = None,
               expand: bool = False) -> list[str]:
        """The strings LLaMA-Factory encodes for one record, in order, each encoded on its own
        (``Template._convert_elements_to_ids``): ``<image>``/``<video>`` substituted as its plugin does, the chat
        template applied as ``encode_multiturn`` does. ``expand=False`` leaves the pad tokens out (count them with
        :meth:`image_tokens`); ``expand=True`` writes them, so the token ids equal LLaMA-Factory's.

        ``turns`` are ``(role, content)`` with an optional leading ``system`` turn, then user/assistant pairs. Raises
        ``ValueError`` when the ``<image>``/``<video>`` placeholders and the given sizes disagree, as
        LLaMA-Factory does.
        """
        system, messages = _split_system(turns, system)
        contents = self.substitute_media([c for _, c in messages], image_sizes, video_shapes, expand)
        tpl = self.template
        contents, plan = tpl.thought_plan(contents, self.lf)
        system = tpl.system_prompt(system, self.lf)
        out: list[list[str]] = []
        for i, ((role, _), content) in enumerate(zip(messages, contents, strict=True)):
            elements: list[str] = []
            prefix_text = ""
            if i == 0:
                if tpl.prefix:
                    elements.append(tpl.prefix)
                if system:
                    if tpl.system_in_first_user:
                        prefix_text = tpl.system.replace("{{content}}", system, 1)
                    else:
                        elements.append(tpl.system.replace("{{content}}", system, 1))
            elements.append(tpl.slot(role).replace("{{content}}", prefix_text + content, 1))
            out.append(elements)
        for pair, side in enumerate(plan):
            if side is not None:
                i = 2 * pair + side
                out[i] = out[i] + [tpl.empty_thought] if side == 0 else [tpl.empty_thought] + out[i]
        return [e for elements in out for e in elements if e]

    def substitute_media(self, contents: Sequence[str], image_sizes: Iterable[tuple[int, int]] = (),
                         video_shapes: Iterable[tuple[int, int, int]] = (), expand: bool = False) -> list[str]:
        """Message contents with each ``<image>``/``<video>``, in order, replaced by the text LLaMA-Factory's plugin
        writes (``process_messages``); ``expand=False`` leaves the pad tokens out. Raises ``ValueError`` when the
        placeholders and the media disagree in number, as LLaMA-Factory does."""
        return _expand_media(self, list(contents), list(image_sizes), list(video_shapes), expand)

    def record_tokens(self, turns: Sequence[tuple[str, object]], image_sizes: Iterable[tuple[int, int]] = (),
                      text: TextCounter | None = None, exact: bool = False,
                      video_shapes: Iterable[tuple[int, int, int]] = (), system: str | None = None) -> int:
        """Tokens of one record as LLaMA-Factory trains it under this profile's template and :attr:`lf`.

        ``exact=True`` means ``text`` is a real tokenizer's count (``len(tok.encode(s, add_special_tokens=False))``):
        the record is rendered with :meth:`render` and each string counted, which matches LLaMA-Factory token for
        token. Otherwise (the estimate) contents are counted without their placeholders and each slot adds its
        real-tokenizer constant, as :func:`mmdata.tokens.record_tokens` does for Qwen2-VL. A record whose placeholders
        and images disagree (LLaMA-Factory rejects it; ``validate`` reports it) is counted as if it were fixed.
        """
        text = text or _estimate
        image_sizes, video_shapes = list(image_sizes), list(video_shapes)
        pads = sum(self.image_tokens(w, h) for w, h in image_sizes)
        pads += sum(self.video_tokens(w, h, n) for w, h, n in video_shapes)
        if exact:
            try:
                return pads + sum(text(s) for s in self.render(turns, image_sizes, video_shapes, system))
            except ValueError:
                pass  # placeholder/media mismatch: fall through to the structural count, with the tokenizer
        return pads + self._estimate_record(turns, image_sizes, video_shapes, system, text)

    def _estimate_record(self, turns, image_sizes, video_shapes, system, text: TextCounter) -> int:
        tpl = self.template
        system, messages = _split_system(turns, system)
        contents = [_as_text(c) for _, c in messages]
        contents, plan = tpl.thought_plan(contents, self.lf)
        total = tpl.prefix_tokens if tpl.prefix_tokens is not None else count_with_specials(tpl.prefix, tpl.specials,
                                                                                            text)
        total += tpl.system_prompt_tokens(system, self.lf, text)
        for (role, _), content in zip(messages, contents, strict=True):
            bare = content.replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "")
            total += tpl.slot_tokens(role, text) + text(bare)
        thought = tpl.empty_thought_tokens if tpl.empty_thought_tokens is not None else count_with_specials(
            tpl.empty_thought, tpl.specials, text)
        total += thought * sum(side is not None for side in plan)
        total += sum(count_with_specials(self.image.compact(w, h, self.lf), self.specials, text) for w, h in image_sizes)
        if video_shapes:
            video = self._video()
            total += sum(count_with_specials(video.compact(w, h, n, self.lf), self.specials, text)
                         for w, h, n in video_shapes)
        return total

    def template_overhead(self, roles: Sequence[str], has_system: bool = False,
                          text: TextCounter | None = None) -> int:
        """Non-content tokens the template adds to a conversation with these roles (user/assistant...): the prefix,
        the system slot (``has_system``: the record brings its own prompt, counted as content) or else the whole
        default system block, every role's slot, and the empty thoughts of a reasoning template (for answers
        without ``<think>``). ``text`` only counts slots with no known constant (default: the estimate)."""
        text = text or _estimate
        tpl = self.template
        total = tpl.prefix_tokens if tpl.prefix_tokens is not None else count_with_specials(tpl.prefix, tpl.specials,
                                                                                            text)
        total += tpl.slot_tokens("system", text) if has_system else tpl.system_prompt_tokens(None, self.lf, text)
        total += sum(tpl.slot_tokens(role, text) for role in roles)
        _, plan = tpl.thought_plan([""] * len(roles), self.lf)
        thought = tpl.empty_thought_tokens if tpl.empty_thought_tokens is not None else count_with_specials(
            tpl.empty_thought, tpl.specials, text)
        return total + thought * sum(side is not None for side in plan)

    def summary(self) -> dict[str, Any]:
        """The facts a user asks about, as plain data (for ``--json`` output and docs)."""
        rule = self.image
        data: dict[str, Any] = {"profile": self.name, "family": self.family, "template": self.lf_template,
                                "image_rule": rule.kind, "image_token": rule.token, "box_format": self.box_format,
                                "origin": self.origin, "image_max_pixels": self.lf.image_max_pixels}
        if isinstance(rule, QwenImages):
            data.update(patch_size=rule.patch_size, merge_size=rule.merge_size, factor=rule.factor,
                        min_pixels=rule.min_pixels, max_pixels=rule.max_pixels)
        elif isinstance(rule, FixedImages):
            data.update(tokens_per_image=rule.tokens_per_image, image_size=rule.image_size)
        else:
            data.update(tile_size=rule.tile_size, tokens_per_tile=rule.tokens_per_tile, max_tiles=rule.max_tiles,
                        crop_to_patches=rule.crop_to_patches)
        return data



def _estimate(text: str) -> int:
    from ..tokens import estimate_text_tokens  # lazy: tokens.py may import this module

    return estimate_text_tokens(text)


def _as_text(content: object) -> str:
    return content if isinstance(content, str) else ("" if content is None else str(content))


def _split_system(turns: Sequence[tuple[str, object]], system: str | None) -> tuple[str | None, list[tuple[str, str]]]:
    """LLaMA-Factory's converters move a leading system message into ``_system``."""
    messages = [(role, _as_text(content)) for role, content in turns]
    if messages and messages[0][0] == "system":
        system = messages[0][1] if system is None else system
        messages = messages[1:]
    return system, messages


def _expand_media(profile: ModelProfile, contents: list[str], image_sizes: list[tuple[int, int]],
                  video_shapes: list[tuple[int, int, int]], expand: bool) -> list[str]:
    """The plugin's ``process_messages``: each ``<image>``/``<video>`` in order becomes its placeholder text."""
    n_images = sum(c.count(IMAGE_PLACEHOLDER) for c in contents)
    n_videos = sum(c.count(VIDEO_PLACEHOLDER) for c in contents)
    if n_images != len(image_sizes) or n_videos != len(video_shapes):
        raise ValueError(f"The number of images does not match the number of {IMAGE_PLACEHOLDER} tokens "
                         f"({n_images} placeholders, {len(image_sizes)} images; {n_videos} video placeholders, "
                         f"{len(video_shapes)} videos)")
    images, videos = iter(image_sizes), iter(video_shapes)
    rule, lf = profile.image, profile.lf

    def image_text(w: int, h: int) -> str:
        if not expand:
            return rule.compact(w, h, lf)
        if isinstance(rule, FixedImages):
            return rule.compact(w, h, lf, pads=True)
        compact = rule.compact(w, h, lf)
        return compact.replace(rule.end, rule.token * rule.tokens(w, h, lf) + rule.end, 1)

    def video_text(w: int, h: int, n: int) -> str:
        video = profile._video()
        compact = video.compact(w, h, n, lf)
        if not expand:
            return compact
        t, gh, gw = video.grid(w, h, n, lf)
        if video.timestamps:
            return compact.replace(video.end, video.token * (gh * gw // video.merge_size ** 2) + video.end)
        return compact.replace(video.end, video.token * video.tokens(w, h, n, lf) + video.end, 1)

    out = []
    for content in contents:
        while IMAGE_PLACEHOLDER in content:
            content = content.replace(IMAGE_PLACEHOLDER, image_text(*next(images)), 1)
        while VIDEO_PLACEHOLDER in content:
            content = content.replace(VIDEO_PLACEHOLDER, video_text(*next(videos)), 1)
        out.append(content)
    return out
