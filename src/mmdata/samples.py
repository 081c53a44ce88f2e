"""The canonical sample: one conversation plus the media it refers to, validated by the rules LLaMA-Factory applies.

Every source normalises into :class:`Sample`; every writer reads from it. The rules live in
:func:`conversation_problems` so that the build (which rejects a record on its first problem) and ``mmdata validate``
(which lists every problem of every record) apply exactly the same checks.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

Role = Literal["system", "user", "assistant"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> bool:
    """True when UTF-8 can carry ``text``: it holds no surrogate code point (see :func:`utf8_text`)."""
    return _SURROGATE.search(text) is None


def utf8_text(text: str) -> str:
    """``text`` with every lone UTF-16 surrogate replaced by U+FFFD (a surrogate pair split into two code points is
    joined back into its character).

    JSON may spell half a character (``"q\\ud83d"``: scraped text cut between the two halves of an emoji), and
    Python's ``json`` reads it into a ``str`` that UTF-8 cannot encode, so writing it fails; escaping it instead
    (``ensure_ascii``) gives a file that pyarrow, LLaMA-Factory's JSON loader, refuses ("The surrogate pair in string
    is invalid"). The half carries nothing to keep, so it becomes U+FFFD, as any UTF-8 decoder does with a broken
    sequence, and the rest of the record is kept rather than rejected. A no-op (one regex scan) on valid text."""
    if encodable(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Message(BaseModel):
    """One turn. Content is plain text; media appear as ``<image>``/``<video>`` placeholders inside it. Content that
    UTF-8 cannot carry (lone surrogates) is repaired on the way in, see :func:`utf8_text`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str

    @field_validator("content")
    @classmethod
    def _encodable(cls, content: str) -> str:
        return utf8_text(content)


class Sample(BaseModel):
    """A training record in LLaMA-Factory's sharegpt ``messages`` shape.

    ``images``/``videos`` hold paths (relative to the dataset folder once written). Validation context
    ``{"allow_empty_answer": True}`` accepts an empty final assistant turn, for prediction-only sets.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[Message]
    images: list[str] = []
    videos: list[str] = []

    @field_validator("images", "videos")
    @classmethod
    def _encodable_paths(cls, paths: list[str]) -> list[str]:
        """A path is refused rather than repaired: with U+FFFD in it, it would name another file."""
        for path in paths:
            if not encodable(path):
                raise ValueError(f"path {utf8_text(path)!r} is not valid Unicode (a lone surrogate): UTF-8 files "
                                 "cannot carry it")
        return paths

    @model_validator(mode="after")
    def _conversation_rules(self, info: ValidationInfo) -> Sample:
        allow_empty = bool((info.context or {}).get("allow_empty_answer", False))
        problems = conversation_problems(
            [(m.role, m.content) for m in self.messages], len(self.images), len(self.videos), allow_empty
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json_line(self) -> str:
        """Compact, key-ordered JSON (non-ASCII kept readable): the exact bytes written to data files."""
        record: dict = {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        if self.images:
            record["images"] = list(self.images)
        if self.videos:
            record["videos"] = list(self.videos)
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


#: The models' own media tokens. Written as text, LLaMA-Factory's tokenizer makes each one a media token, one more than
#: the images have features for, and training stops ("Image features and image tokens do not match").
MODEL_MEDIA_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<image_soft_token>", "<IMG_CONTEXT>")


def conversation_problems(
    turns: list[tuple[str, object]], n_images: int, n_videos: int = 0, allow_empty_answer: bool = False
) -> list[str]:
    """Return every rule a conversation breaks, as messages that say what to fix (empty list: valid).

    Rules (what LLaMA-Factory's sharegpt converter and the Qwen2-VL plugin accept): at most one system message and
    only first; then user/assistant alternate starting with user and ending with assistant; user content not empty;
    assistant content not empty unless the set is for prediction; ``<image>`` count (outside the system prompt, which
    LLaMA-Factory takes out first) equals the number of images and ``<video>`` count the number of videos; no
    model media token (``<|image_pad|>``...) in the text.
    """
    problems: list[str] = []
    if not turns:
        return ["no messages: a sample needs at least one user and one assistant turn"]
    for i, (_, content) in enumerate(turns):
        if not isinstance(content, str):
            problems.append(f"message {i} content is {type(content).__name__}, expected a string")
    roles = [role for role, _ in turns]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        problems.append("a system message may only come first (merge it into the first one)")
    if not body:
        problems.append("only a system message: add a user and an assistant turn")
    else:
        for i, role in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if role not in ("user", "assistant", "system"):
                problems.append(f"unknown role {role!r}: use system, user or assistant")
                break
            if role != expected and role != "system":
                problems.append(
                    f"turn {i + (len(roles) - len(body))} is {role!r} but {expected!r} was expected: "
                    "turns must alternate user/assistant starting with user"
                )
                break
        else:
            if body[-1] != "assistant":
                problems.append("the conversation ends with a user turn: add the assistant answer or drop that turn")
    for i, (role, content) in enumerate(turns):
        if not isinstance(content, str):
            continue
        if role == "user" and not content.strip():
            problems.append(f"message {i} (user) is empty")
        if role == "assistant" and not content.strip():
            is_last = i == len(turns) - 1
            if not (allow_empty_answer and is_last):
                problems.append(f"message {i} (assistant) is empty")
    # LLaMA-Factory takes the system prompt out of the messages before it counts placeholders against the media
    system = "".join(c for r, c in turns if isinstance(c, str) and r == "system")
    if IMAGE_PLACEHOLDER in system or VIDEO_PLACEHOLDER in system:
        problems.append(f"a {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} placeholder in the system prompt: LLaMA-Factory "
                        "takes the system prompt out before matching placeholders to media; move it to a user turn")
    text = "".join(c for r, c in turns if isinstance(c, str) and r != "system")
    n_image_tags = text.count(IMAGE_PLACEHOLDER)
    if n_image_tags != n_images:
        elsewhere = sum(c.count(IMAGE_PLACEHOLDER) for r, c in turns if isinstance(c, str) and r == "assistant")
        where = f" ({elsewhere} of them in assistant text, where no image goes)" if elsewhere else ""
        problems.append(
            f"{n_image_tags} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s){where}: "
            "each image needs exactly one placeholder in the text"
        )
    n_video_tags = text.count(VIDEO_PLACEHOLDER)
    if n_video_tags != n_videos:
        problems.append(f"{n_video_tags} {VIDEO_PLACEHOLDER} placeholder(s) but {n_videos} video(s)")
    everything = "".join(c for _, c in turns if isinstance(c, str))
    for token in MODEL_MEDIA_TOKENS:
        if token in everything:
            problems.append(f"the text holds the model token {token}: the tokenizer makes it a media token with no "
                            "image behind it and LLaMA-Factory stops training ('Image features and image tokens do "
                            f"not match'); remove it (an image goes in the text as {IMAGE_PLACEHOLDER})")
    return problems


#: LLaMA-Factory lets an observation stand where a user turn goes and a function call where an assistant turn goes.
_LF_TURN_ROLES = {"observation": "user", "function": "assistant"}


def lf_conversation_problems(turns: list[tuple[str, object]], n_images: int, n_videos: int = 0,
                             allow_empty_answer: bool = False) -> list[str]:
    """:func:`conversation_problems` of a record read with LLaMA-Factory's roles (``lfdata.to_turns``), its
    tool turns counted as the user or assistant turns they stand for: what ``validate`` reports, what the trainer
    drops and what ``predict`` skips."""
    return conversation_problems([(_LF_TURN_ROLES.get(r, r), c) for r, c in turns], n_images, n_videos,
                                 allow_empty_answer)


def sample_json_schema() -> dict:
    """JSON Schema of a written record (``mmdata schema sample``)."""
    return Sample.model_json_schema()
