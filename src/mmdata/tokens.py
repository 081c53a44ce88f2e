"""Token budget of a record as LLaMA-Factory feeds it to the model: text, chat template and image tokens vs
``cutoff_len``.

Pure functions plus one small accumulator, so the build summary, ``mmdata validate``, ``mmdata report`` and
``mmdata llamafactory`` count the same way. What depends on the model (its chat template, default system prompt,
image rule, wrapper tokens) comes from a :class:`~mmdata.profiles.ModelProfile` (Qwen2-VL unless told otherwise);
this module adds how text is counted (exact with a tokenizer; without one, :func:`estimate_text_tokens`, which says
it is an estimate) and the Qwen2-VL image functions older callers use (:func:`image_tokens`, :func:`smart_resize`,
:func:`lf_image_size`: thin wrappers over the profile rules).

:class:`TokenBudget` keeps a fixed-width histogram, never the lengths themselves: memory does not grow with the
number of records, and the suggested cutoff is exact to one bucket (rounded up, so it never under-suggests).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .errors import MmdataError
from .profiles import ModelProfile, get_profile, load_profile, vision

# LLaMA-Factory's DataArguments/ModelArguments defaults.
IMAGE_MAX_PIXELS = 768 * 768
IMAGE_MIN_PIXELS = 32 * 32
# Qwen2-VL-*-Instruct preprocessor_config.json (transformers' class defaults differ: max 28*28*1280; with
# LLaMA-Factory's image_max_pixels below both, the difference never shows).
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 12845056
PATCH_SIZE = 14
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28

# Qwen2-VL chat template, as LLaMA-Factory's ``qwen2_vl`` template writes it (token counts of the Qwen2 tokenizer):
#   "<|im_start|>" role "\n" content "<|im_end|>" "\n"   -> 3 tokens before the content, 2 after; the default system
# prompt "You are a helpful assistant." is 6. The qwen2_vl profile holds the same numbers; the tests check it does.
TURN_OVERHEAD = 5
LF_CUTOFF_LEN = 2048  # LLaMA-Factory's default cutoff_len, what a build's summary measures against
DEFAULT_SYSTEM_TOKENS = 6


# ------------------------------------------------------------------------------------------------------ images


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = PROCESSOR_MIN_PIXELS,
                 max_pixels: int = PROCESSOR_MAX_PIXELS) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize`` with Qwen2-VL's defaults (:func:`mmdata.profiles.vision.smart_resize`,
    the one implementation): both sides multiples of ``factor``, the area within ``[min_pixels, max_pixels]``.
    Raises ``ValueError`` past 200:1, as transformers does (LLaMA-Factory's plugin pre-crops such images)."""
    return vision.smart_resize(height, width, factor, min_pixels, max_pixels)


def qwen2vl_image_tokens(width: int, height: int, min_pixels: int = PROCESSOR_MIN_PIXELS,
                         max_pixels: int = PROCESSOR_MAX_PIXELS) -> int:
    """``<|image_pad|>`` tokens the Qwen2-VL processor makes of a ``width`` x ``height`` image: one per 28x28 block
    after :func:`smart_resize` (``grid_h * grid_w / merge_size**2``)."""
    h_bar, w_bar = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return (h_bar // PATCH_SIZE) * (w_bar // PATCH_SIZE) // (MERGE_SIZE ** 2)


def lf_image_size(width: int, height: int, image_max_pixels: int = IMAGE_MAX_PIXELS,
                  image_min_pixels: int = IMAGE_MIN_PIXELS) -> tuple[int, int]:
    """The size LLaMA-Factory's Qwen2-VL plugin hands the processor (:func:`mmdata.profiles.vision.qwen_lf_resize`):
    scaled into ``[image_min_pixels, image_max_pixels]`` (truncating like its ``int(width * factor)``), sides at
    least 28, aspect ratio at most 180:1 once it passes 200:1. Total over positive sizes: a side LLaMA-Factory would
    shrink to 0 pixels counts as 1 (:func:`lf_image_problem` says such an image cannot be trained)."""
    return vision.qwen_lf_resize(width, height, image_max_pixels, image_min_pixels)


def lf_image_problem(width: int, height: int, image_max_pixels: int = IMAGE_MAX_PIXELS) -> str | None:
    """Why LLaMA-Factory cannot train on a ``width`` x ``height`` image at ``image_max_pixels``, or None: its shrink
    truncates a side below ``1 / factor`` to 0 and PIL's resize raises (:func:`mmdata.profiles.vision.lf_image_problem`)."""
    return vision.lf_image_problem(width, height, image_max_pixels)


def image_tokens(width: int, height: int, max_pixels: int = IMAGE_MAX_PIXELS, min_pixels: int = IMAGE_MIN_PIXELS,
                 processor_min_pixels: int = PROCESSOR_MIN_PIXELS,
                 processor_max_pixels: int = PROCESSOR_MAX_PIXELS) -> int:
    """Image tokens of one image in LLaMA-Factory training: ``max_pixels``/``min_pixels`` are LLaMA-Factory's
    ``image_max_pixels``/``image_min_pixels``; the two wrapper tokens ``<|vision_start|>``/``<|vision_end|>`` are not included."""
    w, h = lf_image_size(width, height, max_pixels, min_pixels)
    return qwen2vl_image_tokens(w, h, processor_min_pixels, processor_max_pixels)


# -------------------------------------------------------------------------------------------------------- text

# Qwen2's pre-tokenizer splits letters runs, single digits, punctuation runs and whitespace; BPE then merges within
# a piece. Estimated tokens per piece: CJK 1 per character (Qwen merges common pairs, so this leans high), a Latin
# word 1 per 5 letters (one for most words), a digit 1, punctuation 1 per 2 characters, a whitespace run 1 unless it
# is a single space (it merges into the next word). One regex whose every match is one estimated token, so the count
# is a single C-level pass: builds count every record.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\u3040-\u30ff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W\d_]{{1,5}}|\d|[^\w\s]{{1,2}}|_{{1,2}}|\s{{2,}}|\n|\s\Z")


@functools.lru_cache(maxsize=256)  # a build asks for the same prompt, and each answer twice
def estimate_text_tokens(text: str) -> int:
    """Qwen2 tokens of ``text`` without a tokenizer: an estimate that leans high (Chinese is counted one token per
    character where Qwen2 averages ~1.4 characters per token), so a cutoff chosen from it rarely truncates. Expect
    +-25% per record; say "estimated" wherever it is shown, and pass a tokenizer for exact counts."""
    return len(_TOKEN.findall(text))


@dataclass(frozen=True)
class TokenCounter:
    """How text becomes tokens (a tokenizer or the estimate), the model whose template and image rule count (a
    :class:`~mmdata.profiles.ModelProfile`, Qwen2-VL by default) and LLaMA-Factory's image bounds; ``label`` says
    which."""

    text: Callable[[str], int] = estimate_text_tokens
    exact: bool = False
    label: str = "estimated without a tokenizer (pass --tokenizer for exact counts)"
    image_max_pixels: int = IMAGE_MAX_PIXELS
    image_min_pixels: int = IMAGE_MIN_PIXELS
    profile: ModelProfile = field(default_factory=get_profile)

    @functools.cached_property
    def model(self) -> ModelProfile:
        """The profile with this counter's LLaMA-Factory image bounds (made once, used for every record)."""
        return self.profile.with_lf_args(image_max_pixels=self.image_max_pixels, image_min_pixels=self.image_min_pixels)

    def image(self, width: int, height: int) -> int:
        """All tokens one image adds (placeholder pads and their wrappers)."""
        return self.model.image_total_tokens(width, height, self.text)


def token_counter(tokenizer: object = None, image_max_pixels: int | None = None,
                  image_min_pixels: int | None = None, model: str | os.PathLike | None = None) -> TokenCounter:
    """A :class:`TokenCounter`: ``tokenizer`` is a path or hub name for ``transformers.AutoTokenizer`` (local files
    only: validation never downloads) or an object with ``encode``; ``None`` means the honest estimate. ``model`` is
    a profile name (``qwen3_vl``) or a local model folder, whose own settings win and whose tokenizer, if it has one,
    counts the text exactly."""
    profile = load_profile(model)
    if tokenizer is None and model is not None and has_tokenizer(model):
        tokenizer = model
    images = {"image_max_pixels": image_max_pixels or profile.lf.image_max_pixels,
              "image_min_pixels": image_min_pixels or profile.lf.image_min_pixels, "profile": profile}
    if tokenizer is None:
        return TokenCounter(label=f"estimated for {profile.name} without a tokenizer (pass --tokenizer for exact "
                                  "counts)" if model is not None else TokenCounter.label, **images)
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise MmdataError("--tokenizer needs transformers: pip install 'mmdata[train]'") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as e:
            raise MmdataError(f"--tokenizer {tokenizer}: cannot load it ({str(e).splitlines()[0]}); pass a local "
                              "folder with tokenizer.json, e.g. a downloaded Qwen2-VL checkpoint") from None
    encode = tokenizer.encode
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    return TokenCounter(lambda text: len(encode(text, add_special_tokens=False)), True,
                        f"counted with the tokenizer {name} for {profile.name}", **images)


def has_tokenizer(model: str | os.PathLike) -> bool:
    folder = os.path.expanduser(str(model))
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f))
                                         for f in ("tokenizer.json", "tokenizer_config.json"))


def record_tokens(turns: Sequence[tuple[str, object]], image_sizes: Iterable[tuple[int, int]],
                  counter: TokenCounter | None = None) -> int:
    """Tokens of one record as LLaMA-Factory lays it out under the counter's model profile (its chat template, default
    system prompt, image rule): with a tokenizer the rendered template is counted string by string, which matches
    LLaMA-Factory token for token; the estimate counts the contents and adds each template slot's known length."""
    counter = counter or _DEFAULT_COUNTER
    return counter.model.record_tokens(turns, image_sizes, counter.text, exact=counter.exact)


_DEFAULT_COUNTER = TokenCounter()


# ------------------------------------------------------------------------------------------------------ budget


@dataclass
class TokenBudget:
    """Streaming token statistics against ``cutoff_len``: feed it record by record with :meth:`add`.

    Memory is a histogram of ``bucket``-token bins (a few hundred entries for real data), so the 99% cutoff it
    suggests is rounded up to a bin edge. ``over_examples`` keeps the first few record indices over the cutoff.
    """

    cutoff_len: int | None = None
    counter: TokenCounter = field(default_factory=TokenCounter)
    bucket: int = 16
    count: int = 0
    over: int = 0
    max_tokens: int = 0
    total_tokens: int = 0
    over_examples: list[int] = field(default_factory=list)
    _hist: Counter = field(default_factory=Counter, repr=False)

    def add(self, turns: Sequence[tuple[str, object]], image_sizes: Iterable[tuple[int, int]] = (),
            record: int | None = None) -> int:
        """Count one record (turns as ``(role, content)``, image sizes as ``(width, height)``); returns its tokens."""
        return self.add_length(record_tokens(turns, image_sizes, self.counter), record)

    def add_length(self, tokens: int, record: int | None = None) -> int:
        """Count one record whose token length is already known."""
        self.count += 1
        self.total_tokens += tokens
        self.max_tokens = max(self.max_tokens, tokens)
        self._hist[tokens // self.bucket] += 1
        if self.cutoff_len is not None and tokens > self.cutoff_len:
            self.over += 1
            if record is not None and len(self.over_examples) < 5:
                self.over_examples.append(record)
        return tokens

    def merge(self, other: TokenBudget) -> None:
        """Add another budget's counts (parallel workers, several datasets)."""
        self.count += other.count
        self.over += other.over
        self.total_tokens += other.total_tokens
        self.max_tokens = max(self.max_tokens, other.max_tokens)
        self._hist.update(other._hist)
        self.over_examples = (self.over_examples + other.over_examples)[:5]

    def to_json(self) -> dict:
        """The counts only (a build's task markers carry them to finalize); see :meth:`from_json`."""
        return {"count": self.count, "over": self.over, "max": self.max_tokens, "total": self.total_tokens,
                "hist": {str(b): n for b, n in sorted(self._hist.items())}}

    @classmethod
    def from_json(cls, data: dict, **options) -> TokenBudget:
        budget = cls(**options)
        budget.count, budget.over, budget.max_tokens = data["count"], data["over"], data["max"]
        budget.total_tokens = data["total"]
        budget._hist = Counter({int(b): n for b, n in data["hist"].items()})
        return budget

    def percentile(self, q: float = 0.99) -> int:
        """The smallest length (rounded up to a bin edge, capped at the max) that ``q`` of the records fit in."""
        if not self.count:
            return 0
        need, seen = math.ceil(q * self.count), 0
        for b in sorted(self._hist):
            seen += self._hist[b]
            if seen >= need:
                return min((b + 1) * self.bucket - 1, self.max_tokens)
        return self.max_tokens

    def suggested_cutoff(self, q: float = 0.99, step: int = 64) -> int:
        """A ``cutoff_len`` that keeps ``q`` of the records whole, rounded up to a multiple of ``step``."""
        return max(step, math.ceil(self.percentile(q) / step) * step)

    def summary(self) -> dict:
        return {"records": self.count, "max": self.max_tokens,
                "mean": round(self.total_tokens / self.count, 1) if self.count else 0,
                "p50": self.percentile(0.5), "p99": self.percentile(0.99), "cutoff_len": self.cutoff_len,
                "over_cutoff": self.over, "suggested_cutoff_len": self.suggested_cutoff() if self.count else None,
                "exact": self.counter.exact, "counted": self.counter.label,
                "image_max_pixels": self.counter.image_max_pixels, "model": self.counter.profile.name}

    def format(self) -> str:
        """One line for the build summary or the validate report."""
        if not self.count:
            return "tokens: no records"
        s = self.summary()
        line = f"tokens, {self.counter.label}: max {s['max']}, mean {s['mean']}, p99 {s['p99']}"
        if self.cutoff_len is not None:
            pct = 100 * self.over / self.count
            line += f"; {self.over} of {self.count} records ({pct:.1f}%) over cutoff_len {self.cutoff_len}"
        return line + f"; cutoff_len {s['suggested_cutoff_len']} keeps 99%"
