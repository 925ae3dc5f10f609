"""GA: gradient ascent on the forget NLL, written as minimising the token-mean log-likelihood."""
import torch

from ._common import NumItems, prepare, weighted_token_loss


def ga(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
       return_details: bool = False, per_sample: bool = False):
    """token-mean of ``logp_t``. Every token weighs 1."""
    tok_logp, mask, _ = prepare(logits, labels)
    return weighted_token_loss(tok_logp, torch.ones_like(tok_logp), mask, num_items_in_batch,
                               return_details, per_sample)
