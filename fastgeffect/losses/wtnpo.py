"""WTNPO: TNPO with an extra confidence weighting (paper eq. 16, or the paper code's product)."""
import torch

from ._common import NumItems, prepare, weighted_token_loss
from .tnpo import tnpo_weights

WTNPO_FORMS = ("eq16", "product")


def wtnpo_weights(tok_logp: torch.Tensor, ref_logprobs: torch.Tensor, alpha: float, beta: float,
                  form: str = "eq16") -> torch.Tensor:
    """``eq16``: ``2σ((β+α)·logp − β·logp_ref) = 2p^{β+α} / (p^{β+α} + p_ref^β)``.
    ``product``: the paper code's ``2σ(β(logp − logp_ref)) · p^α`` (TNPO weight times p^α)."""
    logp = tok_logp.detach()
    if form == "eq16":
        return 2.0 * torch.sigmoid((beta + alpha) * logp - beta * ref_logprobs)
    if form == "product":
        return tnpo_weights(logp, ref_logprobs, beta) * torch.exp(alpha * logp)
    raise ValueError(f"unknown WTNPO form {form!r}; valid: {', '.join(WTNPO_FORMS)}")


def wtnpo(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor, alpha: float = 1.5,
          beta: float = 4.0, *, form: str = "eq16", num_items_in_batch: NumItems = None,
          return_details: bool = False, per_sample: bool = False):
    """token-mean of ``w_t · logp_t`` with the WTNPO weight (defaults alpha = 1.5, beta = 4)."""
    tok_logp, mask, ref = prepare(logits, labels, ref_logprobs)
    w = wtnpo_weights(tok_logp, ref, alpha, beta, form)
    return weighted_token_loss(tok_logp, w, mask, num_items_in_batch,
                               return_details, per_sample)
