"""Shared pieces of the token-level losses: shifting, per-token log-probabilities, checks and
the token-mean reduction (docs/design.md §2).

Conventions
-----------
``logits`` are (B, T, V) and unshifted; ``labels`` are (B, T) with -100 on ignored positions.
Position t of the logits predicts ``labels[:, t + 1]``, as in Hugging Face. Per-token
quantities are returned *aligned with labels*: entry [b, t] belongs to ``labels[b, t]`` (so
column 0 is never valid), which is also how ``ref_logprobs`` are given.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

NumItems = Optional[Union[int, torch.Tensor]]


class AllMaskedError(ValueError):
    """Raised when a batch has no valid (non -100) label to average over."""


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, name: str = "logits") -> None:
    if logits.dim() != 3:
        raise ValueError(f"{name} must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if labels.dim() != 2 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {name} shape {tuple(logits.shape)} "
            "(expected labels of shape (batch, seq))"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} have an empty vocabulary dimension (shape {tuple(logits.shape)})")


def check_aligned(x: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if x.shape != labels.shape:
        raise ValueError(
            f"{name} shape {tuple(x.shape)} does not match labels shape {tuple(labels.shape)}; "
            f"{name}[b, t] must be the log-probability of labels[b, t]"
        )


def valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool mask of positions whose label is predicted: not -100 and not column 0."""
    mask = labels != IGNORE_INDEX
    mask[:, :1] = False  # column 0 has no prefix (a (B, 0) batch has no column at all)
    return mask


def why_empty(mask: torch.Tensor) -> str:
    """Why a (B, T) valid mask selects nothing: an empty batch, sequences too short to predict a
    token, or every label -100; for the errors of the losses."""
    b, t = mask.shape[0], mask.shape[-1]
    if b == 0:
        return "the batch is empty (0 sequences; check the data loader and the batch size)"
    if t < 2:
        return (f"the sequences have {t} token(s): a causal LM needs at least 2 (position t predicts "
                "label t + 1), so nothing is predicted (check the max length and the truncation)")
    return ("all labels are -100: the batch has no answer token to average over "
            "(check the collator's question masking and max length)")


def positive_count(n: NumItems, name: str) -> NumItems:
    """``num_items_in_batch`` / ``num_seqs_in_batch`` as given (None stays None), refused unless a
    positive finite number: 0 would divide by zero, a negative count flip the loss's sign."""
    if n is None:
        return None
    v = float(n.detach().reshape(())) if isinstance(n, torch.Tensor) else float(n)
    if v == 0:
        raise AllMaskedError(f"{name} must be positive, got 0: the accumulated batch has nothing to average over")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive count (the accumulated batch's size), got {v}")
    return n


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t] | prefix) aligned with labels, 0 where the position is not valid.

    Computed as ``-cross_entropy`` (one fused log-softmax + gather per row) in at least fp32.
    """
    check_logits_labels(logits, labels)
    B, T, V = logits.shape
    shift_logits = _upcast(logits[:, :-1, :]).reshape(-1, V)
    shift_labels = labels[:, 1:].reshape(-1).long()
    bad = (shift_labels != IGNORE_INDEX) & ((shift_labels < 0) | (shift_labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels contain ids outside the vocabulary [0, {V})")
    nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    out = torch.zeros(B, T, dtype=nll.dtype, device=logits.device)
    out[:, 1:] = -nll.view(B, max(T - 1, 0))
    return out


def count_valid(mask: torch.Tensor, num_items_in_batch: NumItems = None) -> torch.Tensor:
    """The token-mean divisor: the batch's valid-token count, or ``num_items_in_batch``
    (the count over a whole accumulated batch) when given."""
    n = mask.sum()
    if num_items_in_batch is None:
        if int(n) == 0:
            raise AllMaskedError(why_empty(mask))
        return n
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(mask.device)
    positive_count(num_items_in_batch, "num_items_in_batch")
    return torch.as_tensor(num_items_in_batch, device=mask.device)


def check_finite(x: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x[mask]).all()):
        raise FloatingPointError(f"non-finite {what} at valid positions (NaN or inf in the inputs)")


def token_mean(values: torch.Tensor, mask: torch.Tensor, num_items_in_batch: NumItems = None,
               per_sample: bool = False) -> torch.Tensor:
    """Sum of ``values`` over valid positions divided by the valid count (docs/design.md §2).
    ``per_sample=True`` gives the (B,) contributions of each sequence, which sum to the loss."""
    denom = count_valid(mask, num_items_in_batch)
    masked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked.sum(-1) / denom if per_sample else masked.sum() / denom


def sequence_logprobs(tok_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sum of per-token log-probabilities over each sequence's valid positions."""
    return torch.where(mask, tok_logp, torch.zeros((), dtype=tok_logp.dtype, device=tok_logp.device)).sum(-1)


def sequence_mean(values: torch.Tensor, num_seqs_in_batch: NumItems = None, per_sample: bool = False) -> torch.Tensor:
    """Mean over sequences; ``num_seqs_in_batch`` is the accumulated batch's sequence count.
    ``per_sample=True`` gives the (B,) contributions, which sum to the mean."""
    denom = values.shape[0] if num_seqs_in_batch is None else positive_count(num_seqs_in_batch, "num_seqs_in_batch")
    return values / denom if per_sample else values.sum() / denom


def check_sequences_valid(mask: torch.Tensor) -> None:
    """A sequence-level loss needs a non-empty batch and at least one valid label per sequence."""
    if mask.shape[0] == 0 or mask.shape[-1] < 2:
        raise AllMaskedError(f"{why_empty(mask)}; a sequence-level loss needs at least one label per sequence")
    empty = ~mask.any(-1)
    if bool(empty.any()):
        idx = empty.nonzero().flatten().tolist()
        raise AllMaskedError(f"sequences {idx} have no valid label: a sequence-level loss needs at least one")


def weighted_token_loss(
    tok_logp: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    num_items_in_batch: NumItems,
    return_details: bool,
    per_sample: bool = False,
):
    """token-mean of ``w_t · logp_t`` with ``w`` detached; the shared tail of GA/WGA/TNPO/WTNPO."""
    weights = weights.detach()
    loss = token_mean(weights * tok_logp, mask, num_items_in_batch, per_sample)
    if not return_details:
        return loss
    with torch.no_grad():
        nll = -tok_logp[mask].mean()
    return loss, {"weights": weights.masked_fill(~mask, 0.0), "logprobs": tok_logp.detach(), "mask": mask, "nll": nll}


def prepare(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: Optional[torch.Tensor] = None):
    """Checked per-token log-probs, valid mask and (optionally) upcast reference log-probs."""
    tok_logp = token_logprobs(logits, labels)
    mask = valid_mask(labels)
    check_finite(tok_logp, mask, "log-probabilities (logits)")
    if ref_logprobs is None:
        return tok_logp, mask, None
    check_aligned(ref_logprobs, labels, "ref_logprobs")
    ref = ref_logprobs.to(device=tok_logp.device, dtype=tok_logp.dtype)
    check_finite(ref, mask, "ref_logprobs")
    return tok_logp, mask, ref
