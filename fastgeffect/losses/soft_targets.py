"""Cross-entropy against a soft target distribution at the answer positions: the shared core of
UNDIAL (a teacher's adjusted distribution) and CE-U (the model's own, true token removed)."""
from typing import Tuple

import torch

from ._common import NumItems, _upcast, check_finite, token_mean


def answer_rows(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (N, V) logits of the positions that predict a label in ``mask`` (B, T) and those (N,)
    labels, in the row-major order of ``mask``'s true entries (position t predicts label t + 1)."""
    shifted = mask[:, 1:]
    return logits[:, :-1][shifted], labels[:, 1:][shifted].long()


def soft_cross_entropy(logp: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``−Σ_v q_v·logp_v`` per row with ``q = softmax(target_logits)``, detached; an entry with
    q_v = 0 (target logit −inf) adds nothing whatever logp_v is (0·log 0 = 0, not NaN); a NaN q
    stays NaN (so that the callers' finiteness check sees it)."""
    q = torch.softmax(_upcast(target_logits.detach()).to(logp.dtype), -1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return -torch.where(q == 0, zero, q * logp).sum(-1)


def scatter_aligned(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) per-row values back to (B, T) aligned with labels, 0 where ``mask`` is false."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def soft_target_loss(logp: torch.Tensor, target_logits: torch.Tensor, tok_logp: torch.Tensor, mask: torch.Tensor,
                     what: str, num_items_in_batch: NumItems, return_details: bool, per_sample: bool):
    """The token-mean of :func:`soft_cross_entropy` over ``mask`` (B, T), and with
    ``return_details`` the per-token cross-entropy, log-probs, mask and mean NLL; ``what`` names
    the loss's inputs in the error a non-finite cross-entropy raises."""
    ce = scatter_aligned(soft_cross_entropy(logp, target_logits), mask)
    check_finite(ce, mask, what)
    loss = token_mean(ce, mask, num_items_in_batch, per_sample)
    if not return_details:
        return loss
    return loss, {"cross_entropy": ce.detach(), "logprobs": tok_logp.detach(), "mask": mask,
                  "nll": -tok_logp.detach()[mask].mean()}
