"""The token-weighted forget terms (GA, GradDiff, WGA, TNPO, WTNPO, PO, SatImp) and the GD regulariser's
forward: materialised logits + :func:`fastgeffect.losses.token_weighted`, or the fused kernels
(``fused=True``). Weights, hyper-parameters and defaults come from the table in
:mod:`fastgeffect.losses.token_weights`; a new token-weighted objective is one entry there and one
line here (and its line in the registry)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ..kernels.hf import fused_causal_lm_loss
from ..losses import TOKEN_WEIGHTS, TokenWeight, token_weight, token_weighted, valid_mask
from .base import Batch, ForgetTerm, StepContext


def fused_details(entry: TokenWeight, tok_logp: torch.Tensor, ref: Optional[torch.Tensor], labels: torch.Tensor,
                  hp: Mapping[str, object]) -> dict:
    """The same logging details as the unfused losses, from the kernel's per-token log-probs."""
    mask = valid_mask(labels)
    weights = entry.weights(tok_logp, ref, hp=hp).masked_fill(~mask, 0.0)
    return {"weights": weights, "logprobs": tok_logp, "mask": mask, "nll": -tok_logp[mask].mean()}


def token_weighted_loss(ctx: StepContext, batch: Batch, objective: str, hp: Mapping[str, object],
                        num_items_key: str):
    """Loss and details of the table's ``objective`` on ``batch``, with its hyper-parameters read from ``hp``."""
    entry = token_weight(objective, hp.get("wtnpo_form"))
    kwargs: Dict[str, object] = {k: hp[k] for k in entry.defaults}
    ref: Optional[torch.Tensor] = ctx.ref_logprobs(batch) if entry.needs_ref else None
    n_items = ctx.num_items.get(num_items_key)
    if ctx.fused and not ctx.per_sample:
        loss, tok_logp = fused_causal_lm_loss(ctx.model, batch["input_ids"], batch.get("attention_mask"),
                                              batch["labels"], objective=objective, ref_logprobs=ref,
                                              num_items_in_batch=n_items, return_logprobs=True, **kwargs)
        return loss, fused_details(entry, tok_logp, ref, batch["labels"], kwargs)
    logits = ctx.forward(batch).logits
    return token_weighted(objective, logits, batch["labels"], ref, num_items_in_batch=n_items,
                          return_details=True, per_sample=ctx.per_sample, **kwargs)


def token_weighted_term(name: str, weight: Optional[str] = None, *, batch: str = "forget",
                        formula: Optional[str] = None, default_regularizer: str = "none") -> ForgetTerm:
    """The forget term ``name``: the token-weighted loss of table entry ``weight`` (default: ``name``)
    on sub-batch ``batch``, with the entry's defaults and reference needs."""
    entry = TOKEN_WEIGHTS[weight or name]

    def term(ctx: StepContext, batches: Mapping[str, Batch], hp: Mapping[str, object]):
        return token_weighted_loss(ctx, batches[batch], entry.name, hp, f"{batch}_tokens")

    return ForgetTerm(name, term, dict(entry.defaults), formula or f"token-mean of w_t·logp_t, w_t = {entry.formula}",
                      needs_batches=(batch,), ref_batches=(batch,) if entry.needs_ref else (),
                      default_regularizer=default_regularizer)


GA = token_weighted_term("ga", formula="token-mean of logp_t (gradient ascent on the forget NLL)")
GRADDIFF = token_weighted_term("graddiff", "ga", formula="GA + λ·GD (GD on retain answers)", default_regularizer="gd")
WGA = token_weighted_term("wga")
TNPO = token_weighted_term("tnpo")
WTNPO = token_weighted_term("wtnpo", formula="token-mean of w_t·logp_t, w_t = 2σ((β+α)·logp_t − β·logp_ref_t) "
                                             "(eq. 16; wtnpo_form='product': the paper code's TNPO weight · p^α)")
# open-unlearning pairs SatImp with the retain NLL (configs/trainer/SatImp.yaml)
SATIMP = token_weighted_term("satimp", default_regularizer="gd")
PO = token_weighted_term("po", "nll", batch="forget_idk",
                         formula="token-mean NLL of a refusal answer to the forget question")
