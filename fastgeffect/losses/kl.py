"""KL regulariser between the original (reference) and current next-token distributions."""
from typing import Optional

import torch

from ._common import AllMaskedError, NumItems, _upcast, check_logits_labels, positive_count, valid_mask, why_empty
from .hparams import HPARAMS

KL_DIRECTIONS = HPARAMS["kl_direction"].choices
KL_POSITIONS = HPARAMS["kl_positions"].choices


def kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ_v p·(log p − log q) over the last dimension with 0·log 0 = 0: entries where p is 0 (a logit
    of −inf, e.g. a masked vocabulary entry) add nothing, whatever q is there (no 0·∞ = NaN)."""
    p = logp.exp()
    return (p * torch.where(p > 0, logp - logq, torch.zeros((), dtype=logp.dtype, device=logp.device))).sum(-1)


def kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
       direction: str = "forward", positions: str = "all", num_items_in_batch: NumItems = None,
       return_details: bool = False):
    """``forward``: KL(p_ref ‖ p_θ) (TOFU's choice); ``reverse``: KL(p_θ ‖ p_ref).

    ``positions="all"`` averages over every position of the (B, T) logits, padding included,
    exactly as TOFU's ``kl_div(..., reduction="batchmean")`` on flattened logits does.
    ``positions="answer"`` averages over the positions that predict a valid label (shifted).

    Vocabulary entries with probability 0 (logit −inf) follow 0·log 0 = 0: a reference that masks
    entries gives a finite forward KL; the reverse KL is then infinite (the current model puts
    mass where the reference has none) and raises.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; valid: {', '.join(KL_DIRECTIONS)}")
    if positions not in KL_POSITIONS:
        raise ValueError(f"unknown KL positions {positions!r}; valid: {', '.join(KL_POSITIONS)}")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} does not match logits {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise AllMaskedError(f"no position for the KL: logits have shape {tuple(logits.shape)} (an empty batch, "
                             "empty sequences or an empty vocabulary)")
    num_items_in_batch = positive_count(num_items_in_batch, "num_items_in_batch")
    logq = torch.log_softmax(_upcast(logits), -1)
    logr = torch.log_softmax(_upcast(ref_logits.detach()), -1).to(logq.dtype)
    per_pos = kl_terms(logr, logq) if direction == "forward" else kl_terms(logq, logr)
    if positions == "all":
        loss = per_pos.sum() / (per_pos.numel() if num_items_in_batch is None else num_items_in_batch)
    else:
        if labels is None:
            raise ValueError('positions="answer" needs labels')
        check_logits_labels(logits, labels)
        # position t predicts labels[t+1]: shift the valid mask left by one
        mask = valid_mask(labels)[:, 1:]
        if not bool(mask.any()):
            raise AllMaskedError(f"{why_empty(valid_mask(labels))}: no answer position for the KL")
        loss = per_pos[:, :-1][mask].sum() / (mask.sum() if num_items_in_batch is None else num_items_in_batch)
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(_non_finite_kl(logits, ref_logits, direction))
    if not return_details:
        return loss
    return loss, {"per_position": per_pos.detach()}


def _non_finite_kl(logits: torch.Tensor, ref_logits: torch.Tensor, direction: str) -> str:
    """Why the KL is not finite (the error path only)."""
    for name, x in (("logits", logits), ("ref_logits", ref_logits)):
        x = x.detach()
        if bool(torch.isnan(x).any()) or bool((x == float("inf")).any()):
            return f"non-finite KL: {name} contain NaN or +inf"
        if bool((x == float("-inf")).all(-1).any()):
            return f"non-finite KL: a row of {name} is −inf everywhere (no distribution)"
    zero, mass = ("ref_logits", "current model") if direction == "reverse" else ("logits", "reference")
    other = "forward" if direction == "reverse" else "reverse"
    return (f"the {direction} KL is infinite: {zero} are −inf (probability 0) at vocabulary entries where "
            f"the {mass} has probability > 0; the {other} KL is finite there, or mask both alike")
