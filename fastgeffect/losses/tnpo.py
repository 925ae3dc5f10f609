"""TNPO: token-wise NPO, a GA whose token weights come from the NPO weight of each token."""
import torch

from ._common import NumItems, prepare, weighted_token_loss


def tnpo_weights(tok_logp: torch.Tensor, ref_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """``w_t = 2σ(β(logp_t − logp_ref_t)) = 2p^β / (p^β + p_ref^β)``: in (0, 2), increasing in p."""
    return 2.0 * torch.sigmoid(beta * (tok_logp.detach() - ref_logprobs))


def tnpo(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor, beta: float = 4.0, *,
         num_items_in_batch: NumItems = None, return_details: bool = False, per_sample: bool = False):
    """token-mean of ``w_t · logp_t``, ``w_t = 2σ(β(logp_t − logp_ref_t))`` (paper default beta = 4)."""
    tok_logp, mask, ref = prepare(logits, labels, ref_logprobs)
    return weighted_token_loss(tok_logp, tnpo_weights(tok_logp, ref, beta), mask, num_items_in_batch,
                               return_details, per_sample)
