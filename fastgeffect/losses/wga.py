"""WGA: GA with each token weighted by its own (detached) probability raised to alpha."""
import torch

from ._common import NumItems
from .token_weights import WGA, token_weighted


def wga_weights(tok_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w_t = p_t^alpha = exp(alpha * logp_t)``: in (0, 1], computed in log space."""
    return WGA.weights(tok_logp, hp={"alpha": alpha})


def wga(logits: torch.Tensor, labels: torch.Tensor, alpha: float = WGA.defaults["alpha"], *,
        num_items_in_batch: NumItems = None, return_details: bool = False, per_sample: bool = False):
    """token-mean of ``w_t · logp_t`` with ``w_t = p_t^alpha`` (paper default alpha = 5)."""
    return token_weighted("wga", logits, labels, alpha=alpha, num_items_in_batch=num_items_in_batch,
                          return_details=return_details, per_sample=per_sample)
