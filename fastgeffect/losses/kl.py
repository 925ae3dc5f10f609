"""KL regulariser between the original (reference) and current next-token distributions."""
from typing import Optional

import torch

from ._common import AllMaskedError, NumItems, _upcast, check_logits_labels, valid_mask

KL_DIRECTIONS = ("forward", "reverse")
KL_POSITIONS = ("all", "answer")


def kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
       direction: str = "forward", positions: str = "all", num_items_in_batch: NumItems = None,
       return_details: bool = False):
    """``forward``: KL(p_ref ‖ p_θ) (TOFU's choice); ``reverse``: KL(p_θ ‖ p_ref).

    ``positions="all"`` averages over every position of the (B, T) logits, padding included,
    exactly as TOFU's ``kl_div(..., reduction="batchmean")`` on flattened logits does.
    ``positions="answer"`` averages over the positions that predict a valid label (shifted).
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; valid: {', '.join(KL_DIRECTIONS)}")
    if positions not in KL_POSITIONS:
        raise ValueError(f"unknown KL positions {positions!r}; valid: {', '.join(KL_POSITIONS)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} does not match logits {tuple(logits.shape)}")
    logq = torch.log_softmax(_upcast(logits), -1)
    logr = torch.log_softmax(_upcast(ref_logits.detach()), -1).to(logq.dtype)
    if direction == "forward":
        per_pos = (logr.exp() * (logr - logq)).sum(-1)
    else:
        per_pos = (logq.exp() * (logq - logr)).sum(-1)
    if positions == "all":
        loss = per_pos.sum() / (per_pos.numel() if num_items_in_batch is None else num_items_in_batch)
    else:
        if labels is None:
            raise ValueError('positions="answer" needs labels')
        check_logits_labels(logits, labels)
        # position t predicts labels[t+1]: shift the valid mask left by one
        mask = valid_mask(labels)[:, 1:]
        if not bool(mask.any()):
            raise AllMaskedError("all labels are -100: no answer position for the KL")
        loss = per_pos[:, :-1][mask].sum() / (mask.sum() if num_items_in_batch is None else num_items_in_batch)
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError("non-finite KL (NaN or inf in logits)")
    if not return_details:
        return loss
    return loss, {"per_position": per_pos.detach()}
