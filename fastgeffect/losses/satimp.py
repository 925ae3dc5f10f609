"""SatImp (open-unlearning): GA with each token weighted by saturation × importance,
``w_t = p_t^β1 · (1 − p_t)^β2`` (detached), a token-weighted objective of the table."""
import torch

from ._common import NumItems
from .token_weights import SATIMP, token_weighted


def satimp_weights(tok_logp: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """``w_t = p_t^β1 · (1 − p_t)^β2``: in [0, 1], 0 where p_t = 1 (β2 > 0)."""
    return SATIMP.weights(tok_logp, hp={"beta1": beta1, "beta2": beta2})


def satimp(logits: torch.Tensor, labels: torch.Tensor, beta1: float = SATIMP.defaults["beta1"],
           beta2: float = SATIMP.defaults["beta2"], *, num_items_in_batch: NumItems = None,
           return_details: bool = False, per_sample: bool = False):
    """token-mean of ``w_t · logp_t`` with ``w_t = p_t^β1·(1 − p_t)^β2`` (open-unlearning's
    ``compute_satimp_loss`` and defaults β1 = 5, β2 = 1)."""
    return token_weighted("satimp", logits, labels, beta1=beta1, beta2=beta2, num_items_in_batch=num_items_in_batch,
                          return_details=return_details, per_sample=per_sample)
