"""RMU (Li et al., 2024): push the forget tokens' hidden states at block k towards a fixed random
control vector ``c·u``; hidden-state losses act on positions whose label is not -100 (unshifted)."""
from typing import Optional

import torch

from ._common import IGNORE_INDEX, AllMaskedError, NumItems, positive_count


def control_vector(hidden_size: int, coeff: float, seed: int = 0, *, normalize: bool = False,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``c·u`` with ``u ~ U[0, 1)^d`` drawn from a generator seeded with ``seed`` (docs/design.md §3).
    ``normalize=True`` scales u to unit norm first, as in the WMDP release of RMU."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=gen, dtype=torch.float64)
    if normalize:
        u = u / u.norm()
    return (coeff * u).to(dtype=dtype, device=device)


def hidden_mask(hidden_states: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (batch, seq, hidden), got {tuple(hidden_states.shape)}")
    if hidden_states.shape[0] == 0 or hidden_states.shape[1] == 0:
        raise AllMaskedError(f"no position for the hidden-state loss: hidden_states have shape "
                             f"{tuple(hidden_states.shape)} (an empty batch or empty sequences)")
    if labels is None:
        return torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden_states "
                         f"{tuple(hidden_states.shape[:2])}")
    mask = labels != IGNORE_INDEX
    if not bool(mask.any()):
        raise AllMaskedError("all labels are -100: no position for the hidden-state loss")
    return mask


def masked_mse(diff: torch.Tensor, mask: torch.Tensor, num_items_in_batch: NumItems = None,
               per_sample: bool = False) -> torch.Tensor:
    """mean over masked positions of mean_d diff², in at least fp32; ``num_items_in_batch`` replaces
    the position count under gradient accumulation."""
    diff = diff.float() if diff.dtype in (torch.float16, torch.bfloat16) else diff
    per_pos = diff.pow(2).mean(-1)
    denom = mask.sum() if num_items_in_batch is None else positive_count(num_items_in_batch, "num_items_in_batch")
    masked = torch.where(mask, per_pos, torch.zeros((), dtype=per_pos.dtype, device=per_pos.device))
    loss = (masked.sum(-1) if per_sample else masked.sum()) / denom
    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError("non-finite hidden-state loss (NaN or inf in hidden states)")
    return loss


def rmu(hidden_states: torch.Tensor, labels: Optional[torch.Tensor], control: torch.Tensor, *,
        num_items_in_batch: NumItems = None, per_sample: bool = False) -> torch.Tensor:
    """mean over valid positions of ``mean_d (h_k − c·u)²``; ``control`` is (hidden,) from
    :func:`control_vector`."""
    mask = hidden_mask(hidden_states, labels)
    if control.shape != hidden_states.shape[-1:]:
        raise ValueError(f"control vector shape {tuple(control.shape)} does not match hidden size "
                         f"{hidden_states.shape[-1]}")
    return masked_mse(hidden_states - control.to(hidden_states), mask, num_items_in_batch, per_sample)
