"""G-effects under DeepSpeed ZeRO-3 (DESIGN.md §4.2): dots of the local fp32 gradient partitions.

ZeRO-3 reduce-scatters every gradient into per-rank fp32 partitions inside its own hooks, so
``p.grad`` never holds it and the streaming hooks of :class:`GradientDotStream` do not apply.
Instead, with the averaged objective gradient ``g`` in the partitions (after the objective's
``engine.backward``), for each risk:

1. the partitions are zeroed and DeepSpeed is told to overwrite, not add (``zero_grad``);
2. ``engine.backward(world * R_r)``: DeepSpeed averages the shares, so the partitions hold ∇R;
3. each rank dots its partitions of ∇R and ``g`` per group (:func:`grouped_dots`).

The partial sums and the risk shares are all-reduced once by the caller. ``g``'s partitions are
copied once beforehand (one gradient copy *divided by the world size*, whatever the number of
risks) and written back afterwards through DeepSpeed's public ``safe_set_local_grad``, also when a
risk raises, so ``engine.step()`` then applies the objective gradient untouched.
"""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .stream import grouped_dots


def measure_zero3(engine: nn.Module, params: Sequence[nn.Parameter], group_ids: Sequence[int], n_groups: int,
                  risks: Mapping[str, Callable[[], torch.Tensor]], evaluate_risk: Callable,
                  accumulate_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, List[float]]:
    """``(table, values)``: this rank's (risks × groups) partial dots and its risk shares."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    if engine.fp16_enabled():
        raise NotImplementedError("G-effects under DeepSpeed fp16 loss scaling are not supported (the partitions "
                                  "hold scaled gradients); use bf16 or fp32")
    world = torch.distributed.get_world_size()
    objective = [safe_get_local_grad(p).detach().clone() for p in params]
    table = torch.zeros(len(risks), n_groups, dtype=torch.float64)
    values: List[float] = []
    try:
        for row, (name, fn) in enumerate(risks.items()):
            engine.optimizer.zero_grad()  # the next backward copies into the partitions instead of adding
            for p, g in zip(params, objective):  # partitions a risk does not reach must read 0, not g
                safe_set_local_grad(p, torch.zeros_like(g))
            value, v = evaluate_risk(name, fn)
            engine.backward(value * world, scale_wrt_gas=False)
            fresh = [safe_get_local_grad(p) for p in params]
            table[row] = grouped_dots(fresh, objective, group_ids, n_groups, accumulate_dtype)
            values.append(v)
            del value, fresh
    finally:
        engine.optimizer.zero_grad()
        for p, g in zip(params, objective):
            safe_set_local_grad(p, g)
    return table, values


__all__ = ["measure_zero3"]
