"""Grouped dot-product accumulation: ``acc[g_i] += <a_i, b_i>`` for lists of tensor pairs.

``dot_accumulate_`` is the entry point (used by the G-effect engine). It runs the compiled
op (``csrc/``: one parallel pass over all pairs, fp64 accumulation on CPU; few multi-tensor
launches, fp32-or-better accumulation and no host sync on CUDA) and falls back to
``dot_accumulate_torch_`` when the extension is unavailable. Choose with
``FASTGEFFECT_OPS_BACKEND=auto|ext|torch`` or ``set_backend``.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from . import _extension

BACKENDS = ("auto", "ext", "torch")


def _checked_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; expected one of {BACKENDS}")
    return name


_backend = _checked_backend(os.environ.get("FASTGEFFECT_OPS_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """'ext': always the compiled op (error if unavailable); 'torch': always the fallback;
    'auto' (default): the compiled op where it is loaded and supports ``acc``."""
    global _backend
    _backend = _checked_backend(name)


def get_backend() -> str:
    return _backend


def extension_available(device: str | torch.device = "cpu") -> bool:
    """Whether the compiled op is loaded for ``device``'s type ('cpu' or 'cuda')."""
    return _extension.module_for(torch.device(device).type) is not None


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


def _as_list(xs) -> list:
    return xs if isinstance(xs, list) else list(xs)


def dot_accumulate_(acc: torch.Tensor, tensors_a: Sequence[torch.Tensor], tensors_b: Sequence[torch.Tensor],
                    group_ids: Sequence[int]) -> torch.Tensor:
    """``acc[group_ids[i]] += <tensors_a[i], tensors_b[i]>`` for every i; returns ``acc``.

    Pairs have equal shapes and may mix float32/float16/bfloat16 (float64 too); ``acc`` is a
    1-D float32/float64 tensor on the inputs' device. Non-contiguous inputs are read through a
    contiguous copy (the only copy the op makes). ``group_ids`` given as a CUDA tensor costs a
    host sync: pass a list.
    """
    if _backend != "torch":
        module = _extension.module_for(acc.device.type)
        supported = acc.dtype in (torch.float32, torch.float64)
        if module is not None and (supported or _backend == "ext"):
            if isinstance(group_ids, torch.Tensor):
                group_ids = group_ids.tolist()
            module.dot_accumulate_(acc, _as_list(tensors_a), _as_list(tensors_b), _as_list(group_ids))
            return acc
        if module is None:
            if _backend == "ext":
                raise RuntimeError(f"FASTGEFFECT ops backend 'ext' requested but the compiled op is unavailable "
                                   f"on {acc.device.type}: {_extension.load_error(acc.device.type)}")
            _extension.warn_fallback_once(acc.device.type)
    return dot_accumulate_torch_(acc, tensors_a, tensors_b, group_ids)
