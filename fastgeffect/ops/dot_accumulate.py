"""Grouped dot-product accumulation: ``acc[g_i] += <a_i, b_i>`` for lists of tensor pairs."""
from __future__ import annotations

from typing import Sequence

import torch


def check_dot_accumulate_args(acc: torch.Tensor, tensors_a: Sequence[torch.Tensor],
                              tensors_b: Sequence[torch.Tensor], group_ids: Sequence[int]) -> None:
    if not (len(tensors_a) == len(tensors_b) == len(group_ids)):
        raise ValueError(f"tensors_a, tensors_b and group_ids must have the same length, got "
                         f"{len(tensors_a)}, {len(tensors_b)}, {len(group_ids)}")
    if acc.dim() != 1 or not acc.is_floating_point():
        raise ValueError(f"acc must be a 1-D floating tensor, got {acc.dtype} of shape {tuple(acc.shape)}")
    for i, (a, b, g) in enumerate(zip(tensors_a, tensors_b, group_ids)):
        if a.shape != b.shape:
            raise ValueError(f"pair {i}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.device != b.device or a.device != acc.device:
            raise ValueError(f"pair {i}: devices differ ({a.device}, {b.device}, acc on {acc.device})")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise TypeError(f"pair {i}: floating tensors required, got {a.dtype} and {b.dtype}")
        if not 0 <= int(g) < acc.numel():
            raise IndexError(f"pair {i}: group id {int(g)} out of range for {acc.numel()} groups")


def dot_accumulate_torch_(acc: torch.Tensor, tensors_a: Sequence[torch.Tensor],
                          tensors_b: Sequence[torch.Tensor], group_ids: Sequence[int]) -> torch.Tensor:
    """Plain torch reference: one fused multiply-sum per pair in ``acc``'s dtype, then a single
    ``index_add_`` (no host synchronisation)."""
    check_dot_accumulate_args(acc, tensors_a, tensors_b, group_ids)
    if len(tensors_a) == 0:
        return acc
    dots = torch.stack([
        torch.dot(a.reshape(-1).to(acc.dtype), b.reshape(-1).to(acc.dtype)) for a, b in zip(tensors_a, tensors_b)
    ])
    idx = torch.as_tensor(list(group_ids), dtype=torch.long, device=acc.device)
    return acc.index_add_(0, idx, dots)


def dot_accumulate_(acc: torch.Tensor, tensors_a: Sequence[torch.Tensor], tensors_b: Sequence[torch.Tensor],
                    group_ids: Sequence[int]) -> torch.Tensor:
    """Entry point used by the engine; dispatches to the fastest available implementation."""
    return dot_accumulate_torch_(acc, tensors_a, tensors_b, group_ids)
