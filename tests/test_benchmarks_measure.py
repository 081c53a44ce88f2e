"""The GPU trainer benchmarks' bookkeeping (``benchmarks/measure.py``): what is counted per micro-batch and the MFU
arithmetic, checked on the CPU since the figures themselves come from a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("bench_measure", BENCHMARKS / "measure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_measure"] = module
    spec.loader.exec_module(module)
    return module


EOS, PAD = 7, 8
QWEN2VL_2B_TEXT = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                   "num_key_value_heads": 2, "vocab_size": 151936}
QWEN2VL_2B_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "hidden_size": 1536, "spatial_merge_size": 2}


def previous_sample_flops(text_len: int, patches: int, labelled: int) -> float:
    """The MFU formula of the earlier benchmark (one sample), written out as it was."""
    h, inter, layers, kv = 1536, 8960, 28, 2
    kv_dim = h // 12 * kv
    body = layers * (2 * h * h + 2 * h * kv_dim + 3 * h * inter)
    lora = layers * 64 * ((h + h) * 2 + (h + kv_dim) * 2 + (h + inter) * 3)
    attn = 3 * layers * 2 * 2 * h * text_len * text_len / 2
    e = 1280
    vision = 2 * 32 * (e * 3 * e + e * e + 2 * e * e * 4) * patches
    vision += 32 * 2 * 2 * e * patches * patches + 2 * (4 * e * 4 * e + 4 * e * h) * patches / 4
    return 4 * body * text_len + 6 * lora * text_len + attn + 4 * h * 151936 * labelled + vision


def test_mfu_counts_what_the_earlier_benchmark_counted(measure):
    """Same sample, same FLOPs: the definition did not move when the benchmark gained LLaMA-Factory."""
    coef = measure.architecture_flops({**QWEN2VL_2B_TEXT, "vision_config": QWEN2VL_2B_VISION})
    counts = {"samples": 1, "tokens": 972, "labelled": 190, "patches": 1296, "patches_sq": 1296 ** 2}
    assert measure.step_flops(counts, coef) == pytest.approx(previous_sample_flops(972, 1296, 190), rel=1e-9)


def test_counts_of_padded_packed_and_neat_packed_micro_batches(measure):
    """Samples are counted at their labelled end token, real tokens from the mask (LLaMA-Factory's neat packing
    numbers its records 1..k, pads are 0) or the whole row without a mask, patches from the image grids."""
    labels = torch.full((2, 6), -100)
    labels[0, 2:4] = torch.tensor([5, EOS])
    labels[1, 1:3] = torch.tensor([5, EOS])
    ids = torch.tensor([[3, 4, 5, EOS, PAD, PAD], [3, 5, EOS, PAD, PAD, PAD]])
    padded = {"input_ids": ids, "labels": labels,
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]),
              "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2]])}
    assert measure.count_batch(padded, EOS, PAD) == {"samples": 2, "tokens": 7, "labelled": 4, "patches": 28,
                                                     "patches_sq": 24 ** 2 + 4 ** 2}
    row = torch.tensor([[3, 4, 5, EOS, 3, 5, EOS, 9, 9, PAD, PAD, PAD]])
    packed = {"input_ids": row, "labels": labels.reshape(1, -1)}
    assert measure.count_batch(packed, EOS, PAD)["tokens"] == 9 and measure.count_batch(packed, EOS, PAD)["samples"] == 2
    plain = {**packed, "attention_mask": torch.ones(1, 12, dtype=torch.long)}  # LLaMA-Factory: pads under mask 1
    assert measure.count_batch(plain, EOS, PAD)["tokens"] == 9
    neat = {**packed, "attention_mask": torch.zeros(1, 1, 12, 12)}  # its 4-D mask without flash-attn
    assert measure.count_batch(neat, EOS, PAD)["tokens"] == 9


def test_summary_covers_the_steps_after_warmup(measure):
    """samples/s, tokens/s and per-step times from the clock's steps after the warm-up."""
    clock, _ = measure.step_clock(eos_id=EOS, pad_id=PAD)
    clock.start = 0.0
    clock.ends = [10.0, 11.0, 12.0, 14.0]
    clock.waits = [0.0, 0.1, 0.1, 0.3]
    clock.steps = [{"samples": 16, "tokens": 3200, "labelled": 1600, "patches": 0, "patches_sq": 0}] * 4
    coef = {"per_token": 1.0, "attention": 0.0, "per_label": 0.0, "per_patch": 0.0, "vision_attention": 0.0}
    result = measure.summarise("x", clock, 1, coef)
    assert result["steps_timed"] == 3 and result["samples_per_s"] == round(48 / 4, 2)
    assert result["tokens_per_s"] == 2400.0 and result["step_times_s"] == [1.0, 1.0, 2.0]
    assert result["data_wait_pct"] == round(100 * 0.3 / 4, 1) and result["first_step_s"] == 10.0
    from_start = measure.summarise("x", clock, 0, coef)
    assert from_start["steps_timed"] == 4 and from_start["step_times_s"] == [10.0, 1.0, 1.0, 2.0]
