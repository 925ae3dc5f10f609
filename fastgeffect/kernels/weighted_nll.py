"""Fused LM head + token-weighted log-likelihood: GA, WGA, TNPO, WTNPO and plain NLL.

``loss = scale · Σ_valid w_t · logp_t`` with ``w_t`` detached (DESIGN.md §3) and
``scale = 1 / (valid count or num_items_in_batch)``. Valid rows are gathered first, then
processed in chunks: logits chunk = LM-head matmul, the chunk op (Triton or torch) turns it
into per-row log-probs, weights and the logits gradient in place, and two more matmuls turn
that into d(hidden) and an fp32-accumulated d(weight). The backward only multiplies the stored
gradients by the upstream scalar. Peak extra memory: a few (chunk × vocab) buffers, d(hidden)
and the fp32 d(weight) accumulator — never (tokens × vocab).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import common
from .dispatch import resolve_backend
from .weighted_nll_torch import weighted_nll_chunk_torch


def _chunk_op(backend: str):
    if backend == "triton":
        from .weighted_nll_triton import weighted_nll_chunk_triton
        return weighted_nll_chunk_triton
    return weighted_nll_chunk_torch


def _run(hidden, weight, bias, labels, ref, explicit, cfg, need):
    """The whole fused computation. ``need`` = (d hidden?, d weight?, d bias?).
    Returns loss (0-d fp32/fp64), per-token logp (N,), and the three gradients (or None)."""
    code, alpha, beta, reduction, num_items, backend, chunk_size = cfg
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc = common.grad_dtype(hidden.dtype)
    idx, n_valid, items = common.compact_valid(labels, V, num_items)
    denom = 1.0 if reduction == "sum" else (items if items is not None else float(n_valid))
    scale = torch.full((), 1.0 / denom, dtype=acc, device=device)
    write_grad = any(need)

    logp_all = torch.zeros(N, dtype=acc, device=device)
    total = torch.zeros((), dtype=acc, device=device)
    g_hidden = torch.zeros_like(hidden) if need[0] else None
    g_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need[1] else None
    g_bias = torch.zeros(V, dtype=acc, device=device) if need[2] else None

    op = _chunk_op(backend)
    rows = common.chunk_rows(n_valid, V, device, chunk_size=chunk_size) if n_valid else 1
    for start in range(0, n_valid, rows):
        sel = idx[start:start + rows]
        h = hidden.index_select(0, sel)
        logits = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
        y = labels.index_select(0, sel)
        r = None if ref is None else ref.index_select(0, sel)
        e = None if explicit is None else explicit.index_select(0, sel)
        lp, wlp = op(logits, y, r, e, scale, code, alpha, beta, write_grad)
        logp_all.index_copy_(0, sel, lp.to(acc))
        total += wlp.sum(dtype=acc)
        if need[0]:
            g_hidden.index_copy_(0, sel, logits @ weight)
        if need[1]:
            common.addmm_fp32_(g_weight, logits.t(), h)
        if need[2]:
            g_bias += logits.sum(0, dtype=acc)
    return total * scale, logp_all, g_hidden, g_weight, g_bias


class _FusedWeightedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref, explicit, cfg):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, logp, gh, gw, gb = _run(hidden, weight, bias, labels, ref, explicit, cfg, need)
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        gh, gw, gb = common.scale_grads(ctx.saved_tensors, grad_loss, ctx.dtypes)
        return gh, gw, gb, None, None, None, None


def fused_linear_weighted_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              objective: str = "ga", alpha: Optional[float] = None,
                              beta: Optional[float] = None, ref_logprobs: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, reduction: str = "mean",
                              num_items_in_batch=None, wtnpo_form: str = "eq16",
                              weights: Optional[torch.Tensor] = None, return_logprobs: bool = False,
                              backend: str = "auto", chunk_size: Optional[int] = None):
    """Token-weighted log-likelihood of ``labels`` under ``hidden @ weight.T (+ bias)``.

    Args:
        hidden: (N, H) final hidden states; row i predicts ``labels[i]`` (already shifted).
        weight: (V, H) LM-head weight (tied embeddings are fine); ``bias`` (V,) optional.
        labels: (N,) int ids, -100 ignored.
        objective: ``"ga"`` (+mean logp), ``"nll"`` (−mean logp; GD/PO), ``"wga"``, ``"tnpo"``,
            ``"wtnpo"`` (``wtnpo_form`` ``"eq16"`` or ``"product"``) with the weights, signs and
            defaults of the same-named :mod:`fastgeffect.losses` functions, or ``"weighted"``:
            mean of ``weights[i]·logp_i`` with caller-given detached ``weights`` (N,).
        ref_logprobs: (N,) reference log-probs aligned with ``labels`` (TNPO/WTNPO only).
        reduction: ``"mean"`` (divide by the valid count, or by ``num_items_in_batch`` under
            gradient accumulation) or ``"sum"``.
        return_logprobs: also return the (N,) per-token log-probs (detached; 0 on ignored rows).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (see :mod:`.dispatch`).
        chunk_size: rows per chunk (default: a fixed logits-element budget).

    One host synchronisation per call (the valid-row count, see ``common.compact_valid``).
    Non-finite inputs are not checked (that would cost another synchronisation): they give a
    non-finite loss. Raises ``AllMaskedError`` when no label is valid and no
    ``num_items_in_batch`` is given, like :mod:`fastgeffect.losses`.
    """
    common.check_head(hidden, weight, bias)
    N = hidden.shape[0]
    common.check_labels(labels, N, hidden.device)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r} (per-token values: "
                         "use return_logprobs=True)")
    code, alpha, beta = common.objective_code(objective, alpha, beta, wtnpo_form)
    if objective in common.NEEDS_REF:
        if ref_logprobs is None:
            raise ValueError(f"objective {objective!r} needs ref_logprobs (N,) aligned with labels")
        common.check_per_token(ref_logprobs, N, hidden.device, "ref_logprobs")
        ref_logprobs = ref_logprobs.detach()
    elif ref_logprobs is not None:
        raise ValueError(f"ref_logprobs is only used by {', '.join(common.NEEDS_REF)}, not {objective!r}")
    if objective == "weighted":
        if weights is None:
            raise ValueError("objective 'weighted' needs weights (N,)")
        common.check_per_token(weights, N, hidden.device, "weights")
        weights = weights.detach()
    elif weights is not None:
        raise ValueError("weights are only used by objective='weighted'")
    backend = resolve_backend(backend, hidden.device)
    cfg = (code, alpha, beta, reduction, num_items_in_batch, backend, chunk_size)
    loss, logp = _FusedWeightedNLL.apply(hidden, weight, bias, labels, ref_logprobs, weights, cfg)
    return (loss, logp) if return_logprobs else loss
