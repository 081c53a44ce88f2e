"""Chat templates as LLaMA-Factory 0.9.5's ``data/template.py`` writes them (qwen2_vl, qwen3_vl, qwen3_vl_nothink,
gemma3, intern_vl): the per-role slots, default system prompts and the thought handling of reasoning templates."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ._common import LfArgs, TextCounter

# ----------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class ChatTemplate:
    """A LLaMA-Factory chat template (data/template.py ``register_template``), as the strings it encodes.

    ``user``/``assistant``/``system``/``observation`` are the single-string slots of the template's formatters,
    ``{{content}}`` marking the message; ``prefix`` is ``format_prefix`` as text (``<bos>`` for Gemma 3, whose
    tokenizer maps it to the bos id). ``system_in_first_user`` is ``Llama2Template``: the system text is prepended to
    the first user message instead of getting a block of its own. ``reasoning`` is ``ReasoningTemplate``: an
    assistant turn without ``<think>``/``</think>`` gets the empty thought ``"<think>\\n\\n</think>\\n\\n"``.

    The ``*_tokens`` fields are the non-content token counts of each slot in the model's real tokenizer (used when
    counting without one); ``None`` means "not known offline", and the slot's text is then estimated with the text
    counter, each special token counted once. With a tokenizer, :meth:`ModelProfile.render` gives the exact strings.
    """

    name: str
    user: str
    assistant: str
    system: str
    observation: str
    default_system: str = ""
    prefix: str = ""
    system_in_first_user: bool = False
    reasoning: bool = False
    thought_words: tuple[str, str] = ("<think>\n", "\n</think>\n\n")
    specials: tuple[str, ...] = ()
    prefix_tokens: int | None = 0
    user_tokens: int | None = None
    assistant_tokens: int | None = None
    system_tokens: int | None = None
    observation_tokens: int | None = None
    default_system_tokens: int | None = None
    empty_thought_tokens: int | None = None

    @property
    def empty_thought(self) -> str:
        return self.thought_words[0] + self.thought_words[1]

    def remove_thought(self, content: str) -> str:
        """``Template.remove_thought``: drop ``<think>\\n...\\n</think>\\n\\n`` blocks, then leading newlines."""
        start, end = (re.escape(w) for w in self.thought_words)
        return re.sub(f"{start}(.*?){end}", "", content, flags=re.DOTALL).lstrip("\n")

    def has_thought(self, content: str) -> bool:
        return self.thought_words[0].strip() in content or self.thought_words[1].strip() in content

    def slot(self, role: str) -> str:
        return {"user": self.user, "assistant": self.assistant, "system": self.system,
                "observation": self.observation, "function": self.assistant}.get(role, self.user)

    def slot_tokens(self, role: str, text: TextCounter) -> int:
        """Non-content tokens of one ``role`` slot: the real-tokenizer constant, else estimated."""
        known = {"user": self.user_tokens, "assistant": self.assistant_tokens, "system": self.system_tokens,
                 "observation": self.observation_tokens, "function": self.assistant_tokens}.get(role, self.user_tokens)
        if known is not None:
            return known
        return count_with_specials(self.slot(role).replace("{{content}}", ""), self.specials, text)

    def system_prompt_tokens(self, system: str | None, lf: LfArgs, text: TextCounter) -> int:
        """Tokens of the system block (slot and text; 0 when there is none): the known count of the default prompt
        when it is the one used, else ``text`` of the prompt."""
        prompt = self.system_prompt(system, lf)
        if not prompt:
            return 0
        default_used = not system and (lf.default_system is None or lf.default_system == self.default_system)
        known = self.default_system_tokens if default_used else None
        return self.slot_tokens("system", text) + (known if known is not None else text(prompt))

    def system_prompt(self, system: str | None, lf: LfArgs) -> str:
        """``Template._encode``'s ``system or self.default_system`` (``default_system`` from LF args wins)."""
        default = self.default_system if lf.default_system is None else lf.default_system
        return system or default

    def thought_plan(self, contents: Sequence[str], lf: LfArgs) -> tuple[list[str], list[int | None]]:
        """``ReasoningTemplate.encode_multiturn``: the assistant contents after thought removal, and for each turn
        pair where the empty thought goes: ``0`` prompt side (no loss), ``1`` response side, ``None`` nowhere."""
        contents = list(contents)
        if not self.reasoning:
            return contents, [None] * ((len(contents) + 1) // 2)
        if lf.enable_thinking is False:
            contents = [self.remove_thought(c) if i % 2 else c for i, c in enumerate(contents)]
        discarding = lf.mask_history and not lf.preserve_thinking
        if discarding:
            contents = [self.remove_thought(c) if i % 2 and i < len(contents) - 2 else c for i, c in enumerate(contents)]
        plan: list[int | None] = []
        for i in range(0, len(contents), 2):
            last = i == len(contents) - 2
            if (discarding and not last) or i + 1 >= len(contents) or self.has_thought(contents[i + 1]):
                plan.append(None)
            else:
                plan.append(1 if lf.enable_thinking else 0)
        return contents, plan


def count_with_specials(text_value: str, specials: Sequence[str], text: TextCounter) -> int:
    """Tokens of ``text_value`` where every special token counts once and the text between them goes to ``text``:
    how Hugging Face tokenizers treat added special tokens (split out first, the rest encoded piece by piece).

    Memoised: the strings counted here are template slots and image wrappers, the same few for every record."""
    return _count_with_specials(text_value, tuple(specials), text)


@functools.lru_cache(maxsize=64)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(set(specials), key=len, reverse=True)) + ")")


@functools.lru_cache(maxsize=1 << 14)
def _count_with_specials(text_value: str, specials: tuple[str, ...], text: TextCounter) -> int:
    if not text_value:
        return 0
    if not specials:
        return text(text_value)
    total = 0
    for i, piece in enumerate(_specials_pattern(specials).split(text_value)):
        if i % 2:
            total += 1
        elif piece:
            total += text(piece)
    return total


# Strings of LLaMA-Factory 0.9.5's templates (data/template.py), verbatim.
_QWEN_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
_QWEN_ASSISTANT = "{{content}}<|im_end|>\n"
_QWEN_SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"
_QWEN_OBSERVATION = "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>", "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>")
# Qwen2 vocabulary (Qwen2-VL, Qwen2.5-VL, Qwen3-VL share it): <|im_start|> user(872) \n(198) ... <|im_end|> \n
# <|im_start|> assistant(77091) \n = 8 around a user message; <|im_end|> \n = 2 after an answer; <|im_start|>
# system(8948) \n ... <|im_end|> \n = 5; "You are a helpful assistant." = 6; "<think>" "\n\n"(271) "</think>" "\n\n" = 4.
_QWEN_COUNTS = {"user_tokens": 8, "assistant_tokens": 2, "system_tokens": 5}

QWEN2_VL_TEMPLATE = ChatTemplate(
    name="qwen2_vl", user=_QWEN_USER, assistant=_QWEN_ASSISTANT, system=_QWEN_SYSTEM, observation=_QWEN_OBSERVATION,
    default_system="You are a helpful assistant.", specials=_QWEN_SPECIALS, default_system_tokens=6, **_QWEN_COUNTS)
QWEN3_VL_TEMPLATE = ChatTemplate(
    name="qwen3_vl", user=_QWEN_USER, assistant=_QWEN_ASSISTANT, system=_QWEN_SYSTEM, observation=_QWEN_OBSERVATION,
    reasoning=True, specials=_QWEN_SPECIALS + ("<think>", "</think>"), default_system_tokens=0,
    empty_thought_tokens=4, **_QWEN_COUNTS)
QWEN3_VL_NOTHINK_TEMPLATE = replace(QWEN3_VL_TEMPLATE, name="qwen3_vl_nothink", reasoning=False)
# Gemma vocabulary: <bos>; <start_of_turn> user \n ... <end_of_turn> \n <start_of_turn> model \n = 8;
# <end_of_turn> \n = 2; the system text is followed by "\n\n" (one token) inside the first user message.
GEMMA3_TEMPLATE = ChatTemplate(
    name="gemma3", user="<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
    assistant="{{content}}<end_of_turn>\n", system="{{content}}\n\n",
    observation="<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n", prefix="<bos>",
    system_in_first_user=True,
    specials=("<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    prefix_tokens=1, user_tokens=8, assistant_tokens=2, system_tokens=1, default_system_tokens=0)
# InternVL-hf uses Qwen2.5's vocabulary (counts as for Qwen); whether its tokenizer has a bos token (format_prefix
# {"bos_token"}) is not known offline: counted as none, like Qwen2's tokenizer. Its default system prompt is
# estimated.
INTERN_VL_TEMPLATE = ChatTemplate(
    name="intern_vl", user=_QWEN_USER, assistant=_QWEN_ASSISTANT, system=_QWEN_SYSTEM, observation=_QWEN_USER,
    default_system="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    specials=("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"), observation_tokens=8,
    **_QWEN_COUNTS)
