"""Streaming gradient dot products (docs/design.md §4.1).

:class:`GradientDotStream` sets every ``p.grad`` aside by reference, then lets the caller run
backward passes: a post-accumulate hook on each parameter takes the fresh gradient, queues the
pair (fresh, partner) for ``fastgeffect.ops.dot_accumulate_`` into a per-group accumulator row and
drops the fresh gradient at once. On exit the original ``p.grad`` tensors are put back, whatever
happened in between, so no gradient is left behind. No host synchronisation happens per
parameter: the accumulator is read once, by the caller, at the end.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import ops as _ops  # called through the module so a faster backend can be swapped in
from ..distributed import counted_here, is_dtensor, local_part

DEFAULT_CHUNK_NUMEL = 1 << 20       # bounds dtype-conversion temporaries of the torch backend
DEFAULT_MAX_PENDING_BYTES = 8 << 20  # fresh gradients kept alive while waiting for one batched call


def default_accumulate_dtype(device: torch.device, requested: Optional[torch.dtype] = None) -> torch.dtype:
    """fp64 on CPU and CUDA, fp32 elsewhere (MPS has no fp64), unless the caller asks for fp32/fp64.

    fp64 on CUDA: a 7B gradient adds ~50k block partials, nearly orthogonal gradients cancel
    heavily, and fp64 atomics are native since sm_60 while the op is bandwidth-bound (§4.1)."""
    if requested is not None:
        if requested not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate_dtype must be torch.float32 or torch.float64, got {requested}")
        return requested
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class GradientDotStream:
    """Context manager: ``acc[row, group_ids[i]] += <fresh grad of params[i], partners[i]>``.

    ``partners=None`` dots with the gradients found in ``p.grad`` on entry (the objective gradient).
    ``self_row`` also accumulates ``||fresh grad||²`` per group into that row.
    ``directions(i, partner, lo, hi)`` (optional) gives a second partner for the flat elements
    ``[lo, hi)`` of parameter i, computed in the hook chunk by chunk (e.g. the optimiser's predicted
    step, :mod:`.update`), dotted into row ``row + direction_offset``: a few chunks alive at a
    time, never a copy of the parameters.
    Use :meth:`backward` for each pass, then :meth:`result` for the (rows, groups) fp64 CPU matrix.
    """

    def __init__(self, params: Sequence[nn.Parameter], group_ids: Sequence[int], n_groups: int, n_rows: int = 1, *,
                 partners: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 accumulate_dtype: Optional[torch.dtype] = None, chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES, self_row: Optional[int] = None,
                 directions: Optional[Callable[[int, torch.Tensor, int, int], Optional[torch.Tensor]]] = None,
                 direction_offset: int = 0):
        # DTensor (FSDP2) parameters: the local shards are dotted; replicated mesh dims count once
        self.counted = [counted_here(p) for p in params]
        if len(params) != len(group_ids):
            raise ValueError("params and group_ids must have the same length")
        if partners is not None and len(partners) != len(params):
            raise ValueError("partners must have one entry (tensor or None) per parameter")
        if chunk_numel <= 0:
            raise ValueError("chunk_numel must be positive")
        self.params = list(params)
        self.group_ids = [int(g) for g in group_ids]
        self.n_groups, self.n_rows = int(n_groups), int(n_rows)
        if self_row is not None and not 0 <= self_row < n_rows:
            raise IndexError(f"self_row {self_row} out of range for {n_rows} rows")
        self.self_row = self_row
        self.directions, self.direction_offset = directions, int(direction_offset)
        self._partners_arg = partners
        self.accumulate_dtype = accumulate_dtype
        self.chunk_numel, self.max_pending_bytes = int(chunk_numel), int(max_pending_bytes)
        self.stash: List[Optional[torch.Tensor]] = []
        self.accs: Dict[torch.device, torch.Tensor] = {}
        self.row = 0
        self._pending: Dict[torch.device, tuple] = {}
        self._pending_bytes = 0
        self._handles: list = []

    # -- context -----------------------------------------------------------------------------------
    def __enter__(self) -> "GradientDotStream":
        self.stash = [p.grad for p in self.params]
        self.partners = self.stash if self._partners_arg is None else list(self._partners_arg)
        try:
            for p in self.params:
                p.grad = None
            self._handles = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                             for i, p in enumerate(self.params)]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending.clear()
        self._pending_bytes = 0
        for p, g in zip(self.params, self.stash):
            p.grad = g  # the very same tensor objects, values untouched
        return None

    # -- streaming ---------------------------------------------------------------------------------
    def _make_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            fresh, p.grad = p.grad, None  # free the fresh gradient as soon as it is queued
            partner = self.partners[i]
            if fresh is None or not self.counted[i]:
                return
            if is_dtensor(fresh) or is_dtensor(partner):
                fresh, partner = local_part(fresh), None if partner is None else local_part(partner)
            if self.self_row is not None:
                self._push(fresh, fresh, self.group_ids[i], self.self_row)
            if partner is None:
                return
            if fresh.shape != partner.shape:
                raise RuntimeError(f"gradient of parameter #{i} has shape {tuple(fresh.shape)} but its stashed "
                                   f"partner has {tuple(partner.shape)}")
            self._push(fresh, partner, self.group_ids[i], self.row)
            if self.directions is not None:  # chunk by chunk: the direction's temporaries stay chunk-sized
                flat = fresh.reshape(-1)
                for lo in range(0, flat.numel(), self.chunk_numel):
                    d = self.directions(i, partner, lo, lo + self.chunk_numel)
                    if d is None:
                        break
                    self._push(flat[lo:lo + self.chunk_numel], d, self.group_ids[i], self.row + self.direction_offset)
        return hook

    def _push(self, a: torch.Tensor, b: torch.Tensor, gid: int, row: int) -> None:
        if a.is_sparse or b.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        ta, tb, gids = self._pending.setdefault((a.device, row), ([], [], []))
        for ca, cb in zip(a.reshape(-1).split(self.chunk_numel), b.reshape(-1).split(self.chunk_numel)):
            ta.append(ca)
            tb.append(cb)
            gids.append(gid)
        self._pending_bytes += a.numel() * a.element_size()
        if self._pending_bytes >= self.max_pending_bytes:
            self.flush()

    def _acc_row(self, device: torch.device, row: int) -> torch.Tensor:
        acc = self.accs.get(device)
        if acc is None:
            dtype = default_accumulate_dtype(device, self.accumulate_dtype)
            acc = self.accs[device] = torch.zeros(self.n_rows, self.n_groups, dtype=dtype, device=device)
        return acc[row]

    def flush(self) -> None:
        """Hand every queued pair to ``dot_accumulate_`` (one call per device and row) and drop them."""
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        for (device, row), (ta, tb, gids) in pending.items():
            _ops.dot_accumulate_(self._acc_row(device, row), ta, tb, gids)

    def backward(self, tensor: torch.Tensor, row: int = 0, retain_graph: bool = False) -> None:
        """Back-propagate a scalar ``tensor`` and accumulate its gradients into accumulator ``row``."""
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} out of range for {self.n_rows} rows")
        self.flush()
        self.row = row
        tensor.backward(retain_graph=retain_graph)
        self.flush()

    def result(self) -> torch.Tensor:
        """(rows, groups) float64 CPU matrix: the per-device accumulators summed (one transfer each)."""
        out = torch.zeros(self.n_rows, self.n_groups, dtype=torch.float64)
        for acc in self.accs.values():
            out += acc.to("cpu", torch.float64)
        return out


def grouped_dots(tensors_a: Sequence[Optional[torch.Tensor]], tensors_b: Sequence[Optional[torch.Tensor]],
                 group_ids: Sequence[int], n_groups: int, accumulate_dtype: Optional[torch.dtype] = None,
                 chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> torch.Tensor:
    """(n_groups,) float64 CPU vector of Σ <a_i, b_i> per group for tensors already in memory
    (pairs with a ``None`` count as 0); one ``dot_accumulate_`` call per device."""
    queues: Dict[torch.device, tuple] = {}
    for a, b, g in zip(tensors_a, tensors_b, group_ids):
        if a is None or b is None:
            continue
        ta, tb, gids = queues.setdefault(a.device, ([], [], []))
        for ca, cb in zip(a.reshape(-1).split(chunk_numel), b.reshape(-1).split(chunk_numel)):
            ta.append(ca)
            tb.append(cb)
            gids.append(int(g))
    out = torch.zeros(n_groups, dtype=torch.float64)
    for device, (ta, tb, gids) in queues.items():
        acc = torch.zeros(n_groups, dtype=default_accumulate_dtype(device, accumulate_dtype), device=device)
        _ops.dot_accumulate_(acc, ta, tb, gids)
        out += acc.to("cpu", torch.float64)
    return out


__all__ = ["GradientDotStream", "grouped_dots", "default_accumulate_dtype", "DEFAULT_CHUNK_NUMEL",
           "DEFAULT_MAX_PENDING_BYTES"]
