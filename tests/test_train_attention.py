"""mmdata's training attention (``mmdata.train.attention``): every path equals plain attention over each record.

On the CPU the variable-length call runs record by record (what CI checks); on a CUDA GPU the same tests run
PyTorch's FlashAttention kernel against that reference, forward and backward.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from mmdata.train.attention import _varlen, training_mask, varlen_attention_forward  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Decoder:
    """What the attention function reads from transformers' attention modules."""

    is_causal = True
    num_key_value_groups = 6
    training = True


def per_record(q, k, v, lengths, causal):
    """Reference: SDPA on each record alone, in float64; q/k/v are (batch=1, heads, tokens, dim)."""
    outs, start = [], 0
    for n in lengths:
        part = [t[:, :, start:start + n].double() for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*part, is_causal=causal, enable_gqa=True).transpose(1, 2))
        start += n
    return torch.cat(outs, 1)


def _qkv(device, tokens, heads=12, kv_heads=2, dim=64, batch=1):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    make = lambda h: torch.randn(batch, h, tokens, dim, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def _close(out, ref, device):
    tolerance = 2e-2 if device == "cuda" else 1e-5  # bf16 kernels vs a float64 reference
    assert torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref) < tolerance


@pytest.mark.parametrize("device", DEVICES)
def test_packed_row_attends_within_each_record_forward_and_backward(device):
    """A packed row (text positions restart at 0 per record, no mask) equals each record attended alone, and so do
    the gradients of queries, keys and values (GQA: 12 query heads over 2 key/value heads)."""
    torch.manual_seed(0)
    lengths = [37, 5, 120, 64]
    q, k, v = _qkv(device, sum(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    out, _ = varlen_attention_forward(Decoder(), q, k, v, None, position_ids=positions)
    ref = per_record(q, k, v, lengths, causal=True)
    _close(out, ref, device)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        _close(g, w, device)


@pytest.mark.parametrize("device", DEVICES)
def test_vision_records_from_cu_seqlens_are_not_causal(device):
    """The vision towers pass ``cu_seq_lens_q``: every image attends to all of itself and nothing else."""
    torch.manual_seed(1)
    lengths = [16, 64, 36]
    q, k, v = _qkv(device, sum(lengths), heads=4, kv_heads=4)
    cu = torch.tensor([0, 16, 80, 116], dtype=torch.int32, device=device)
    out, _ = varlen_attention_forward(Decoder(), q, k, v, None, is_causal=False, cu_seq_lens_q=cu, max_length_q=64)
    _close(out, per_record(q, k, v, lengths, causal=False), device)


@pytest.mark.parametrize("device", DEVICES)
def test_right_padded_rows_equal_each_row_alone(device):
    """Right padding (the trainer's padded micro-batches): the mask function drops the mask, and every real position
    of SDPA's unmasked causal kernel equals the row attended without its pads."""
    torch.manual_seed(2)
    q, k, v = _qkv(device, 48, batch=3)
    mask = torch.ones(3, 48, dtype=torch.long, device=device)
    mask[1, 30:] = 0
    mask[2, 7:] = 0
    assert training_mask(batch_size=3, q_length=48, kv_length=48, attention_mask=mask.bool()) is None
    out, _ = varlen_attention_forward(Decoder(), q, k, v, None)
    for row, n in enumerate((48, 30, 7)):
        ref = per_record(*(t[row:row + 1] for t in (q, k, v)), [n], causal=True)
        _close(out[row:row + 1, :n], ref, device)


def test_the_mask_function_keeps_left_padding_and_cached_queries():
    """Left padding, or fewer queries than keys (cached generation), keep their 2-D mask; no padding gives None."""
    left = torch.ones(2, 10, dtype=torch.bool)
    left[1, :3] = False
    assert torch.equal(training_mask(batch_size=2, q_length=10, kv_length=10, attention_mask=left), left)
    right = left.flip(1)
    assert torch.equal(training_mask(batch_size=2, q_length=1, kv_length=10, attention_mask=right), right)
    full = torch.ones(2, 10, dtype=torch.bool)
    assert training_mask(batch_size=2, q_length=10, kv_length=10, attention_mask=full) is None


def test_left_padding_and_cached_generation_fall_back_to_masked_sdpa():
    """Anything but right padding, e.g. a left-padded prompt or one new query over cached keys, goes to masked SDPA
    and equals the unpadded rows; a pad query that sees nothing gives no NaN."""
    torch.manual_seed(3)
    q, k, v = _qkv("cpu", 20, batch=2)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    out, _ = varlen_attention_forward(Decoder(), q, k, v, mask)
    assert not torch.isnan(out).any()
    ref = per_record(*(t[1:, :, 6:] for t in (q, k, v)), [14], causal=True)
    _close(out[1:, 6:], ref, "cpu")
    last, _ = varlen_attention_forward(Decoder(), q[:, :, -1:], k, v, mask)
    ref = F.scaled_dot_product_attention(q[1:, :, -1:], k[1:, :, 6:], v[1:, :, 6:], enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(last[1:], ref)


def test_reference_path_matches_the_dense_block_diagonal_mask():
    """The CPU path of ``_varlen`` is plain attention under a block-diagonal causal mask (what SDPA computes for a
    packed row in transformers' own ``sdpa`` mode)."""
    torch.manual_seed(4)
    lengths = [3, 9, 4]
    q, k, v = (torch.randn(sum(lengths), 4, 8) for _ in range(3))
    cu = torch.tensor([0, 3, 12, 16])
    record = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    allowed = (record[:, None] == record[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    dense = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=allowed)
    torch.testing.assert_close(_varlen(q, k, v, cu, 9, True, None), dense.transpose(0, 1))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_generation_through_the_training_attention_equals_sdpa(tmp_path, family):
    """Greedy generation (one row, no padding: positions come with the queries, then one query over cached keys)
    scores every step as SDPA does; and two left-padded rows too."""
    from transformers import AutoModelForImageTextToText

    from mmdata.train.model import use_attention
    from mmdata.train.tiny import make_tiny_model

    model = AutoModelForImageTextToText.from_pretrained(make_tiny_model(tmp_path / family, family),
                                                        attn_implementation="sdpa", dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(10, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    options = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    runs = {}
    for name in ("sdpa", "flash_varlen_torch"):
        use_attention(model, name)
        runs[name] = [model.generate(ids[:1], attention_mask=mask[:1], **options),
                      model.generate(ids, attention_mask=mask, **options)]
    for reference, got in zip(runs["sdpa"], runs["flash_varlen_torch"], strict=True):
        assert torch.equal(reference.sequences, got.sequences)
        for a, b in zip(reference.scores, got.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_whole_compiled_layers_with_this_attention_compile_without_a_graph_break(tmp_path):
    """compile_scope: layers with flash_varlen_torch on padded rows: one graph per layer, no break. A break inside
    the checkpointed layer (a SymBool is_causal did that) makes the compiler give up on the whole layer, which then
    runs eager under the selective checkpoint -- measured 40% slower on the H200."""
    from torch._dynamo.utils import counters

    from mmdata.train.config import load_train_config
    from mmdata.train.model import attach_lora, compile_language_layers, enable_checkpointing, load_model
    from mmdata.train.tiny import make_tiny_model

    counters.clear()
    path = make_tiny_model(tmp_path / "m", layers=2)
    config = load_train_config(None, model=str(path), dataset="d", lora_dropout=0.05, lora_r=8)
    model = attach_lora(load_model(str(path), dtype=torch.float32, attn="flash_varlen_torch"), config)
    enable_checkpointing(model, keep_dropout=True)
    model.train()
    compile_language_layers(model, "layers")
    ids = torch.randint(0, 500, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding: the unmasked causal SDPA path
    model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().mean().backward()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_whole_compiled_layers_compile_packed_rows_without_a_graph_break(tmp_path):
    """compile_scope: layers on a packed row with its boundaries from the collator (``packed_cu_seqlens``): one
    graph per layer, no break (the boundaries looked up from the positions, a host sync, broke the graph and ran the
    layer eager: 2.8x slower than padded rows on the H200), and the loss equals the row's records run one by one."""
    from torch._dynamo.utils import counters

    from mmdata.train.config import load_train_config
    from mmdata.train.data import VisionSFTCollator
    from mmdata.train.model import attach_lora, compile_language_layers, enable_checkpointing, load_model
    from mmdata.train.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "m", layers=2)
    config = load_train_config(None, model=str(path), dataset="d", lora_dropout=0.0, lora_r=8)
    model = attach_lora(load_model(str(path), dtype=torch.float32, attn="flash_varlen_torch"), config)
    enable_checkpointing(model, keep_dropout=True)
    model.train()
    torch.manual_seed(0)
    records = [torch.randint(0, 500, (n,)) for n in (7, 19, 12)]
    features = [{"input_ids": r, "labels": r, "position_ids": torch.arange(len(r)).expand(3, -1)} for r in records]
    alone = [model(input_ids=r[None], use_cache=False).logits[0] for r in records]
    compile_language_layers(model, "layers")
    counters.clear()
    for cut in (None, 1):  # two micro-batches of other lengths and record counts: no recompile for the second
        batch = VisionSFTCollator(0, pack=True)(features[:cut] if cut else features)
        batch = {k: v for k, v in batch.items() if k not in ("labels", "label_positions", "target_labels")}
        logits = model(**batch, use_cache=False).logits[0]
        logits.float().mean().backward()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 4  # forward + backward per layer, not one more per micro-batch
    batch = VisionSFTCollator(0, pack=True)(features)
    logits = model(**{k: batch[k] for k in ("input_ids", "position_ids", "packed_cu_seqlens", "packed_max_length")},
                   use_cache=False).logits[0]
    torch.testing.assert_close(logits, torch.cat(alone), rtol=1e-4, atol=1e-4)
