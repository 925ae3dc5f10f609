"""The G-effect tracker (docs/design.md §4): ``e = <∇R, ∇L_u>`` for named risks R, split by group.

Usage in any training loop::

    loss.backward()                                   # objective gradient now in p.grad
    res = ge.measure({"unlearn": lambda: nll(forget), "retain": lambda: nll(retain)})
    optimizer.step()                                  # unchanged: p.grad was restored

Sign: a gradient step on L_u changes R by about ``-lr * e``; GA on the same batch gives
``e = -||∇R||²``. With ``measure(..., optimizer=opt)`` each result also holds the update effect
``u`` (:mod:`.update`): the same dot with the step ``opt`` will really take, so ``ΔR ≈ -lr * u``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .. import distributed as _dist
from ..model_structure import unwrap
from .finite import check_finite_geffects
from .groups import GroupSpec, build_grouping
from .per_sample import per_sample_geffects
from .risk import RiskFn, evaluate_risk
from .sharded import zero3_geffects
from .stream import (
    DEFAULT_CHUNK_NUMEL,
    DEFAULT_MAX_PENDING_BYTES,
    GradientDotStream,
    default_accumulate_dtype,
    grouped_dots,
)
from .tied_split import TiedInputSplit
from .update import UpdateDirections

# a tied weight's G-effect and update effect by use (GEffectResult's optional fields)
TIED_SPLIT_FIELDS = ("tied_input", "tied_lm_head", "update_tied_input", "update_tied_lm_head")


@dataclass
class GEffectResult:
    """One measurement: ``total`` = Σ ``groups``; ``risk`` the risk value; ``tied`` when the input
    embedding and LM head share a weight (it is then counted once, in ``embed``); ``update_total``
    = Σ ``update_groups``, the update effect, when measured with an optimiser (else None), and
    ``update_change`` = Σ ``update_change_groups`` = ⟨∇R, Δθ⟩ = -Σ_p lr_p ⟨∇_p R, d_p⟩, the
    first-order change of R under that step, each param group at its own learning rate (= -lr·u
    when every group has the same lr). With a tied weight (outside FSDP2 / ZeRO-3), its G-effect
    (counted in its group) splits into ``tied_input`` + ``tied_lm_head``, the parts through the
    input-embedding and the LM-head uses (:mod:`.tied_split`); ``update_tied_input`` /
    ``update_tied_lm_head`` split its update effect alike."""
    total: float
    groups: Dict[str, float]
    risk: float
    tied: bool = False
    notes: List[str] = field(default_factory=list)
    update_total: Optional[float] = None
    update_groups: Optional[Dict[str, float]] = None
    update_change: Optional[float] = None
    update_change_groups: Optional[Dict[str, float]] = None
    tied_input: Optional[float] = None
    tied_lm_head: Optional[float] = None
    update_tied_input: Optional[float] = None
    update_tied_lm_head: Optional[float] = None

    def to_dict(self) -> dict:
        out = {"total": self.total, "groups": dict(self.groups), "risk": self.risk, "tied": self.tied}
        for k in TIED_SPLIT_FIELDS:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.update_groups is not None:
            out.update(update_total=self.update_total, update_groups=dict(self.update_groups),
                       update_change=self.update_change, update_change_groups=dict(self.update_change_groups))
        return out


class GEffect:
    """Streaming G-effects of the gradient currently in ``p.grad`` against named risks.

    ``groups``: ``"paper"`` (embed/shallow/middle/deep/lm), ``"blocks"``, ``"params"``, a mapping
    group -> parameter names, or a callable ``model -> mapping``. ``accumulate_dtype`` defaults to
    fp64 on CPU and CUDA, fp32 on other accelerators. Only trainable parameters count.

    Data parallel (see :mod:`fastgeffect.distributed`): pass the DDP-wrapped or FSDP2-sharded model,
    or the DeepSpeed ZeRO-3 engine (after ``engine.backward`` of the objective, before ``engine.step``);
    every rank calls :meth:`measure` with risks that return *its share* of R (local sum divided by
    the global count, so the shares sum to R); every rank gets the same global result.
    """

    def __init__(self, model: nn.Module, groups: GroupSpec = "paper", accumulate_dtype: Optional[torch.dtype] = None,
                 *, chunk_numel: int = DEFAULT_CHUNK_NUMEL, max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES):
        self.model = model
        self.grouping = build_grouping(unwrap(model), groups)
        self.accumulate_dtype = accumulate_dtype
        self.chunk_numel = chunk_numel
        self.max_pending_bytes = max_pending_bytes
        if accumulate_dtype is not None and accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate_dtype must be torch.float32 or torch.float64, got {accumulate_dtype}")

    @property
    def group_names(self) -> List[str]:
        return list(self.grouping.names)

    @property
    def tied(self) -> bool:
        return self.grouping.tied

    def __repr__(self) -> str:
        return (f"GEffect({type(self.model).__name__}, groups={self.group_names}, "
                f"params={len(self.grouping.params)}, tied={self.tied})")

    def _check_params_unchanged(self) -> None:
        now = {id(p) for p in unwrap(self.model).parameters() if p.requires_grad}
        if now != {id(p) for p in self.grouping.params}:
            raise RuntimeError("the set of trainable parameters changed since this GEffect was built "
                               "(parameters frozen/unfrozen or added); build a new GEffect")

    def measure(self, risks: Mapping[str, RiskFn], optimizer: Optional[torch.optim.Optimizer] = None,
                max_grad_norm: Optional[float] = None) -> Dict[str, GEffectResult]:
        """G-effect of the objective gradient in ``p.grad`` for each named risk callable.

        Each callable is run (forward) and back-propagated in turn; the objective gradients are put
        back afterwards (same tensors, same values), also when a risk raises. A NaN/inf G-effect (a
        non-finite objective or risk gradient behind a finite risk value) raises ``FloatingPointError``
        naming the risk and group.

        ``optimizer`` (``torch.optim.SGD``, ``Adam`` or ``AdamW``, the one about to step): also the
        update effect ``u = -Σ_p <∇_p R, Δθ_p> / lr_p`` of the step it will take from ``p.grad``,
        clipped to ``max_grad_norm`` first when given (as ``clip_grad_norm_`` will); its state is
        only read.
        """
        if not isinstance(risks, Mapping) or not risks:
            raise ValueError("risks must be a non-empty dict mapping a name to a zero-argument callable")
        for name, fn in risks.items():
            if not callable(fn):
                raise TypeError(f"risk {name!r} must be a zero-argument callable returning a scalar tensor, "
                                f"got {type(fn).__name__}")
        self._check_params_unchanged()
        params = self.grouping.params
        mode = _dist.reduction_mode(self.model)
        if mode == "zero3":  # DeepSpeed keeps the gradients in its own partitions, not in p.grad
            if optimizer is not None:
                raise NotImplementedError("update effects under DeepSpeed ZeRO-3 are not supported: the Adam "
                                          "state lives in DeepSpeed's own partitions; measure without optimizer=")
            table, values = zero3_geffects(self.model, params, self.grouping.group_ids, len(self.grouping.names),
                                           risks, self.accumulate_dtype)
            return self._results(risks, table, values, lambda: None)
        if all(p.grad is None for p in params):
            raise RuntimeError("measure() found no objective gradient: every trainable p.grad is None. "
                               "Call loss.backward() on the objective before measuring")
        # FSDP averages the risk gradients it reduce-scatters: scale each share so the average is ∇R
        scale = _dist.world_size() if mode == "sharded" else 1
        values: List[float] = []
        updates = None if optimizer is None else UpdateDirections(
            optimizer, params, self.grouping.param_names, [p.grad for p in params], max_grad_norm)
        n = len(risks)  # rows: the G-effects, then (with an optimiser) the update effects
        group_ids, n_cols = self.grouping.group_ids, len(self.grouping.names)
        if updates is not None:  # one column per (layer group, param group): each param group's own lr
            k = len(updates.lrs)
            group_ids, n_cols = [g * k + j for g, j in zip(group_ids, updates.group_index)], n_cols * k
        # a tied weight's own dots go to extra columns (one per param group), folded back below
        split, index = self._tied_split(mode, n, updates)
        if split is not None:
            tied_col, group_ids = group_ids[index], list(group_ids)
            group_ids[index] = n_cols + (updates.group_index[index] if updates is not None else 0)
        n_extra = 0 if split is None else (1 if updates is None else len(updates.lrs))
        stream = GradientDotStream(params, group_ids, n_cols + n_extra,
                                   n if updates is None else 2 * n, accumulate_dtype=self.accumulate_dtype,
                                   chunk_numel=self.chunk_numel, max_pending_bytes=self.max_pending_bytes,
                                   directions=None if updates is None else updates.direction, direction_offset=n)
        # DDP: the local share's gradient, not all-reduced (Σ_r <∇R_r, g> = <∇R, g>, g replicated)
        no_sync = self.model.no_sync() if isinstance(self.model, nn.parallel.DistributedDataParallel) \
            else contextlib.nullcontext()
        with stream, no_sync, split if split is not None else contextlib.nullcontext():
            for row, (name, fn) in enumerate(risks.items()):
                if split is not None:
                    split.row = row
                value, v = evaluate_risk(name, fn)
                stream.backward(value * scale if scale != 1 else value, row=row)
                values.append(v)
                del value
            table = stream.result()
        tied = None
        if split is not None:  # the tied weight's whole dot, and its input-embedding part
            whole = table[:, group_ids[index]].clone()
            table = table[:, :n_cols].clone()
            table[:, tied_col] += whole
            tied = torch.stack([split.acc.to("cpu", torch.float64), whole], 1)
        return self._results(risks, table, values, self._objective_norm2, None if updates is None else updates.lrs,
                             tied)

    def _tied_split(self, mode: str, n: int, updates: Optional[UpdateDirections]
                    ) -> Tuple[Optional[TiedInputSplit], Optional[int]]:
        """The tied weight's input-embedding part (:mod:`.tied_split`) and the weight's index, where
        the objective gradient is whole in ``p.grad`` (not under FSDP2 / ZeRO-3 shards); (None, None)
        where there is none."""
        if not self.tied or mode not in ("none", "replicated"):
            return None, None
        embedding = unwrap(self.model).get_input_embeddings()
        weight = getattr(embedding, "weight", None)
        index = next((i for i, p in enumerate(self.grouping.params) if p is weight), None)
        if index is None or weight.grad is None:
            return None, None
        objective = weight.grad  # the stream sets it aside by reference on entry and puts it back
        direction = None if updates is None else (lambda lo, hi: updates.direction(index, objective, lo, hi))
        split = TiedInputSplit(embedding, objective, n if updates is None else 2 * n, direction=direction, offset=n,
                               chunk_numel=self.chunk_numel,
                               accumulate_dtype=default_accumulate_dtype(weight.device, self.accumulate_dtype))
        return split, index

    def _objective_norm2(self) -> torch.Tensor:
        """Per-group squared norms of this rank's objective gradient (the error path only)."""
        grads = [None if p.grad is None else _dist.local_part(p.grad) for p in self.grouping.params]
        return grouped_dots(grads, grads, self.grouping.group_ids, len(self.grouping.names), self.accumulate_dtype)

    def _results(self, risks: Mapping[str, RiskFn], table: torch.Tensor, values: List[float],
                 objective_norm2: Callable[[], Optional[torch.Tensor]], lrs: Optional[List[float]] = None,
                 tied: Optional[torch.Tensor] = None) -> Dict[str, GEffectResult]:
        if _dist.is_distributed():  # the one all-reduce: per-group partial sums and the risk shares together
            shares = torch.zeros(table.shape[0], 1, dtype=torch.float64)  # update-effect rows have no value
            shares[:len(values), 0] = torch.tensor(values, dtype=torch.float64)
            extra = [] if tied is None else [tied]
            packed = _dist.all_reduce_sum(torch.cat([table, shares, *extra], 1))
            if tied is not None:
                tied, packed = packed[:, -2:], packed[:, :-2]
            table, values = packed[:, :-1], packed[:len(values), -1].tolist()
        n = len(risks)
        change = None
        if lrs is not None:  # columns (layer group, param group): ⟨∇R, Δθ⟩ = -Σ_k lr_k u_k, then the layer groups
            parts = table.reshape(table.shape[0], -1, len(lrs))
            table = parts.sum(-1)  # one param group: the very same numbers
            change = -(parts[n:] * torch.tensor(lrs, dtype=torch.float64)).sum(-1)
        # after the all-reduce, so that every rank sees the same table and raises alike
        names = list(risks) + [f"{r} (update effect)" for r in risks][:table.shape[0] - n]
        check_finite_geffects(table, self.grouping.names, names, objective_norm2)
        out = {}
        for row, name in enumerate(risks):
            groups = {g: float(x) for g, x in zip(self.grouping.names, table[row].tolist())}
            out[name] = GEffectResult(math.fsum(groups.values()), groups, values[row], self.tied,
                                      list(self.grouping.notes))
            if table.shape[0] > n:
                update = {g: float(x) for g, x in zip(self.grouping.names, table[n + row].tolist())}
                out[name].update_total, out[name].update_groups = math.fsum(update.values()), update
                moved = {g: float(x) for g, x in zip(self.grouping.names, change[row].tolist())}
                out[name].update_change, out[name].update_change_groups = math.fsum(moved.values()), moved
            if tied is not None:
                out[name].tied_input, out[name].tied_lm_head = float(tied[row, 0]), float(tied[row, 1] - tied[row, 0])
                if table.shape[0] > n:
                    out[name].update_tied_input = float(tied[n + row, 0])
                    out[name].update_tied_lm_head = float(tied[n + row, 1] - tied[n + row, 0])
        return out

    def per_sample(self, risk_fn: RiskFn, per_sample_losses_fn: Callable[[], torch.Tensor], *,
                   check: bool = True, return_details: bool = False):
        """PG-effects ``<∇R, ∇ℓ_i>`` for each sample (docs/design.md §4.3); see
        :func:`fastgeffect.geffect.per_sample.per_sample_geffects`. Leaves ``p.grad`` untouched."""
        self._check_params_unchanged()
        return per_sample_geffects(self.model, risk_fn, per_sample_losses_fn, groups=self.grouping,
                                   accumulate_dtype=self.accumulate_dtype, check=check,
                                   return_details=return_details)


__all__ = ["GEffect", "GEffectResult"]
