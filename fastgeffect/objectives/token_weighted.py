"""Shared forward for the token-weighted objectives (GA, WGA, TNPO, WTNPO, PO, GD): either
materialised logits + :mod:`fastgeffect.losses`, or the fused kernels (``fused=True``)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from ..losses import tnpo_weights, valid_mask, wga_weights, wtnpo_weights
from .base import Batch, StepContext

# the detached token weight of each fused objective, for logging (kwargs: the loss's hyper-parameters)
WEIGHTS: Dict[str, Callable] = {
    "ga": lambda lp, ref, kw: torch.ones_like(lp),
    "nll": lambda lp, ref, kw: torch.full_like(lp, -1.0),
    "wga": lambda lp, ref, kw: wga_weights(lp, kw["alpha"]),
    "tnpo": lambda lp, ref, kw: tnpo_weights(lp, ref, kw["beta"]),
    "wtnpo": lambda lp, ref, kw: wtnpo_weights(lp, ref, kw["alpha"], kw["beta"], kw["form"]),
}


def fused_details(kernel_objective: str, tok_logp: torch.Tensor, ref: Optional[torch.Tensor], labels: torch.Tensor,
                  kwargs: dict) -> dict:
    """The same logging details as the unfused losses, from the kernel's per-token log-probs."""
    mask = valid_mask(labels)
    weights = WEIGHTS[kernel_objective](tok_logp, ref, kwargs).masked_fill(~mask, 0.0)
    return {"weights": weights, "logprobs": tok_logp, "mask": mask, "nll": -tok_logp[mask].mean()}


def token_weighted_loss(ctx: StepContext, batch: Batch, loss_fn: Callable, kernel_objective: str,
                        hp: Dict[str, float], num_items_key: str, needs_ref: bool = False,
                        hp_names: Sequence[str] = (), kernel_names: Optional[Dict[str, str]] = None):
    """Loss and details of ``loss_fn(logits, labels, [ref], **hp)`` on ``batch``; ``kernel_names`` renames
    hyper-parameters for the fused kernel's keyword arguments."""
    kwargs = {k: hp[k] for k in hp_names}
    ref: Optional[torch.Tensor] = ctx.ref_logprobs(batch) if needs_ref else None
    n_items = ctx.num_items.get(num_items_key)
    if ctx.fused and not ctx.per_sample:
        from ..kernels import fused_causal_lm_loss

        renamed = {(kernel_names or {}).get(k, k): v for k, v in kwargs.items()}
        loss, tok_logp = fused_causal_lm_loss(ctx.model, batch["input_ids"], batch.get("attention_mask"),
                                              batch["labels"], objective=kernel_objective, ref_logprobs=ref,
                                              num_items_in_batch=n_items, return_logprobs=True, **renamed)
        return loss, fused_details(kernel_objective, tok_logp, ref, batch["labels"], kwargs)
    logits = ctx.forward(batch).logits
    args = (logits, batch["labels"]) if ref is None else (logits, batch["labels"], ref)
    loss, details = loss_fn(*args, **kwargs, num_items_in_batch=n_items, return_details=True,
                            per_sample=ctx.per_sample)
    return loss, details
