"""Batched generation on a split of an mmdata build: ``generated_predictions.jsonl`` and ``metrics.json``.

The output matches LLaMA-Factory's ``do_predict`` (one JSON line per sample with ``prompt``, ``predict`` and
``label``), so existing evaluation scripts keep working. The prompt is every turn before the last assistant turn,
rendered with the processor's chat template; the label is that last assistant turn. Works with a base model, a base
model plus a LoRA adapter (``--adapter``), or a merged export, of any family in ``families.py``: the processor's
output (``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``, from
which each family's ``generate`` computes its own M-RoPE positions) goes to ``generate`` as is. Images are resized
exactly as in training (the adapter's ``mmdata_train.json`` supplies ``min_pixels``/``max_pixels`` unless given).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from ..samples import lf_conversation_problems
from .config import TrainError
from .data import pixel_bounds, processor_pixels, read_conversations, resolve_split, to_messages, trained_size
from .metrics import compute_metrics
from .model import (
    ensure_chat_template,
    load_adapter,
    load_model,
    load_processor,
    pick_attention,
    pick_dtype,
    read_family,
    resolve_model_path,
)

PREDICTIONS = "generated_predictions.jsonl"
METRICS = "metrics.json"


def _training_pixels(trained: str | None) -> dict:
    """The pixel budget a run trained at: its ``mmdata_train.json`` in the adapter folder, or in a merged export."""
    record = Path(trained or "", "mmdata_train.json")
    if trained and record.exists():
        cfg = json.loads(record.read_text()).get("config", {})
        return {k: cfg[k] for k in ("min_pixels", "max_pixels") if k in cfg}
    return {}


def load_for_inference(model: str, adapter: str | None = None, *, precision: str = "auto",
                       attn_implementation: str = "auto", model_hub: str = "huggingface"):
    """``(model, processor)`` in eval mode: base, base + adapter, or a merged folder."""
    model_path = resolve_model_path(model, model_hub)
    processor = load_processor(adapter, fallback=model_path) if adapter else load_processor(model_path)
    ensure_chat_template(processor, read_family(model_path), adapter or model_path)
    net = load_model(model_path, dtype=pick_dtype(precision), attn=pick_attention(attn_implementation, training=False))
    if adapter:
        net = load_adapter(net, adapter, model_path)
    if torch.cuda.is_available():
        net = net.to("cuda")
    return net.eval(), processor


def build_prompts(conversations, processor, skipped: Counter | None = None) -> list[dict]:
    """``{"prompt", "images", "label"}`` per conversation that ends in an assistant turn. A record the trainer would
    drop (the rules of ``mmdata validate``, a missing image) is skipped and counted in ``skipped`` by reason: it
    crashed ``generate`` mid-run ("Found 1 <|image_pad|> tokens ... but no images were passed")."""
    items = []
    for turns, images in conversations:
        problems = lf_conversation_problems(turns, len(images), allow_empty_answer=True)  # a label may be empty
        missing = next((p for p in images if not Path(p).is_file()), None)
        if problems or missing:
            if skipped is not None:
                skipped[problems[0].split(":")[0][:80] if problems else "image file not found"] += 1
            continue
        messages = to_messages(turns)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        prompt = processor.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        items.append({"prompt": prompt, "images": images, "label": messages[last]["content"]})
    return items


def generate(net, processor, items: list[dict], *, batch_size: int, max_new_tokens: int, min_pixels: int,
             max_pixels: int):
    """Yield the decoded greedy continuation of each item, in order, ``batch_size`` prompts per ``generate``."""
    ip = processor.image_processor
    factor = int(ip.patch_size) * int(ip.merge_size)
    bounds = processor_pixels(ip)
    processor.tokenizer.padding_side = "left"
    device = next(net.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = items[start: start + batch_size]
        images = []
        for item in batch:
            for path in item["images"]:
                with Image.open(path) as im:
                    h, w = trained_size(im.width, im.height, factor, min_pixels, max_pixels, bounds)
                    images.append(im.convert("RGB").resize((w, h), Image.BICUBIC))
        kwargs = {"images": images, **pixel_bounds(*bounds)} if images else {}
        enc = processor(text=[item["prompt"] for item in batch], padding=True, return_tensors="pt", **kwargs)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.inference_mode():
            out = net.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        yield from processor.batch_decode(new, skip_special_tokens=True)


def split_thought(text: str) -> tuple[str | None, str]:
    """``(thought, answer)`` of a generation: a Thinking model (Qwen3-VL-*-Thinking) writes its reasoning, then
    ``</think>``, then the answer, and ``<think>``/``</think>`` are not special tokens, so decoding keeps them. Only
    the answer is scored (it was the whole text: exact match 0 for every right answer); a generation cut off
    inside its thought has no answer."""
    if "</think>" in text:
        thought, _, answer = text.rpartition("</think>")
        return thought.replace("<think>", "", 1).strip(), answer.strip()
    if text.lstrip().startswith("<think>"):
        return text.lstrip().removeprefix("<think>").strip(), ""
    return None, text


def predict(model: str, dataset: str, output_dir: str, *, adapter: str | None = None, split: str = "val",
            datasets: list[str] | None = None, batch_size: int = 8, max_new_tokens: int = 256,
            max_samples: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
            precision: str = "auto", attn_implementation: str = "auto") -> dict:
    """Generate for every sample of ``split``; write predictions and metrics to ``output_dir``; return metrics."""
    info_path, names = resolve_split(dataset, split, datasets)
    if not names:
        raise TrainError(f"{info_path}: no {split} split found; pass --split or --datasets NAME")
    pixels = {"min_pixels": 32 * 32, "max_pixels": 768 * 768,  # the trainer's defaults
              **_training_pixels(adapter or model)}
    pixels.update({k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v})
    net, processor = load_for_inference(model, adapter, precision=precision,
                                        attn_implementation=attn_implementation)
    skipped: Counter = Counter()
    items = build_prompts(read_conversations(info_path, names), processor, skipped)[:max_samples]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = []
    with open(out / PREDICTIONS, "w", encoding="utf-8") as f:
        for item, text in zip(items, generate(net, processor, items, batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, **pixels), strict=False):
            thought, answer = split_thought(text)
            predictions.append(answer)
            f.write(json.dumps({"prompt": item["prompt"], "predict": answer, "label": item["label"],
                                **({"thought": thought} if thought is not None else {})},
                               ensure_ascii=False) + "\n")
    metrics = compute_metrics(predictions, [item["label"] for item in items])
    metrics.update(split=split, datasets=names, adapter=adapter, model=model, skipped=dict(skipped))
    (out / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics
