"""Plain token-mean NLL: the GD regulariser, the PO objective and the default G-effect risk."""
import torch

from ._common import NumItems
from .token_weights import token_weighted


def nll(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
        return_details: bool = False, per_sample: bool = False):
    """token-mean of ``−logp_t`` over valid tokens."""
    return token_weighted("nll", logits, labels, num_items_in_batch=num_items_in_batch,
                          return_details=return_details, per_sample=per_sample)


def gd(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
       return_details: bool = False, per_sample: bool = False):
    """GD regulariser: token-mean NLL on retain answers."""
    return nll(logits, labels, num_items_in_batch=num_items_in_batch, return_details=return_details,
               per_sample=per_sample)
