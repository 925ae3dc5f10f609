"""Shared forward for the token-weighted objectives (GA, WGA, TNPO, WTNPO, PO, GD): either
materialised logits + :mod:`fastgeffect.losses`, or the fused kernels (``fused=True``)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from .base import Batch, StepContext


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
        loss = fused_causal_lm_loss(ctx.model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                    objective=kernel_objective, ref_logprobs=ref, num_items_in_batch=n_items,
                                    **renamed)
        return loss, {}
    logits = ctx.forward(batch).logits
    args = (logits, batch["labels"]) if ref is None else (logits, batch["labels"], ref)
    loss, details = loss_fn(*args, **kwargs, num_items_in_batch=n_items, return_details=True,
                            per_sample=ctx.per_sample)
    return loss, details
