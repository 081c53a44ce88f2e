"""The training loss: cross-entropy at labelled positions only, projected onto the vocabulary chunk by chunk.

Why not the model's own loss: a Qwen-VL ``lm_head`` maps every position to 151,936 logits. A micro-batch of 16
LaTeX samples has ~3,400 positions of which ~1,600 carry a label; the model's loss materialises bf16 logits for all
of them, an fp32 copy for the cross-entropy, and the gradient of both -- several GB, more than the activations of
the whole checkpointed language model. Here the step takes the final hidden states (``tap_final_hidden_states``),
keeps the labelled rows, and projects them in chunks of ``LOSS_CHUNK`` rows whose logits are recomputed in backward,
so at most one chunk's logits exist at a time (the idea of Liger-Kernel's fused linear cross-entropy, in plain
PyTorch so it runs on any device).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .model import language_model

LOSS_CHUNK = 256  # labelled positions per vocabulary projection: 256 x 151,936 fp32 logits = 156 MB

# ``logits_to_keep`` that keeps no position: the model skips its own vocabulary projection
NO_POSITIONS = torch.zeros(0, dtype=torch.long)


def projected_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T, targets)``; ``hidden`` is (N, d), ``weight`` (V, d).

    Each chunk's logits are computed in the hidden states' dtype, upcast to fp32 for the softmax, and freed; in
    backward they are recomputed (``checkpoint``), so memory holds one chunk's logits instead of N x V.
    ``targets`` holds real token ids only (the collator drops ignored positions).
    """
    weight = weight.to(hidden.dtype)  # once, not per chunk (QLoRA keeps lm_head in fp32)
    return _sum_over_chunks(_projected_loss, hidden, weight, targets, chunk=chunk)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """The same sum from logits the model already computed, (N, V); upcast to fp32 one chunk at a time.

    Used where the projection weight cannot be read outside the model's forward (DeepSpeed ZeRO-3 partitions it).
    """
    return _sum_over_chunks(_logits_loss, logits, targets, chunk=chunk)


def _sum_over_chunks(chunk_loss, rows: torch.Tensor, *operands: torch.Tensor, chunk: int) -> torch.Tensor:
    """Sum of ``chunk_loss(rows chunk, *shared, targets chunk)`` over chunks of ``chunk`` rows.

    ``operands`` are the operands every chunk shares (the projection weight, if any), then the per-row targets.
    Checkpointed per chunk where a gradient is needed, so backward recomputes one chunk's logits at a time.
    """
    *shared, targets = operands
    if rows.shape[0] == 0:  # keeps the graph (zero gradients), so DDP ranks stay in step
        return rows.float().sum()
    targets = targets.to(rows.device)
    needs_grad = torch.is_grad_enabled() and (rows.requires_grad or any(o.requires_grad for o in shared))
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk):
        args = (rows[start: start + chunk], *shared, targets[start: start + chunk])
        total = total + (checkpoint(chunk_loss, *args, use_reentrant=False) if needs_grad else chunk_loss(*args))
    return total


def _projected_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def _logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def final_norm(model) -> torch.nn.Module:
    """The language model's last RMSNorm: its output is what ``lm_head`` projects (``last_hidden_state``).

    Found as ``get_decoder().norm`` in all three families (``Qwen2VLTextModel``, ``Qwen2_5_VLTextModel``,
    ``Qwen3VLTextModel`` end in ``hidden_states = self.norm(hidden_states)``); a clear error where it is missing.
    """
    return language_model(model).norm


@contextlib.contextmanager
def tap_final_hidden_states(norm: torch.nn.Module):
    """Record the output of ``norm`` during a forward pass; yields a list that receives it.

    A forward hook, not a call into the inner model, so the forward still goes through the DDP / DeepSpeed wrapper
    that the trainer hands to ``compute_loss`` (its gradient synchronisation depends on that).
    """
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _module, _inputs, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()
