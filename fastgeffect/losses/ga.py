"""GA: gradient ascent on the forget NLL, written as minimising the token-mean log-likelihood."""
import torch

from ._common import NumItems
from .token_weights import token_weighted


def ga(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
       return_details: bool = False, per_sample: bool = False):
    """token-mean of ``logp_t``. Every token weighs 1."""
    return token_weighted("ga", logits, labels, num_items_in_batch=num_items_in_batch,
                          return_details=return_details, per_sample=per_sample)
