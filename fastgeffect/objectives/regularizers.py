"""Retain regularisers (DESIGN.md §3), each ``reg(ctx, retain_batch, hp) -> loss``."""
from __future__ import annotations

from typing import Callable, Dict

from ..losses import gd, kl, rr
from ..models import resolve_layer
from .base import StepContext
from .token_weighted import token_weighted_loss


def gd_reg(ctx: StepContext, batch, hp):
    return token_weighted_loss(ctx, batch, gd, "nll", hp, "retain_tokens")[0]


def kl_reg(ctx: StepContext, batch, hp):
    if ctx.reference is None:
        raise ValueError("the KL regulariser needs the original model: pass reference=ReferenceModel(...)")
    key = "retain_rows" if hp["kl_positions"] == "all" else "retain_tokens"
    return kl(ctx.forward(batch).logits, ctx.reference.logits(batch), batch["labels"],
              direction=hp["kl_direction"], positions=hp["kl_positions"], num_items_in_batch=ctx.num_items.get(key))


def rr_reg(ctx: StepContext, batch, hp):
    if ctx.reference is None:
        raise ValueError("the RR regulariser needs the original model: pass reference=ReferenceModel(...)")
    k = resolve_layer(ctx.model, hp["rr_layer"])
    h = ctx.forward(batch, hidden_layer=k).hidden_states[k + 1]
    return rr(h, ctx.reference.hidden_states(batch, k), batch["labels"],
              num_items_in_batch=ctx.num_items.get("retain_positions"))


REGULARIZERS: Dict[str, Callable] = {"gd": gd_reg, "kl": kl_reg, "rr": rr_reg}
REGULARIZER_DEFAULTS: Dict[str, Dict[str, object]] = {
    "none": {},
    "gd": {},
    "kl": {"kl_direction": "forward", "kl_positions": "all"},
    "rr": {"rr_layer": -1},
}
