"""Fused LM head + token-weighted log-likelihood: GA, WGA, TNPO, WTNPO, SatImp and plain NLL.

``loss = scale · Σ_valid w_t · logp_t`` with ``w_t`` detached (docs/design.md §3) and
``scale = 1 / (valid count or num_items_in_batch)``. Valid rows are gathered first, then
processed in chunks: logits chunk = LM-head matmul, the chunk op (Triton or torch) turns it
into per-row log-probs, weights and the logits gradient in place, and two more matmuls turn
that into d(hidden) and an fp32-accumulated d(weight), all unscaled. The backward multiplies the
stored gradients by ``scale ×`` the upstream scalar in fp32 (``common.scale_grads``). Peak extra
memory: a few (chunk × vocab) buffers, d(hidden) and the fp32 d(weight) accumulator — never
(tokens × vocab).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..losses.token_weights import ALL, token_weight
from . import common
from .dispatch import resolve_backend
from .lm_head import chunked_lm_head, scale_of, take
from .token_weighted_torch import token_weighted_chunk_torch

# the objectives that read reference log-probs, for error messages
_NEEDS_REF = tuple(dict.fromkeys(w.name for w in ALL if w.needs_ref))


def _chunk_op(backend: str):
    if backend == "triton":
        # triton is imported only when its backend runs
        from .token_weighted_triton import token_weighted_chunk_triton
        return token_weighted_chunk_triton
    return token_weighted_chunk_torch


def _run(hidden, weight, bias, labels, ref, explicit, cfg, need):
    """The whole fused computation. ``need`` = (d hidden?, d weight?, d bias?).
    Returns loss (0-d fp32/fp64), per-token logp (N,), the three gradients (or None) *unscaled*,
    and the scale ``1/denominator`` that the backward applies (``common.scale_grads``)."""
    entry, alpha, beta, reduction, num_items, backend, chunk_size = cfg
    N, V = hidden.shape[0], weight.shape[0]
    acc = common.grad_dtype(hidden.dtype)
    idx, n_valid, items = common.compact_valid(labels, V, num_items)
    denom = 1.0 if reduction == "sum" else (items if items is not None else float(n_valid))
    scale = scale_of(denom, acc, hidden.device)
    logp_all = torch.zeros(N, dtype=acc, device=hidden.device)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    unit = torch.ones((), dtype=acc, device=hidden.device)  # gradients stored unscaled (fp16 underflow)
    chunk_op, write_grad = _chunk_op(backend), any(need)

    def op(rows, logits):
        lp, wlp = chunk_op(logits, take(labels, rows), take(ref, rows), take(explicit, rows), unit, entry,
                           alpha, beta, write_grad)
        logp_all.index_copy_(0, rows, lp.to(acc))
        total.add_(wlp.sum(dtype=acc))

    chunk = common.chunk_rows(n_valid, V, hidden.device, chunk_size=chunk_size) if n_valid else 1
    grads = chunked_lm_head(hidden, weight, bias, idx, n_valid, chunk, op, need)
    return (total * scale, logp_all, *grads, scale)


class _FusedWeightedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref, explicit, cfg):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, logp, gh, gw, gb, scale = _run(hidden, weight, bias, labels, ref, explicit, cfg, need)
        ctx.save_for_backward(gh, gw, gb, scale)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    @once_differentiable  # the stored gradients are constants: a double backward must raise, not detach
    def backward(ctx, grad_loss, _grad_logp):
        *grads, scale = ctx.saved_tensors
        gh, gw, gb = common.scale_grads(grads, grad_loss, scale, ctx.dtypes)
        return gh, gw, gb, None, None, None, None


def fused_linear_token_weighted(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              objective: str = "ga", alpha: Optional[float] = None,
                              beta: Optional[float] = None, beta1: Optional[float] = None,
                              beta2: Optional[float] = None, ref_logprobs: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None, reduction: str = "mean",
                              num_items_in_batch=None, wtnpo_form: Optional[str] = None,
                              weights: Optional[torch.Tensor] = None, return_logprobs: bool = False,
                              backend: str = "auto", chunk_size: Optional[int] = None):
    """Token-weighted log-likelihood of ``labels`` under ``hidden @ weight.T (+ bias)``.

    Args:
        hidden: (N, H) final hidden states; row i predicts ``labels[i]`` (already shifted).
        weight: (V, H) LM-head weight (tied embeddings are fine); ``bias`` (V,) optional.
        labels: (N,) int ids, -100 ignored.
        objective: an entry of :data:`fastgeffect.losses.TOKEN_WEIGHTS`: ``"ga"`` (+mean logp),
            ``"nll"`` (−mean logp; GD/PO), ``"wga"``, ``"tnpo"``, ``"wtnpo"`` (``wtnpo_form``
            ``"eq16"`` or ``"product"``), ``"satimp"`` (``beta1``, ``beta2``), with the table's weights
            and defaults (a hyper-parameter None: the default), or ``"weighted"``: mean of
            ``weights[i]·logp_i`` with caller-given detached ``weights`` (N,).
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
    hidden, weight, bias = common.autocast_inputs(hidden.device, hidden, weight, bias)
    common.check_head(hidden, weight, bias)
    N = hidden.shape[0]
    common.check_labels(labels, N, hidden.device)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r} (per-token values: "
                         "use return_logprobs=True)")
    entry = token_weight(objective, wtnpo_form)
    # the kernel's two scalar slots, filled by the hyper-parameters the entry names
    alpha, beta = entry.scalars({"alpha": alpha, "beta": beta, "beta1": beta1, "beta2": beta2})
    if entry.needs_ref:
        if ref_logprobs is None:
            raise ValueError(f"objective {objective!r} needs ref_logprobs (N,) aligned with labels")
        common.check_per_token(ref_logprobs, N, hidden.device, "ref_logprobs")
        ref_logprobs = ref_logprobs.detach()
    elif ref_logprobs is not None:
        raise ValueError(f"ref_logprobs is only used by {', '.join(_NEEDS_REF)}, not {objective!r}")
    if entry.needs_explicit:
        if weights is None:
            raise ValueError(f"objective {objective!r} needs weights (N,)")
        common.check_per_token(weights, N, hidden.device, "weights")
        weights = weights.detach()
    elif weights is not None:
        raise ValueError("weights are only used by objective='weighted'")
    backend = resolve_backend(backend, hidden.device)
    cfg = (entry, alpha, beta, reduction, num_items_in_batch, backend, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):  # one compute dtype (autocast_inputs)
        if any(common.grads_needed(hidden, weight, bias)):
            loss, logp = _FusedWeightedNLL.apply(hidden, weight, bias, labels, ref_logprobs, weights, cfg)
        else:  # evaluation: loss and log-probs only
            loss, logp, *_ = _run(hidden, weight, bias, labels, ref_logprobs, weights, cfg, (False, False, False))
    return (loss, logp) if return_logprobs else loss
