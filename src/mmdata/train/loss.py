"""The training loss: cross-entropy at labelled positions only, projected onto the vocabulary chunk by chunk.

Why not the model's own loss: a Qwen-VL ``lm_head`` maps every position to 151,936 logits. A micro-batch of 16
LaTeX samples has ~3,400 positions of which ~1,600 carry a label; the model's loss materialises bf16 logits for all
of them, an fp32 copy for the cross-entropy, and the gradient of both -- several GB, more than the activations of
the whole checkpointed language model. Here the step takes the final hidden states (``tap_final_hidden_states``),
keeps the labelled rows, and projects them in chunks, so at most one chunk's logits exist at a time.

Why the gradient is computed in the forward pass (:class:`_ProjectedCrossEntropy`): the loss is the last op of the
step, so the gradient of each chunk's logits (softmax minus the one-hot target) is known as soon as its loss is.
Taking it there and multiplying it into the projection at once leaves backward nothing to do but scale the kept
(rows x hidden) gradient by the loss's upstream gradient. The earlier version checkpointed each chunk and so ran the
vocabulary projection three times per step (forward, recompute, gradient) and the fp32 softmax, its gradient and
the one-hot scatter as separate kernels over (rows x 151,936); without them MedTrinity-length steps (~590 labelled
rows per record) ran 1.09-1.11x faster on an H200, at the same loss curve (benchmarks/README.md, run I). This is
the idea of Liger-Kernel's fused linear cross-entropy, in plain PyTorch so it runs on any device; where the trainer
compiles (``compile``), the per-chunk softmax and its gradient run as one inductor kernel that reads the bf16
logits and writes their bf16 gradient, and chunks are 4x larger (:data:`COMPILED_LOSS_CHUNK`) at about the same
memory.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .model import language_model

LOSS_CHUNK = 256  # labelled rows per vocabulary projection, eager: 256 x 151,936 fp32 logits = 156 MB (and temporaries)
COMPILED_LOSS_CHUNK = 1024  # compiled: the chunk's bf16 logits and their bf16 gradient, 2 x 311 MB

# ``logits_to_keep`` that keeps no position: the model skips its own vocabulary projection
NO_POSITIONS = torch.zeros(0, dtype=torch.long)


def projected_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                chunk: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Sum over rows of ``cross_entropy(hidden @ weight.T, targets)``; ``hidden`` is (N, d), ``weight`` (V, d).

    Each chunk's logits are computed in the hidden states' dtype and the softmax in fp32; where a gradient is needed
    it is taken in the forward pass (module docstring), so memory holds one chunk's logits and their gradient instead
    of N x V. ``targets`` holds real token ids only (the collator drops ignored positions). ``compiled``: run each
    chunk's softmax and gradient as one compiled kernel (the trainer passes its ``compile`` setting).
    """
    weight = weight.to(hidden.dtype)  # once, not per chunk (QLoRA keeps lm_head in fp32)
    chunk = chunk or (COMPILED_LOSS_CHUNK if compiled else LOSS_CHUNK)
    if hidden.shape[0] == 0:  # keeps the graph (zero gradients), so DDP ranks stay in step
        return hidden.float().sum()
    targets = targets.to(hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ProjectedCrossEntropy.apply(hidden, weight, targets, chunk, compiled)
    return _sum_over_chunks(_projected_loss, hidden, weight, targets, chunk=chunk)


class _ProjectedCrossEntropy(torch.autograd.Function):
    """:func:`projected_cross_entropy_sum` with its gradients taken chunk by chunk in the forward pass.

    The gradient of a summed cross-entropy with respect to its logits is ``softmax(logits) - one_hot(target)``;
    multiplied into the projection it gives the hidden states' gradient (and the weight's, where the weight trains:
    a tied or fully fine-tuned ``lm_head``). Backward scales the kept gradients by the upstream one (the trainer
    divides the sum by the label count after this).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, compiled):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        ctx.weight_dtype = weight.dtype
        loss_and_logit_grad = _compiled_loss_and_logit_grad() if compiled else _loss_and_logit_grad
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        # the products run in the hidden states' dtype, whatever autocast the trainer's forward is under (the
        # gradient is written into ``grad_hidden`` in place, which autocast would not cast for)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = hidden[start: start + chunk]
                loss, logit_grad = loss_and_logit_grad(rows @ weight.T, targets[start: start + chunk])
                total += loss
                if want_hidden:
                    torch.mm(logit_grad, weight, out=grad_hidden[start: start + chunk])
                if want_weight:
                    grad_weight += (logit_grad.T @ rows).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _loss_and_logit_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of one chunk and its gradient with respect to the logits (in the logits' dtype).

    The softmax and ``p - 1`` at the target are taken in fp32 (``p`` near 1 rounded to bf16 first would lose the
    difference); ``torch.where`` on the column index rather than a scatter, so that inductor fuses it into the
    softmax's kernel.
    """
    logits32 = logits.float()
    log_norm = torch.logsumexp(logits32, dim=-1, keepdim=True)
    loss = (log_norm - logits32.gather(1, targets[:, None])).sum()
    probs = torch.exp(logits32 - log_norm)
    is_target = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return loss, torch.where(is_target, probs - 1, probs).to(logits.dtype)


@functools.cache
def _compiled_loss_and_logit_grad():
    return torch.compile(_loss_and_logit_grad, dynamic=True)


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
