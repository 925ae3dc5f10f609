"""Plain token-mean NLL: the GD regulariser, the PO objective and the default G-effect risk."""
import torch

from ._common import NumItems, prepare, weighted_token_loss


def nll(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
        return_details: bool = False, per_sample: bool = False):
    """token-mean of ``−logp_t`` over valid tokens."""
    tok_logp, mask, _ = prepare(logits, labels)
    return weighted_token_loss(tok_logp, torch.full_like(tok_logp, -1.0), mask, num_items_in_batch,
                               return_details, per_sample)


def gd(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
       return_details: bool = False, per_sample: bool = False):
    """GD regulariser: token-mean NLL on retain answers."""
    return nll(logits, labels, num_items_in_batch=num_items_in_batch, return_details=return_details,
               per_sample=per_sample)
