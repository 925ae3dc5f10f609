"""The chunked LM-head loop shared by the fused losses (weighted NLL and KL).

Rows (all, or the compacted valid ones) are processed in chunks: the LM-head matmul writes a
(chunk × vocab) logits buffer, the loss's chunk op computes its per-row values and overwrites the
buffer with d loss / d logits, and two matmuls turn that into d(hidden) and an fp32-accumulated
d(weight) (plus d(bias)). Never holds (rows × vocab) logits.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from .common import addmm_fp32_, grad_dtype

Rows = Union[slice, torch.Tensor]  # a chunk's rows: a slice of all rows, or indices of compacted ones
ChunkOp = Callable[[Rows, torch.Tensor], None]


def linear(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


def take(x: Optional[torch.Tensor], rows: Rows) -> Optional[torch.Tensor]:
    """The rows of ``x`` (a view for a slice, a gathered copy for indices); None stays None."""
    if x is None:
        return None
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def chunked_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    idx: Optional[torch.Tensor], n: int, chunk: int, op: ChunkOp,
                    need: Tuple[bool, bool, bool]):
    """Run ``op(rows, logits)`` over the logits of rows ``idx`` (all ``n`` rows in order when None),
    ``chunk`` rows at a time. When a gradient is needed (``need`` = d hidden?, d weight?, d bias?),
    ``op`` must leave d loss / d logits in ``logits`` (unscaled: the backward applies
    1/denominator). Returns (d hidden in the hidden's dtype, fp32 (fp64) d weight, d bias), None
    where not needed."""
    acc = grad_dtype(hidden.dtype)
    V = weight.shape[0]
    g_hidden = torch.zeros_like(hidden) if need[0] else None
    g_weight = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need[1] else None
    g_bias = torch.zeros(V, dtype=acc, device=hidden.device) if need[2] else None
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk) if idx is None else idx[start:start + chunk]
        h = take(hidden, rows)
        logits = linear(h, weight, bias)
        op(rows, logits)
        if need[0]:
            gh = logits @ weight
            if idx is None:
                g_hidden[rows] = gh
            else:
                g_hidden.index_copy_(0, rows, gh)
        if need[1]:
            addmm_fp32_(g_weight, logits.t(), h)
        if need[2]:
            g_bias += logits.sum(0, dtype=acc)
    return g_hidden, g_weight, g_bias


def scale_of(denom: Union[float, torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0-d ``1 / denom`` on the device; a tensor ``denom`` stays on the device (no host synchronisation)."""
    if isinstance(denom, torch.Tensor):
        return 1.0 / denom.to(device, dtype).reshape(())
    return torch.full((), 1.0 / float(denom), dtype=dtype, device=device)
