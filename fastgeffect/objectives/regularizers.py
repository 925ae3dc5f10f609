"""Retain regularisers (docs/design.md §3), each ``reg(ctx, retain_batch, hp) -> loss``, with their
hyper-parameter defaults and whether they need the original model θ_o itself.

Each can run as PDU's constraint (open-unlearning's primal-dual unlearning): with a dual step
``dual_step`` η > 0 and a bound ``constraint_eps`` ε, the weight λ becomes the dual variable of
``reg_loss ≤ ε``, moved after every step by :func:`dual_ascent` (:meth:`Objective.dual_update`).
η = 0, the default, keeps λ fixed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from ..kernels.hf import fused_causal_lm_kl
from ..losses import kl, rr
from ..model_structure import resolve_layer
from .base import StepContext
from .token_weighted import token_weighted_loss


def gd_reg(ctx: StepContext, batch, hp):
    return token_weighted_loss(ctx, batch, "nll", hp, "retain_tokens")[0]


def kl_reg(ctx: StepContext, batch, hp):
    if ctx.reference is None:
        raise ValueError("the KL regulariser needs the original model: pass reference=ReferenceModel(...)")
    key = "retain_rows" if hp["kl_positions"] == "all" else "retain_tokens"
    kw = dict(direction=hp["kl_direction"], positions=hp["kl_positions"], num_items_in_batch=ctx.num_items.get(key))
    # the fused KL runs θ_o's decoder itself: a separate frozen copy; a PEFT reference (the same model
    # with its adapters switched off by ReferenceModel) takes the materialised-logits path
    if ctx.fused and not ctx.reference.peft_adapters_off:
        return fused_causal_lm_kl(ctx.model, ctx.reference.model, batch["input_ids"], batch.get("attention_mask"),
                                  batch["labels"], **kw)
    return kl(ctx.forward(batch).logits, ctx.reference.logits(batch), batch["labels"], **kw)


def rr_reg(ctx: StepContext, batch, hp):
    if ctx.reference is None:
        raise ValueError("the RR regulariser needs the original model: pass reference=ReferenceModel(...)")
    k = resolve_layer(ctx.model, hp["rr_layer"])
    h = ctx.forward(batch, hidden_layer=k).hidden_states[k + 1]
    return rr(h, ctx.reference.hidden_states(batch, k), batch["labels"],
              num_items_in_batch=ctx.num_items.get("retain_positions"))


def dual_ascent(lam: float, reg_loss: float, eps: float, step: float) -> float:
    """PDU's dual update after a step whose retain loss was ``reg_loss``: ``max(0, λ + η·(reg_loss − ε))``
    (λ grows while the constraint is violated and shrinks, never below 0, while it holds)."""
    return max(0.0, lam + step * (reg_loss - eps))


# PDU's hyper-parameters, which every regulariser takes; off (a fixed λ) while the dual step is 0
PDU_DEFAULTS: Dict[str, object] = {"constraint_eps": 0.0, "dual_step": 0.0}


@dataclass(frozen=True)
class Regularizer:
    name: str
    fn: Optional[Callable]  # None: no regulariser
    defaults: Dict[str, object]  # hyper-parameter names (see hparams.HPARAMS) and defaults
    needs_reference_model: bool = False  # θ_o itself at every step (not cached log-probs)


REGULARIZERS: Dict[str, Regularizer] = {r.name: r for r in (
    Regularizer("none", None, {}),
    Regularizer("gd", gd_reg, dict(PDU_DEFAULTS)),
    Regularizer("kl", kl_reg, {"kl_direction": "forward", "kl_positions": "all", **PDU_DEFAULTS},
                needs_reference_model=True),
    Regularizer("rr", rr_reg, {"rr_layer": -1, **PDU_DEFAULTS}, needs_reference_model=True),
)}
