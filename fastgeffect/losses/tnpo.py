"""TNPO: token-wise NPO, a GA whose token weights come from the NPO weight of each token."""
import torch

from ._common import NumItems
from .token_weights import TNPO, token_weighted


def tnpo_weights(tok_logp: torch.Tensor, ref_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """``w_t = 2σ(β(logp_t − logp_ref_t)) = 2p^β / (p^β + p_ref^β)``: in (0, 2), increasing in p."""
    return TNPO.weights(tok_logp, ref_logprobs, hp={"beta": beta})


def tnpo(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor,
         beta: float = TNPO.defaults["beta"], *, num_items_in_batch: NumItems = None, return_details: bool = False,
         per_sample: bool = False):
    """token-mean of ``w_t · logp_t``, ``w_t = 2σ(β(logp_t − logp_ref_t))`` (paper default beta = 4)."""
    return token_weighted("tnpo", logits, labels, ref_logprobs, beta=beta, num_items_in_batch=num_items_in_batch,
                          return_details=return_details, per_sample=per_sample)
