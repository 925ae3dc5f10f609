"""WTNPO: TNPO with an extra confidence weighting (paper eq. 16, or the paper code's product)."""
import torch

from ._common import NumItems
from .token_weights import WTNPO, token_weight, token_weighted


def wtnpo_weights(tok_logp: torch.Tensor, ref_logprobs: torch.Tensor, alpha: float, beta: float,
                  wtnpo_form: str = WTNPO.defaults["wtnpo_form"]) -> torch.Tensor:
    """``eq16``: ``2σ((β+α)·logp − β·logp_ref) = 2p^{β+α} / (p^{β+α} + p_ref^β)``.
    ``product``: the paper code's ``2σ(β(logp − logp_ref)) · p^α`` (TNPO weight times p^α)."""
    return token_weight("wtnpo", wtnpo_form).weights(tok_logp, ref_logprobs, hp={"alpha": alpha, "beta": beta})


def wtnpo(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor,
          alpha: float = WTNPO.defaults["alpha"], beta: float = WTNPO.defaults["beta"], *,
          wtnpo_form: str = WTNPO.defaults["wtnpo_form"], num_items_in_batch: NumItems = None,
          return_details: bool = False, per_sample: bool = False):
    """token-mean of ``w_t · logp_t`` with the WTNPO weight (defaults alpha = 1.5, beta = 4)."""
    return token_weighted("wtnpo", logits, labels, ref_logprobs, alpha=alpha, beta=beta, wtnpo_form=wtnpo_form,
                          num_items_in_batch=num_items_in_batch, return_details=return_details,
                          per_sample=per_sample)
