"""What the GPU trainer benchmarks measure, shared by every contender (mmdata, LLaMA-Factory, the tutorial).

This file imports only torch and transformers, so it runs unchanged inside LLaMA-Factory's own environment
(``lf_run.py``, transformers 4.57) and mmdata's (``train_gpu.py``, transformers 5). Every contender is measured by
the same three pieces: ``count_batch`` reads each micro-batch the trainer is handed (samples, real tokens, labelled
tokens, image patches), ``StepClock`` times every optimizer step with the GPU synchronised, and ``summarise`` turns
the steps after the warm-up into samples/s, tokens/s, peak memory and MFU.

MFU counts the same useful FLOPs for every contender: 4 x the frozen language-model weights per token (forward +
input gradient), 6 x the LoRA weights per token, causal attention (3 x forward, per record), the vocabulary
projection for labelled tokens only (4 x hidden x vocab), and the vision tower's forward (2 x its weights per patch
plus attention per image) -- no recomputation -- over the GPU's dense bf16 peak (989.4 TFLOP/s, H100 and H200).
A record's attention is counted from the micro-batch's mean record length (records of one benchmark dataset differ
by a few tokens).
"""

from __future__ import annotations

import time

import torch

PEAK_BF16 = 989.4e12  # dense bf16 FLOP/s of an H100 / H200 SXM (datasheet)
LORA_RANK = 64


def architecture_flops(config: dict) -> dict:
    """Per-token and per-patch FLOP coefficients of a Qwen2-VL-style ``config.json`` (flat or nested text config)."""
    text = config.get("text_config") or config
    vision = config["vision_config"]
    h, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = text.get("head_dim") or h // heads
    q_dim, kv_dim = heads * head_dim, kv * head_dim
    body = layers * (2 * h * q_dim + 2 * h * kv_dim + 3 * h * inter)
    r = LORA_RANK
    lora = layers * r * ((h + q_dim) * 2 + (h + kv_dim) * 2 + (h + inter) * 3)
    e = vision.get("embed_dim") or vision["hidden_size"]
    mlp = vision.get("intermediate_size") or e * vision.get("mlp_ratio", 4)
    depth = vision["depth"]
    merge = vision.get("spatial_merge_size", 2) ** 2
    out = vision.get("out_hidden_size") or h
    mergers = 1 + len(vision.get("deepstack_visual_indexes") or [])  # Qwen3-VL: DeepStack mergers too
    return {"per_token": 4 * body + 6 * lora, "attention": 3 * layers * 2 * 2 * q_dim / 2,
            "per_label": 4 * h * text["vocab_size"],
            "per_patch": 2 * depth * (e * 3 * e + e * e + 2 * e * mlp)
            + mergers * 2 * (merge * e * merge * e + merge * e * out) / merge,
            "vision_attention": depth * 2 * 2 * e}


def count_batch(inputs: dict, eos_id: int, pad_id: int) -> dict:
    """Samples, real tokens, labelled tokens and image patches of one micro-batch, padded or packed.

    A sample is counted at its labelled end token (one reply per sample in these benchmarks). Real tokens are the
    ids other than the pad id, within a 2-D mask where there is one: LLaMA-Factory pads a packed row to its cutoff
    with pad ids under mask 1 (plain packing) or hands a 4-D mask (neat packing without flash-attn). The tutorial
    ends each row with a pad id it trains on: one token per sample it is not credited with.
    """
    labels = inputs["labels"]
    real = inputs["input_ids"] != pad_id
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        real &= mask != 0
    tokens = int(real.sum())
    grid = inputs.get("image_grid_thw")
    patches = grid.prod(-1) if grid is not None else torch.zeros(0, dtype=torch.long)
    return {"samples": int((labels == eos_id).sum()), "tokens": tokens, "labelled": int((labels != -100).sum()),
            "patches": int(patches.sum()), "patches_sq": int((patches.double() ** 2).sum())}


def step_flops(counts: dict, coef: dict) -> float:
    n = max(counts["samples"], 1)
    return (coef["per_token"] * counts["tokens"] + coef["attention"] * counts["tokens"] ** 2 / n
            + coef["per_label"] * counts["labelled"] + coef["per_patch"] * counts["patches"]
            + coef["vision_attention"] * counts["patches_sq"])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_clock(eos_id: int, pad_id: int):
    """A ``TrainerCallback`` that times optimizer steps, plus ``instrument(trainer_class)`` which makes a trainer
    class count every micro-batch and the time spent waiting for data into that clock."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.steps, self.pending = 0.0, [], [], []
            self.data_wait, self.waits = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            _sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.ends.append(time.perf_counter())
            self.waits.append(self.data_wait)
            total = {k: sum(c[k] for c in self.pending) for k in ("samples", "tokens", "labelled", "patches",
                                                                     "patches_sq")}
            self.steps.append(total)
            self.pending = []

    clock = StepClock()

    def instrument(cls):
        class Counted(cls):
            def training_step(self, model, inputs, *args, **kwargs):
                clock.pending.append(count_batch(inputs, eos_id, pad_id))
                return super().training_step(model, inputs, *args, **kwargs)

            def get_batch_samples(self, *args, **kwargs):
                t = time.perf_counter()
                out = super().get_batch_samples(*args, **kwargs)
                clock.data_wait += time.perf_counter() - t
                return out

        Counted.__name__ = cls.__name__
        return Counted

    return clock, instrument


def summarise(name: str, clock, warmup: int, coef: dict, **extra) -> dict:
    """Steady-state figures over the optimizer steps after ``warmup`` (0: from the start of training)."""
    window = clock.steps[warmup:]
    ends = [clock.start] + clock.ends  # ends[i]: when step i-1 ended; ends[0]: training began
    seconds = ends[-1] - ends[warmup]
    total = {k: sum(s[k] for s in window) for k in window[0]}
    flops = sum(step_flops(s, coef) for s in window)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"run": name, "steps_timed": len(window), "samples_per_s": round(total["samples"] / seconds, 2),
            "tokens_per_s": round(total["tokens"] / seconds, 1),
            "tokens_per_sample": round(total["tokens"] / max(total["samples"], 1), 1),
            "samples_per_step": round(total["samples"] / len(window), 1),
            "peak_mem_gb": round(peak, 2), "mfu_pct": round(100 * flops / seconds / PEAK_BF16, 2),
            "data_wait_pct": round(100 * (clock.waits[-1] - ([0.0] + clock.waits)[warmup]) / seconds, 1),
            "step_s": round(seconds / len(window), 3), "first_step_s": round(clock.ends[0] - clock.start, 1),
            "step_times_s": [round(b - a, 3) for a, b in zip(ends[warmup:-1], ends[warmup + 1:], strict=True)],
            **extra}
