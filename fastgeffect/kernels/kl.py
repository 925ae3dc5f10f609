"""Fused LM heads + KL regulariser between the reference and current next-token distributions.

Matches :func:`fastgeffect.losses.kl`: ``direction="forward"`` is KL(p_ref ‖ p_θ) (TOFU),
``"reverse"`` is KL(p_θ ‖ p_ref); ``positions="all"`` averages over every row given (TOFU's
batchmean over all positions, padding included; no compaction, no host synchronisation),
``positions="answer"`` over rows whose aligned label is not -100. The reference side is
detached. Rows are processed in chunks: two logits chunks (current and reference), the chunk
op computes per-row KL and writes the gradient over the current chunk, then two matmuls give
d(hidden) and the fp32-accumulated d(weight).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..losses._common import positive_count
from ..losses.kl import KL_DIRECTIONS, KL_POSITIONS
from . import common
from .dispatch import resolve_backend
from .kl_torch import kl_chunk_torch
from .lm_head import chunked_lm_head, linear, scale_of, take


def _chunk_op(backend: str):
    if backend == "triton":
        # triton is imported only when its backend runs
        from .kl_triton import kl_chunk_triton
        return kl_chunk_triton
    return kl_chunk_torch


def _run(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cfg, need):
    reverse, positions, num_items, backend, chunk_size = cfg
    N, V = hidden.shape[0], weight.shape[0]
    acc = common.grad_dtype(hidden.dtype)
    if positions == "all":
        if N == 0:
            raise common.AllMaskedError("no rows for the KL")
        idx, n = None, N  # every row, in order: no compaction, no host synchronisation
        denom = N if num_items is None else num_items
        if not isinstance(num_items, torch.Tensor):  # a tensor count stays unread: no host synchronisation
            positive_count(num_items, "num_items_in_batch")
    else:
        idx, n, items = common.compact_valid(labels, V, num_items)
        denom = n if items is None else items
    scale = scale_of(denom, acc, hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    unit = torch.ones((), dtype=acc, device=hidden.device)  # gradients stored unscaled (fp16 underflow)
    chunk_op, write_grad = _chunk_op(backend), any(need)

    def op(rows, logits):
        ref_logits = linear(take(ref_hidden, rows), ref_weight, ref_bias)
        total.add_(chunk_op(logits, ref_logits, unit, reverse, write_grad).sum(dtype=acc))

    chunk = common.chunk_rows(n, V, hidden.device, buffers=2, chunk_size=chunk_size) if n else 1
    grads = chunked_lm_head(hidden, weight, bias, idx, n, chunk, op, need)
    return (total * scale, *grads, scale)


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cfg):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, gh, gw, gb, scale = _run(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cfg, need)
        ctx.save_for_backward(gh, gw, gb, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    @once_differentiable  # the stored gradients are constants: a double backward must raise, not detach
    def backward(ctx, grad_loss):
        *grads, scale = ctx.saved_tensors
        gh, gw, gb = common.scale_grads(grads, grad_loss, scale, ctx.dtypes)
        return gh, gw, gb, None, None, None, None, None


def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                    ref_weight: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                    direction: str = "forward", positions: str = "all", bias: Optional[torch.Tensor] = None,
                    ref_bias: Optional[torch.Tensor] = None, num_items_in_batch=None, backend: str = "auto",
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """KL between ``softmax(ref_hidden @ ref_weight.T + ref_bias)`` (reference, detached) and
    ``softmax(hidden @ weight.T + bias)`` (current), averaged over rows.

    ``hidden``/``ref_hidden`` (N, H) and (N, H_ref) row-aligned; ``weight`` (V, H),
    ``ref_weight`` (V, H_ref) (the two models may differ in width and dtype, not in vocab);
    ``labels`` (N,) aligned, needed for ``positions="answer"``. ``num_items_in_batch`` replaces
    the row count (``"all"``) or the valid-label count (``"answer"``) under gradient accumulation.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; valid: {', '.join(KL_DIRECTIONS)}")
    if positions not in KL_POSITIONS:
        raise ValueError(f"unknown KL positions {positions!r}; valid: {', '.join(KL_POSITIONS)}")
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = common.autocast_inputs(
        hidden.device, hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    common.check_head(hidden, weight, bias)
    common.check_head(ref_hidden, ref_weight, ref_bias, what="ref_hidden")
    if ref_hidden.shape[0] != hidden.shape[0]:
        raise ValueError(f"ref_hidden has {ref_hidden.shape[0]} rows but hidden has {hidden.shape[0]}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"reference vocab {ref_weight.shape[0]} does not match current vocab {weight.shape[0]}")
    if ref_hidden.device != hidden.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but hidden is on {hidden.device}")
    if positions == "answer":
        if labels is None:
            raise ValueError('positions="answer" needs labels')
        common.check_labels(labels, hidden.shape[0], hidden.device)
    backend = resolve_backend(backend, hidden.device)
    if backend == "triton" and torch.float64 in (hidden.dtype, ref_hidden.dtype):
        raise ValueError("the Triton kernels take fp32/bf16/fp16; use backend='torch' for fp64")
    cfg = (direction == "reverse", positions, num_items_in_batch, backend, chunk_size)
    detached = [None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    with torch.autocast(hidden.device.type, enabled=False):  # one compute dtype (autocast_inputs)
        if any(common.grads_needed(hidden, weight, bias)):
            return _FusedKL.apply(hidden, weight, bias, *detached, labels, cfg)
        return _run(hidden, weight, bias, *detached, labels, cfg, (False, False, False))[0]  # evaluation: loss only
