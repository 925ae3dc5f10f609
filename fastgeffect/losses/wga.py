"""WGA: GA with each token weighted by its own (detached) probability raised to alpha."""
import torch

from ._common import NumItems, prepare, weighted_token_loss


def wga_weights(tok_logp: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w_t = p_t^alpha = exp(alpha * logp_t)``: in (0, 1], computed in log space."""
    return torch.exp(alpha * tok_logp.detach())


def wga(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 5.0, *, num_items_in_batch: NumItems = None,
        return_details: bool = False, per_sample: bool = False):
    """token-mean of ``w_t · logp_t`` with ``w_t = p_t^alpha`` (paper default alpha = 5)."""
    tok_logp, mask, _ = prepare(logits, labels)
    return weighted_token_loss(tok_logp, wga_weights(tok_logp, alpha), mask, num_items_in_batch,
                               return_details, per_sample)
