"""Training data for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: mmdata / LLaMA-Factory records -> token ids, labels, M-RoPE
positions, pixels.

The data path, and why it is shaped like this:

- Records are read with :mod:`mmdata.lfdata` (the same reader as ``mmdata validate``), so sharegpt and alpaca
  output, custom ``columns``/``tags`` and folders of JSONL shards all work.
- Text goes through the processor's own chat template. Each assistant turn's span is found by rendering the
  conversation up to that turn (with and without it), so the labels are exactly the assistant content and its end
  token (``<|im_end|>``) and every other token is ``-100``, whatever the template.
- Text is tokenised once, up front, in segments (like LLaMA-Factory), which also gives every sample's exact length
  before any image is decoded: the vision token count follows from the image size, sized as LLaMA-Factory sizes it
  (:func:`trained_size`: its plugin's scaling into the pixel budget, then ``smart_resize`` to multiples of
  ``patch_size * merge_size``: 28 pixels for Qwen2/2.5-VL, 32 for Qwen3-VL, read from the processor).
  Samples longer than ``cutoff_len`` are dropped and counted, never cut (a cut could split an image's tokens).
- Images are decoded, resized to that precomputed size and turned into patches in ``__getitem__``, i.e. in
  DataLoader workers; the sample is built directly as tensors (no list round trips), and the 3-D M-RoPE positions
  are computed there too, on the CPU, so the GPU step never runs ``get_rope_index``'s Python loops (for images the
  three families' ``get_rope_index`` agree, see ``families.py``; the model then needs no ``mm_token_type_ids`` and,
  for Qwen2.5-VL, no ``second_per_grid_ts``, which only video grids have).
- The collator makes either length-grouped padded micro-batches or one padding-free packed row per micro-batch
  (with flash attention, where packing costs no attention FLOPs). It also precomputes which positions need
  logits (those followed by a label), so the step projects only those onto the 151,936-token vocabulary.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import MmdataError, SampleError
from ..images import image_info
from ..layout import MANIFEST, manifest_dataset_info, read_manifest
from ..lfdata import DATA_CONFIG, data_files, iter_file_records, parse_entry, read_dataset_info, to_turns
from ..profiles.vision import qwen_lf_resize
from ..samples import lf_conversation_problems
from ..tokens import smart_resize
from .config import TrainError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


# ----------------------------------------------------------------------------------------------------------------
# which entries of a build are the train / val split


def resolve_split(dataset: str | Path, split: str, names: list[str] | None = None) -> tuple[Path, list[str]]:
    """``(dataset_info.json path, entry names)`` of one split of a build folder (or of a ``dataset_info.json``).

    Names given explicitly win. Otherwise the build manifest's ``datasets`` map says which entry is which split;
    without a manifest, entries named ``*_train`` / ``*_val`` are used, and a lone entry counts as ``train``.
    """
    path = Path(dataset)
    manifest = None
    if path.is_dir() and (path / MANIFEST).is_file():  # a build folder: its manifest says where it registered
        manifest = read_manifest(path, TrainError)
        info_path = manifest_dataset_info(path, manifest)
    else:
        info_path = path / DATA_CONFIG if path.is_dir() else path
    info = read_dataset_info(info_path)
    if names:
        missing = [n for n in names if n not in info]
        if missing:
            raise TrainError(f"{info_path}: no entry {', '.join(missing)}; known entries: {', '.join(sorted(info))}")
        return info_path, list(names)
    for build in [manifest] if manifest else _builds_of(info_path, info):
        found = [n for n, d in build.get("datasets", {}).items() if (d or {}).get("split", "train") == split and n in info]
        if found:
            return info_path, found
    found = [n for n in info if n.endswith(f"_{split}")]
    if not found and split == "train" and len(info) == 1:
        found = list(info)
    return info_path, found


def _builds_of(info_path: Path, info: dict) -> Iterator[dict]:
    """The manifests of the builds whose datasets ``info`` registers: beside ``dataset_info.json`` (a build into its
    folder), else in the folder holding each entry's data (``output.dataset_info`` pointing elsewhere)."""
    folders = [info_path.parent] + [(info_path.parent / e["file_name"]).parent for e in info.values()
                                    if isinstance(e, dict) and isinstance(e.get("file_name"), str)]
    for folder in dict.fromkeys(folders):
        if (folder / MANIFEST).is_file():
            with contextlib.suppress(MmdataError):
                yield read_manifest(folder)


def read_conversations(info_path: Path, names: list[str]) -> list[tuple[list, list[str]]]:
    """``(turns, image paths resolved against the dataset folder)`` for every record of the named entries."""
    info = read_dataset_info(info_path)
    out = []
    for name in names:
        attr = parse_entry(name, info[name])
        if attr.load_from != "file":
            raise TrainError(f"entry {name!r} is not a local file ({attr.load_from}); build it with mmdata first")
        messages = attr.column("messages") if attr.formatting in ("sharegpt", "openai") else None
        for file in data_files(info_path.parent, attr):
            if not file.exists():
                raise TrainError(f"{info_path}: entry {name!r} names {attr.dataset_name!r}, which does not exist in "
                                 f"{info_path.parent}")
            for record in iter_file_records(file):
                if messages and isinstance(record, dict) and messages not in record:
                    raise TrainError(f"{file}: a record has no {messages!r}, the column entry {name!r} maps messages "
                                     f"to (its keys: {', '.join(map(repr, record))}); fix columns.messages in "
                                     f"{info_path}")
                turns, images, _videos = to_turns(record, attr)
                out.append((turns, [str(info_path.parent / p) if not Path(p).is_absolute() else p for p in images]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# text: chat template -> segments -> token ids and labels


def to_messages(turns: list) -> list[dict]:
    """HF chat messages; a user/system ``<image>`` placeholder becomes an ``{"type": "image"}`` part in place."""
    messages = []
    for role, content in turns:
        text = content if isinstance(content, str) else str(content)
        if IMAGE_PLACEHOLDER in text and role != "assistant":
            parts: list[dict] = []
            for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": text})
    return messages


def render_segments(tokenizer, messages: list[dict], chat_template: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_label)`` segments.

    For assistant turn k the template is rendered for ``messages[:k]`` with the generation prompt and for
    ``messages[:k+1]``; the difference is the reply. Its label part runs up to and including the last end token
    (``eos_token``, ``<|im_end|>`` for Qwen); what follows (the newline) is context, as in LLaMA-Factory.
    """
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=gen)

    full = render(messages, False)
    eos = tokenizer.eos_token
    segments, pos = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:k], True))
        end = len(render(messages[: k + 1], False))
        reply = full[start:end]
        cut = reply.rfind(eos) + len(eos) if eos and eos in reply else len(reply)
        if start < pos or not full.startswith(render(messages[:k], True)):
            raise ValueError("the chat template is not prefix-stable; cannot locate assistant turns")
        segments += [(full[pos:start], False), (reply[:cut], True)]
        pos = start + cut
    segments.append((full[pos:], False))
    return [(t, lab) for t, lab in segments if t]


def mrope_positions(input_ids: np.ndarray, grids: np.ndarray, image_token_id: int, merge: int) -> np.ndarray:
    """3 x L M-RoPE position ids of one unpadded sample (what ``get_rope_index`` computes, done on the CPU).

    Text tokens advance all three rows by one; an image block of ``t*h*w / merge**2`` tokens gets (temporal, row,
    column) indices offset by the current position, and the next text starts after the block's largest index.
    """
    length = len(input_ids)
    pos = np.empty((3, length), dtype=np.int64)
    is_image = input_ids == image_token_id
    current, i, image = 0, 0, 0
    while i < length:
        if is_image[i]:
            t, h, w = (int(x) for x in grids[image])
            h, w = h // merge, w // merge
            n = t * h * w
            block = np.indices((t, h, w)).reshape(3, n)
            pos[:, i: i + n] = block + current
            current += max(t, h, w)
            i += n
            image += 1
        else:
            j = i
            while j < length and not is_image[j]:
                j += 1
            pos[:, i:j] = np.arange(current, current + j - i)
            current += j - i
            i = j
    return pos


@dataclass
class EncodedSample:
    """One sample before its images are decoded: token pieces, image paths and their target sizes."""

    pieces: list[tuple[np.ndarray, bool]]  # token ids (image tokens already expanded), is_label
    images: list[str]
    sizes: list[tuple[int, int]]  # (height, width) trained at (:func:`trained_size`)
    length: int


@dataclass
class EncodeStats:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dropped": dict(self.dropped)}


class SampleEncoder:
    """Turns ``(turns, images)`` into :class:`EncodedSample` with a given tokenizer, template and pixel budget."""

    def __init__(self, processor, *, min_pixels: int, max_pixels: int, cutoff_len: int):
        self.tokenizer = processor.tokenizer
        self.chat_template = processor.chat_template or self.tokenizer.chat_template
        if not self.chat_template:
            raise TrainError("the model's processor has no chat template: add chat_template.json to the model folder")
        ip = processor.image_processor
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.min_pixels, self.max_pixels, self.cutoff_len = min_pixels, max_pixels, cutoff_len
        self.processor_bounds = processor_pixels(ip)
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if (self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id
                or not self.tokenizer("hello", add_special_tokens=False)["input_ids"]):
            raise TrainError(f"the model's tokenizer cannot encode text or does not know {self.image_token}: its "
                             "tokenizer files (tokenizer.json, vocab.json, merges.txt) are missing or not this model's")

    def target_size(self, path: str) -> tuple[int, int]:
        """The size the image is trained at. The build's header check (PIL's parse plus the end marker, not a
        decode) runs here: a cut-off file would otherwise fail in a DataLoader worker mid-training."""
        try:
            info = image_info(Path(path))
        except SampleError as e:
            raise ValueError(f"{e}: {path}") from None
        return trained_size(info.width, info.height, self.patch * self.merge, self.min_pixels, self.max_pixels,
                            self.processor_bounds)

    def encode_all(self, conversations: list[tuple[list, list[str]]]) -> tuple[list[EncodedSample], EncodeStats]:
        stats = EncodeStats()
        rendered = []
        for turns, images in conversations:
            try:
                # the rules `mmdata validate` applies (empty or null answers, a last user turn, <image> in the system
                # prompt...): raw LLaMA-Factory data that breaks them trained on "None<|im_end|>" and the like
                problems = lf_conversation_problems(turns, len(images))
                if problems:
                    raise ValueError(problems[0])
                messages = to_messages(turns)
                n_placeholders = sum(1 for m in messages if isinstance(m["content"], list)
                                     for p in m["content"] if p["type"] == "image")
                if n_placeholders != len(images):
                    raise ValueError(f"{n_placeholders} <image> placeholders but {len(images)} images")
                if not any(m["role"] == "assistant" for m in messages):
                    raise ValueError("no assistant turn")
                segments = render_segments(self.tokenizer, messages, self.chat_template)
                if sum(text.count(self.image_token) for text, _ in segments) != len(images):
                    raise ValueError(f"the text holds the image token {self.image_token} itself")
                sizes = [self.target_size(p) for p in images]
            except (ValueError, OSError) as e:  # the reason's head (before its first colon) counts it
                reason = str(e).split(":")[0][:80]
                stats.dropped[f"unreadable image: {reason}" if isinstance(e, OSError) else reason] += 1
                continue
            rendered.append((segments, images, sizes))
        # one batched tokenizer call over every text piece of every sample (pieces split around image tokens)
        texts = [piece for segs, _, _ in rendered for text, _ in segs for piece in text.split(self.image_token)]
        ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        samples = []
        for segments, images, sizes in rendered:
            counts = iter((h // self.patch) * (w // self.patch) // self.merge**2 for h, w in sizes)
            pieces = []
            for text, is_label in segments:
                chunks = []
                for k, _ in enumerate(text.split(self.image_token)):
                    if k:
                        chunks.append(np.full(next(counts), self.image_token_id, dtype=np.int64))
                    chunks.append(np.asarray(next(ids), dtype=np.int64))
                pieces.append((np.concatenate(chunks), is_label))
            length = sum(len(p) for p, _ in pieces)
            if length > self.cutoff_len:
                stats.dropped["longer than cutoff_len"] += 1
                continue
            samples.append(EncodedSample(pieces, images, sizes, length))
        stats.kept = len(samples)
        return samples, stats


# ----------------------------------------------------------------------------------------------------------------
# dataset and collator


def processor_pixels(image_processor) -> tuple[int, int]:
    """The image processor's own ``(min_pixels, max_pixels)`` (``size.shortest_edge``/``longest_edge``, areas)."""
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    low = getattr(image_processor, "min_pixels", None) or get("shortest_edge") or 56 * 56
    high = getattr(image_processor, "max_pixels", None) or get("longest_edge") or 28 * 28 * 16384
    return int(low), int(high)


def trained_size(width: int, height: int, factor: int, min_pixels: int, max_pixels: int,
                 processor_bounds: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` an image is trained (and predicted) at, as LLaMA-Factory makes it: its Qwen plugin scales
    the image into ``[min_pixels, max_pixels]`` (and squeezes one past 200:1 to 180:1), then the processor's
    ``smart_resize`` rounds that to multiples of ``factor`` within the processor's own bounds. A single
    ``smart_resize`` under ``max_pixels`` gave other sizes (1920x1080: 1008x560, LLaMA-Factory 1036x588), so
    Qwen2.5-VL's absolute box coordinates, written for LLaMA-Factory's size, ran past the image trained on, and an
    image past 200:1 was dropped."""
    w, h = qwen_lf_resize(width, height, max_pixels, min_pixels)
    return smart_resize(h, w, factor, *processor_bounds)


def pixel_bounds(min_pixels: int, max_pixels: int) -> dict:
    """The image processor's pixel budget as call kwargs: ``size: {shortest_edge, longest_edge}`` (pixel areas, not
    edges), which ``Qwen2VLImageProcessor`` reads for all three families; its ``min_pixels``/``max_pixels`` call
    kwargs are deprecated in transformers 5."""
    return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}


class VisionSFTDataset(torch.utils.data.Dataset):
    """Map-style dataset: ``__getitem__`` decodes and patches the images and returns tensors (runs in workers)."""

    def __init__(self, samples: list[EncodedSample], image_processor, image_token_id: int, merge: int,
                 min_pixels: int = 3136, max_pixels: int = 12845056):
        self.samples = samples
        self.image_processor = image_processor
        # the images arrive already resized to their trained size (a multiple of the factor within the processor's
        # own bounds, :func:`trained_size`): under those bounds the processor keeps it
        self.pixels = pixel_bounds(min_pixels, max_pixels)
        self.image_token_id = image_token_id
        self.merge = merge

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        input_ids = np.concatenate([p for p, _ in sample.pieces])
        labels = np.concatenate([p if lab else np.full(len(p), IGNORE_INDEX, dtype=np.int64)
                                 for p, lab in sample.pieces])
        item = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        grids = np.zeros((0, 3), dtype=np.int64)
        if sample.images:
            images = []
            for path, (h, w) in zip(sample.images, sample.sizes, strict=False):
                with Image.open(path) as im:
                    images.append(im.convert("RGB").resize((w, h), Image.BICUBIC))
            out = self.image_processor(images=images, return_tensors="pt", **self.pixels)
            item["pixel_values"] = out["pixel_values"]
            item["image_grid_thw"] = out["image_grid_thw"]
            grids = out["image_grid_thw"].numpy()
        item["position_ids"] = torch.from_numpy(mrope_positions(input_ids, grids, self.image_token_id, self.merge))
        return item


class LengthGroupedBatchOrder(torch.utils.data.Sampler):
    """Shuffled indices where each run of ``group`` consecutive indices has similar lengths.

    Mega-batches of ``50 * group`` random samples are sorted by length and cut into groups, and the groups are
    shuffled (HF's ``LengthGroupedSampler`` idea): padded micro-batches waste little, order stays random per epoch.
    """

    def __init__(self, lengths: list[int], group: int, seed: int = 0):
        self.lengths, self.group, self.seed, self.epoch = lengths, group, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.group * 50
        groups = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start: start + mega], key=lambda i: -self.lengths[i])
            groups += [chunk[i: i + self.group] for i in range(0, len(chunk), self.group)]
        rng.shuffle(groups)
        return iter([i for g in groups for i in g])


@dataclass
class VisionSFTCollator:
    """Stacks samples into a micro-batch (padded, or one packed row) and marks which positions need logits.

    ``label_positions`` (rows x positions, True where the next token is a label) and ``target_labels`` (those labels
    in row-major order) let the step project onto the vocabulary only where a loss is taken (``loss.py``);
    ``labels`` stays for HF Trainer's token count. A packed row also carries its records' boundaries
    (``packed_cu_seqlens``, ``packed_max_length``: what the training attention needs, known here without a GPU sync).
    Padded rows are rounded up to ``pad_to_multiple_of`` tokens: a few padding tokens cost little on a launch-bound
    step, while every new sequence length makes cuDNN's attention build (on the CPU) a plan for that shape.
    """

    pad_token_id: int
    pack: bool = False
    pad_to_multiple_of: int = 64

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if self.pack:
            batch["input_ids"] = torch.cat([f["input_ids"] for f in features])[None]
            labels = torch.cat([f["labels"] for f in features])[None]
            text = torch.cat([torch.arange(len(f["input_ids"])) for f in features])
            mrope = torch.cat([f["position_ids"] for f in features], dim=1)
            batch["position_ids"] = torch.cat([text[None], mrope])[:, None, :]  # 4 x 1 x L: packed (HF convention)
            lengths = [len(f["input_ids"]) for f in features]
            batch["packed_cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
            batch["packed_max_length"] = max(lengths)
        else:
            longest = max(len(f["input_ids"]) for f in features)
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
            n = len(features)
            batch["input_ids"] = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
            labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
            batch["attention_mask"] = torch.zeros((n, longest), dtype=torch.long)
            batch["position_ids"] = torch.ones((3, n, longest), dtype=torch.long)
            for row, f in enumerate(features):
                size = len(f["input_ids"])
                batch["input_ids"][row, :size] = f["input_ids"]
                labels[row, :size] = f["labels"]
                batch["attention_mask"][row, :size] = 1
                batch["position_ids"][:, row, :size] = f["position_ids"]
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in features if "image_grid_thw" in f])
        positions = torch.zeros(labels.shape, dtype=torch.bool)
        positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        batch["labels"] = labels
        batch["label_positions"] = positions
        batch["target_labels"] = labels[:, 1:][positions[:, :-1]]
        return batch


def build_dataset(processor, conversations, *, min_pixels: int, max_pixels: int, cutoff_len: int,
                  max_samples: int | None = None) -> tuple[VisionSFTDataset, EncodeStats]:
    """Encode conversations into a :class:`VisionSFTDataset` plus the kept/dropped counts."""
    if max_samples is not None:
        conversations = conversations[:max_samples]
    encoder = SampleEncoder(processor, min_pixels=min_pixels, max_pixels=max_pixels, cutoff_len=cutoff_len)
    samples, stats = encoder.encode_all(conversations)
    dataset = VisionSFTDataset(samples, processor.image_processor, encoder.image_token_id, encoder.merge,
                               *encoder.processor_bounds)
    return dataset, stats
