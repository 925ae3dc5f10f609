"""Local gradient shards under FSDP2 and DeepSpeed ZeRO-3: ZeRO-3 G-effects, sharded PG-effects
(docs/design.md §4.2-4.3).

ZeRO-3 reduce-scatters every gradient into per-rank fp32 partitions inside its own hooks, so
``p.grad`` never holds it and the streaming hooks of :class:`GradientDotStream` (used for DDP and
FSDP2 G-effects) do not apply: :func:`zero3_geffects` copies this rank's partitions of the
objective gradient once (1/world of a gradient, whatever the number of risks), back-propagates
each risk through the engine and dots partitions per group; DeepSpeed's public
``safe_get_local_grad`` / ``safe_set_local_grad`` read and restore them.

The ghost closed forms of :mod:`.per_sample` need whole parameters and a whole ∇R; a sharded
model has neither. Here PG-effects are exact dots of reduced gradient shards instead:

1. ∇R is back-propagated through the sharded engine (every rank its share, times the world size,
   which the engine averages) and this rank's shards of it are kept: 1/world of a gradient.
2. For each sample of the global batch in turn, its owner back-propagates ``world * ℓ_i`` and every
   other rank a zero-weighted copy of its own loss, so the collectives stay in step and the reduced
   shards hold exactly ∇ℓ_i; each rank dots its shards with ∇R's per group.
3. One all-reduce of the (groups × samples) table; each rank returns the columns of its samples.

That is one forward and backward per sample of the global batch (the ghost route costs two
backwards in all): affordable at the few steps that ask for PG-effects. The objective gradient
the optimiser is about to apply is set aside first and put back afterwards, also on error.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import distributed as _dist
from .risk import check_per_sample_losses, evaluate_risk
from .stream import grouped_dots


def _zero3_grad_accessors():
    """DeepSpeed's public ``(safe_get_local_grad, safe_set_local_grad)``."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad  # optional, heavy: only under ZeRO-3
    return safe_get_local_grad, safe_set_local_grad


class LocalShards:
    """Back-propagate a loss through the sharded ``model`` and read this rank's shards of the reduced
    gradient, one trainable parameter after the other (``None`` where this rank's part does not count).

    Use as a context manager: the gradient present on entry (the objective's) is restored on exit.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], mode: str):
        if mode not in ("sharded", "zero3"):
            raise ValueError(f"LocalShards needs an FSDP2 ('sharded') or ZeRO-3 ('zero3') model, got mode {mode!r}")
        self.model, self.params, self.mode = model, list(params), mode
        self._saved: List[Optional[torch.Tensor]] = []

    # -- the objective gradient set aside ------------------------------------------------------------
    def __enter__(self) -> "LocalShards":
        if self.mode == "zero3":
            get_grad, _ = _zero3_grad_accessors()
            self._saved = [get_grad(p).detach().clone() for p in self.params]
        else:
            self._saved = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
        return self

    def __exit__(self, *exc) -> None:
        if self.mode == "zero3":
            _, set_grad = _zero3_grad_accessors()
            self.model.optimizer.zero_grad()
            for p, g in zip(self.params, self._saved):
                set_grad(p, g)
        else:
            for p, g in zip(self.params, self._saved):
                p.grad = g

    @property
    def objective(self) -> List[Optional[torch.Tensor]]:
        """This rank's shards of the gradient found on entry."""
        return [_dist.local_part(g) if g is not None and _dist.counted_here(p) else None
                for p, g in zip(self.params, self._saved)]

    # -- one backward -----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """This rank's shards of the reduced gradient of ``loss`` (every rank calls this together;
        the engine averages over ranks, so pass ``world * share``)."""
        if self.mode == "zero3":
            get_grad, set_grad = _zero3_grad_accessors()
            self.model.optimizer.zero_grad()  # the next backward copies into the partitions instead of adding
            for p, g in zip(self.params, self._saved):  # partitions the loss does not reach must read 0
                set_grad(p, torch.zeros_like(g))
            self.model.backward(loss, scale_wrt_gas=False)
            return [get_grad(p) for p in self.params]
        for p in self.params:
            p.grad = None
        loss.backward()
        out = [_dist.local_part(p.grad) if p.grad is not None and _dist.counted_here(p) else None
               for p in self.params]
        for p in self.params:
            p.grad = None
        return out


def _owners(n_local: int) -> Iterator[tuple]:
    """(owner rank, index on the owner, global column) for every sample of the global batch."""
    column = 0
    for r, n in enumerate(_dist.all_gather_objects(n_local)):
        for k in range(n):
            yield r, k, column
            column += 1


def zero3_geffects(engine: nn.Module, params: Sequence[nn.Parameter], group_ids: Sequence[int], n_groups: int,
                   risks: Mapping[str, Callable[[], torch.Tensor]], accumulate_dtype: Optional[torch.dtype] = None
                   ) -> Tuple[torch.Tensor, List[float]]:
    """G-effects under ZeRO-3, where the gradients live in DeepSpeed's partitions and not in
    ``p.grad`` (so the streaming hooks do not apply): ``(table, shares)``, this rank's (risks ×
    groups) partial dots of the risks' partitions with the objective's, and its risk shares."""
    if engine.fp16_enabled():
        raise NotImplementedError("G-effects under DeepSpeed fp16 loss scaling are not supported (the partitions "
                                  "hold scaled gradients); use bf16 or fp32")
    world = _dist.world_size()
    table = torch.zeros(len(risks), n_groups, dtype=torch.float64)
    shares: List[float] = []
    with LocalShards(engine, params, "zero3") as shards:
        objective = shards.objective
        for row, (name, fn) in enumerate(risks.items()):
            value, v = evaluate_risk(name, fn)
            table[row] = grouped_dots(shards.backward(value * world), objective, group_ids, n_groups,
                                      accumulate_dtype)
            shares.append(v)
            del value
    return table, shares


def sharded_per_sample_geffects(model: nn.Module, params: Sequence[nn.Parameter], group_ids: Sequence[int],
                                n_groups: int, mode: str, risk_fn: Callable[[], torch.Tensor],
                                per_sample_losses_fn: Callable[[], torch.Tensor],
                                accumulate_dtype: Optional[torch.dtype] = None
                                ) -> Tuple[torch.Tensor, float, torch.Tensor]:
    """``(table, risk, risk_norm2)``: the (groups × local samples) PG-effects of this rank's samples,
    the global risk value and the per-group squared norms of ∇R (to tell, should the table be
    non-finite, which gradient was). ``risk_fn`` returns this rank's share of R;
    ``per_sample_losses_fn`` this rank's (B_local,) objective terms (each sample's share of the
    global objective)."""
    world, me = _dist.world_size(), _dist.rank()
    order = list(_owners(_n_local(per_sample_losses_fn)))
    table = torch.zeros(n_groups, len(order) + 1, dtype=torch.float64)  # the last column: ||∇R||² per group
    mine: List[int] = []
    with LocalShards(model, params, mode) as shards:
        risk, share = evaluate_risk("risk_fn", risk_fn)
        grad_r = [None if g is None else g.detach().clone()  # ZeRO-3 reuses its partitions next
                  for g in shards.backward(risk * world)]
        del risk
        table[:, -1] = grouped_dots(grad_r, grad_r, group_ids, n_groups, accumulate_dtype)
        for owner, k, column in order:
            losses = check_per_sample_losses(per_sample_losses_fn())
            term = losses[k] * world if owner == me else losses[0] * 0.0  # zero weight keeps collectives in step
            table[:, column] = grouped_dots(shards.backward(term), grad_r, group_ids, n_groups, accumulate_dtype)
            if owner == me:
                mine.append(column)
            del losses, term
    table = _dist.all_reduce_sum(table)
    return table[:, mine], float(_dist.all_reduce_sum(torch.tensor(share, dtype=torch.float64))), table[:, -1]


def _n_local(per_sample_losses_fn: Callable[[], torch.Tensor]) -> int:
    with torch.no_grad():
        return int(check_per_sample_losses(per_sample_losses_fn(), need_grad=False).shape[0])


__all__ = ["LocalShards", "sharded_per_sample_geffects", "zero3_geffects"]
