"""Training attention on PyTorch's own FlashAttention kernels, variable-length, without the flash-attn package.

Why: flash-attn wheels are built per CUDA/torch pair and are often missing (none installs on a machine without a
compiler and the internet), and without it transformers' SDPA path costs a Qwen-VL step dearly:

- the vision tower runs attention image by image (32 blocks x one call per image: 512 launches for 16 formulas);
- padded text rows get a 4-D mask, which rules out SDPA's flash kernel (the masked kernels are slower);
- packed rows get a dense block-diagonal mask over the whole row (quadratic in the row, not in each record).

PyTorch ships FlashAttention-2 (``torch.nn.attention.varlen.varlen_attn``, CUDA, fp16/bf16). This module registers
it with transformers' public attention registry (``AttentionInterface`` / ``AttentionMaskInterface``) under
:data:`ATTENTION_NAME`. The name contains "flash", so the Qwen-VL vision towers hand it their ``cu_seqlens`` (one
call per block for every image) and the text model passes no 4-D mask. The function then needs only three cases:

- ``cu_seq_lens_q`` given (the vision tower): one variable-length call;
- no mask, one row whose text positions restart at 0 (a packed row): each record attends only to itself. The
  records' boundaries come with the batch (``packed_cu_seqlens`` and ``packed_max_length``, made by the trainer's
  collator on the host: no GPU sync, and the call compiles with the layer around it); a packed row without them
  gets its boundaries from the positions, once per forward, outside compiled graphs;
- no mask: causal SDPA without a mask, i.e. its flash kernel. The mask function (:func:`training_mask`, run once
  per forward by the text model, outside the layers) drops a right-padded 2-D mask, as the trainer's padded rows
  have: with right padding a real token never sees a pad (pads come after it), so the result at every real
  position is exact, and pad positions are never labelled.

Anything else (left padding, a query shorter than its keys as in cached generation, fp32) goes to transformers' own
SDPA function with the equivalent 4-D mask, and on the CPU (tests) the variable-length call is SDPA under the
records' block-diagonal causal mask, so the same code path is checked without a GPU. Both variable-length calls
trace into compiled graphs (PyTorch's is a custom op; the mask is built from ``cu_seqlens`` on the device), so
``compile_scope: layers`` compiles packed rows whole, as it does padded ones.

Why the boundaries travel under their own names: the model hands its keyword arguments to the vision tower as
well as to the text model, and the vision tower passes ``cu_seq_lens_q`` itself (a second one is a TypeError).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

ATTENTION_NAME = "flash_varlen_torch"

try:  # torch >= 2.10 (the keyword for causal masking changed between releases: see _varlen)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - older torch
    _torch_varlen_attn = None

_VARLEN_PARAMETERS = set(inspect.signature(_torch_varlen_attn).parameters) if _torch_varlen_attn else set()


def torch_varlen_available() -> bool:
    """True where PyTorch's variable-length FlashAttention can run: this torch has it and a CUDA GPU is present."""
    return _torch_varlen_attn is not None and torch.cuda.is_available()


def register_attention() -> None:
    """Register :func:`varlen_attention_forward` and :func:`training_mask` with transformers under
    :data:`ATTENTION_NAME` (idempotent; ``model.use_attention`` calls it before switching a model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, training_mask)


def training_mask(*args, attention_mask=None, q_length=None, kv_length=None, **kwargs):
    """The mask the layers get: None where nothing is padded or only the right is (no 4-D mask is ever built),
    else the 2-D padding mask (see the module docstring). Signature of transformers' mask functions."""
    from transformers.masking_utils import flash_attention_mask

    mask = flash_attention_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                                **kwargs)
    if mask is not None and q_length == kv_length and _right_padded(mask):
        return None
    return mask


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             is_causal=None, cu_seq_lens_q=None, max_length_q=None, position_ids=None,
                             sliding_window=None, packed_cu_seqlens=None, packed_max_length=None, **kwargs):
    """transformers' attention-function contract: ``query`` is (batch, heads, length, dim), ``key``/``value`` may have
    fewer heads (GQA); returns ``(output (batch, length, heads, dim), None)``. ``packed_cu_seqlens`` (int32, records
    + 1) and ``packed_max_length`` (the longest record): a packed row's boundaries, from the collator."""
    if sliding_window is not None:
        raise ValueError(f"{ATTENTION_NAME} has no sliding-window attention (this config enables it): use "
                         "attn_implementation sdpa or flash_attention_2")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    batch, heads, length, dim = query.shape
    packed_row = attention_mask is None and batch == 1 and key.shape[2] == length  # not a query over cached keys
    if cu_seq_lens_q is None and packed_row and packed_cu_seqlens is not None:
        cu_seq_lens_q, max_length_q = packed_cu_seqlens, packed_max_length
    elif cu_seq_lens_q is None and packed_row and position_ids is not None:
        cu_seq_lens_q, max_length_q = _packed_boundaries(position_ids)
    if cu_seq_lens_q is not None:
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], dim) for t in (query, key, value))
        max_length = max_length_q if isinstance(max_length_q, int | torch.SymInt) else int(max_length_q)
        out = _varlen(q, k, v, cu_seq_lens_q, max_length, causal, scaling)
        return out.view(batch, length, heads, dim), None
    if key.shape[2] == length and attention_mask is None:
        causal_here = bool(causal) if length > 1 else False  # a plain bool: a SymBool breaks compiled graphs
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal_here, scale=scaling,
                                             dropout_p=dropout, enable_gqa=key.shape[1] != heads)
        return out.transpose(1, 2), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dense = _dense_mask(attention_mask, length, key.shape[2], causal)
    return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, is_causal=False,
                                  **kwargs)


def _varlen(q, k, v, cu_seqlens, max_length, causal, scale):
    """Attention over the records ``cu_seqlens`` marks in (tokens, heads, dim) tensors, each record on its own."""
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if _torch_varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        options = {"scale": scale}
        if "enable_gqa" in _VARLEN_PARAMETERS:
            options["enable_gqa"] = k.shape[1] != q.shape[1]
        elif k.shape[1] != q.shape[1]:  # a release without the GQA switch: give keys/values every query head
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        if "window_size" in _VARLEN_PARAMETERS:
            options["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            options["is_causal"] = causal
        return _torch_varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **options)
    # reference path (CPU, fp32, or a torch without varlen_attn): the same result, from SDPA under the records'
    # block-diagonal mask (quadratic in the row, as transformers' sdpa packing is; no host sync, so it compiles)
    tokens = torch.arange(q.shape[0], device=q.device, dtype=torch.int32)
    record = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    allowed = record[:, None] == record[None, :]
    if causal:
        allowed = allowed & (tokens[:, None] >= tokens[None, :])
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=allowed, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


# the same positions tensor serves every layer of a forward (and its recomputation)
_seen_positions: list = [None, None]


@torch.compiler.disable  # data-dependent boundaries and a host-side length: kept out of compiled graphs
def _packed_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, longest record)`` of a packed row: a record starts wherever the text position is 0."""
    if _seen_positions[0] is not position_ids:
        row = position_ids.reshape(-1)
        starts = (row == 0).nonzero().flatten()
        if starts.numel() == 0 or starts[0].item() != 0:
            starts = torch.cat([starts.new_zeros(1), starts])
        cu_seqlens = torch.cat([starts, starts.new_tensor([row.numel()])]).to(torch.int32)
        _seen_positions[:] = [position_ids, (cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))]
    return _seen_positions[1]


def _right_padded(mask: torch.Tensor) -> bool:
    """Whether a 2-D mask only pads on the right (every row: ones, then zeros)."""
    return mask.dim() == 2 and bool((mask[:, 1:].int() <= mask[:, :-1].int()).all())


def _dense_mask(mask: torch.Tensor | None, q_length: int, kv_length: int, causal: bool = True) -> torch.Tensor | None:
    """The boolean (batch, 1, q, kv) padding (and causal) mask SDPA takes, queries aligned to the last keys."""
    if mask is not None and mask.dim() == 4:
        return mask
    device = mask.device if mask is not None else None
    dense = torch.ones(q_length, kv_length, dtype=torch.bool, device=device)
    dense = (dense.tril(kv_length - q_length) if causal else dense)[None, None]
    if mask is not None:
        dense = dense & mask[:, None, None, -kv_length:].bool()
    return dense | ~dense.any(-1, keepdim=True)  # a pad query that sees nothing sees everything (no NaN to spread)
