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

from ..losses.kl import KL_DIRECTIONS, KL_POSITIONS
from . import common
from .dispatch import resolve_backend
from .kl_torch import kl_chunk_torch


def _chunk_op(backend: str):
    if backend == "triton":
        from .kl_triton import kl_chunk_triton
        return kl_chunk_triton
    return kl_chunk_torch


def _run(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cfg, need):
    reverse, positions, backend, chunk_size = cfg
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc = common.grad_dtype(hidden.dtype)
    if positions == "all":
        if N == 0:
            raise common.AllMaskedError("no rows for the KL")
        idx, n = None, N
    else:
        idx, n, _ = common.compact_valid(labels, V)
    scale = torch.full((), 1.0 / n, dtype=acc, device=device)
    write_grad = any(need)
    g_hidden = torch.zeros_like(hidden) if need[0] else None
    g_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need[1] else None
    g_bias = torch.zeros(V, dtype=acc, device=device) if need[2] else None
    total = torch.zeros((), dtype=acc, device=device)

    op = _chunk_op(backend)
    rows = common.chunk_rows(n, V, device, buffers=2, chunk_size=chunk_size)
    for start in range(0, n, rows):
        if idx is None:
            h, rh = hidden[start:start + rows], ref_hidden[start:start + rows]
        else:
            sel = idx[start:start + rows]
            h, rh = hidden.index_select(0, sel), ref_hidden.index_select(0, sel)
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        ref_logits = rh @ ref_weight.t() if ref_bias is None else torch.addmm(ref_bias, rh, ref_weight.t())
        total += op(logits, ref_logits, scale, reverse, write_grad).sum(dtype=acc)
        del ref_logits
        if need[0]:
            gh = logits @ weight
            if idx is None:
                g_hidden[start:start + rows] = gh
            else:
                g_hidden.index_copy_(0, sel, gh)
        if need[1]:
            common.addmm_fp32_(g_weight, logits.t(), h)
        if need[2]:
            g_bias += logits.sum(0, dtype=acc)
    return total * scale, g_hidden, g_weight, g_bias


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cfg):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, gh, gw, gb = _run(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, cfg, need)
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gh, gw, gb = common.scale_grads(ctx.saved_tensors, grad_loss, ctx.dtypes)
        return gh, gw, gb, None, None, None, None, None


def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor,
                    ref_weight: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                    direction: str = "forward", positions: str = "all", bias: Optional[torch.Tensor] = None,
                    ref_bias: Optional[torch.Tensor] = None, backend: str = "auto",
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """KL between ``softmax(ref_hidden @ ref_weight.T + ref_bias)`` (reference, detached) and
    ``softmax(hidden @ weight.T + bias)`` (current), averaged over rows.

    ``hidden``/``ref_hidden`` (N, H) and (N, H_ref) row-aligned; ``weight`` (V, H),
    ``ref_weight`` (V, H_ref) (the two models may differ in width and dtype, not in vocab);
    ``labels`` (N,) aligned, needed for ``positions="answer"``.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; valid: {', '.join(KL_DIRECTIONS)}")
    if positions not in KL_POSITIONS:
        raise ValueError(f"unknown KL positions {positions!r}; valid: {', '.join(KL_POSITIONS)}")
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
    cfg = (direction == "reverse", positions, backend, chunk_size)
    detached = [None if t is None else t.detach() for t in (ref_hidden, ref_weight, ref_bias)]
    return _FusedKL.apply(hidden, weight, bias, *detached, labels, cfg)
