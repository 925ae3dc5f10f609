"""RR regulariser: keep the retain hidden states at a chosen block close to the original model's."""
from typing import Optional

import torch

from ._common import NumItems
from .rmu import hidden_mask, masked_mse


def rr(hidden_states: torch.Tensor, ref_hidden_states: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
       num_items_in_batch: NumItems = None) -> torch.Tensor:
    """mean over retain answer positions (labels != -100) of ``mean_d (h − h_ref)²``."""
    if ref_hidden_states.shape != hidden_states.shape:
        raise ValueError(f"ref_hidden_states shape {tuple(ref_hidden_states.shape)} does not match "
                         f"hidden_states {tuple(hidden_states.shape)}")
    mask = hidden_mask(hidden_states, labels)
    return masked_mse(hidden_states - ref_hidden_states.detach().to(hidden_states), mask, num_items_in_batch)
