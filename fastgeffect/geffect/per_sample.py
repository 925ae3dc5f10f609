"""Per-sample G-effects (PG-effects, docs/design.md §4.3) without per-sample gradients.

PG-effect of sample i: ``<∇R(D), ∇ℓ_i>``. With G = ∇R fixed, each parameter's share is a "ghost"
dot product computed from what one batched backward of Σ_i ℓ_i sees anyway, for every sample at
once (a = module input, δ = gradient at the module output, rows of sample i summed):

* Linear ``y = a Wᵀ + b``:  Σ_t δ_tᵀ G_W a_t + Σ_t δ_t·G_b   (one extra matmul per layer)
* HF Conv1D ``y = a W + b``: the same with W transposed
* Embedding ``y = W[ids]``:  Σ_t G_W[ids_t]·δ_t             (padding_idx rows get no gradient)
* LayerNorm ``y = x̂ ⊙ w + b``: Σ_t δ_t·(x̂_t ⊙ G_w) + Σ_t δ_t·G_b
* any other leaf module (RMSNorm variants, ...): Σ_t δ_t·J_t G, the module's Jacobian-vector
  product along G (one forward-mode pass of that module)

Exactness needs ℓ_i to depend on sample i only (true for causal LMs) and each parameter to act
only through its module's forward. The second is checked: for every parameter the closed-form
values must sum to ``<G, ∇Σℓ>`` from the batched backward; a parameter that fails (or whose module
output is not batch-first) is computed by the exact fallback, one backward per sample.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .. import distributed as _dist
from .. import ops as _ops
from ..model_structure import unwrap
from .closed_forms import (
    bias_contrib,
    embedding_contrib,
    layer_norm_weight_contrib,
    linear_weight_contrib,
    module_jvp_contrib,
)
from .finite import check_finite_pg_effects
from .groups import Grouping, GroupSpec, build_grouping
from .risk import check_per_sample_losses, evaluate_risk
from .sharded import sharded_per_sample_geffects
from .stream import GradientDotStream, default_accumulate_dtype, grouped_dots

try:  # GPT-2 style "Conv1D" (a transposed Linear); transformers is a dependency but keep this soft
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover
    _HFConv1D = None


@dataclass
class PerSampleResult:
    values: torch.Tensor          # (B,) PG-effect per sample (accumulate dtype, CPU)
    groups: torch.Tensor          # (G, B) split by group; sums over groups to ``values``
    group_names: List[str]
    batch: float                  # <∇R, ∇Σ_i ℓ_i> from the batched backward (≈ values.sum())
    risk: float
    fallback: List[str]           # parameters computed by the exact per-sample loop


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (_HFConv1D is not None and isinstance(mod, _HFConv1D))


class _Capture:
    """Forward hooks that register, on the output of every module owning trainable parameters, a
    tensor hook computing that call's per-sample contributions as soon as δ is known (so δ is
    never stored)."""

    def __init__(self, model: nn.Module, params: List[nn.Parameter], G: List[Optional[torch.Tensor]],
                 acc_dtype_of: Callable[[torch.device], torch.dtype]):
        self.index = {id(p): i for i, p in enumerate(params)}
        self.G = G
        self.acc_dtype_of = acc_dtype_of
        self.contrib: Dict[int, torch.Tensor] = {}
        self.bad: Dict[int, str] = {}
        self.batch_size: Optional[int] = None
        self.seen_batch = 0  # largest leading dimension of a hooked output so far in the forward
        self.active = True
        self.recomputing = False
        self.outputs: List[torch.Tensor] = []  # hooked module outputs (the backward targets of check=False)
        self.handles = []
        for mod in model.modules():
            owned = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) in self.index]
            if owned:
                self.handles.append(mod.register_forward_hook(self._forward_hook(mod, owned), with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _mark_bad(self, owned, why: str) -> None:
        for _, p in owned:
            self.bad.setdefault(self.index[id(p)], why)

    def _forward_hook(self, mod: nn.Module, owned):
        def hook(module, args, kwargs, output):
            if self.recomputing or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor):
                self._mark_bad(owned, f"{type(mod).__name__} returns {type(output).__name__}, not a tensor")
                return None
            if not output.requires_grad:
                return None
            x = args[0] if args else next(iter(kwargs.values()), None)
            x = x.detach() if isinstance(x, torch.Tensor) else x
            B = self.seen_batch
            if (output.dim() >= 2 and output.shape[0] == 1 and B > 1 and isinstance(x, torch.Tensor)
                    and x.dim() >= 1 and x.shape[0] == 1 and self._closed_form(mod)):
                # a batch-broadcast call (e.g. GPT-2 position embeddings on (1, T) ids): hand the model
                # an expanded view, identical after broadcasting, so δ arrives per sample
                output = output.expand(B, *output.shape[1:])
                x = x.expand(B, *x.shape[1:])
            elif output.dim() >= 1:
                self.seen_batch = max(self.seen_batch, output.shape[0])
            output.register_hook(self._tensor_hook(mod, owned, (x, args, kwargs)))
            self.outputs.append(output)
            return output
        return hook

    @staticmethod
    def _closed_form(mod: nn.Module) -> bool:
        return _is_linear(mod) or isinstance(mod, (nn.Embedding, nn.LayerNorm))

    def _tensor_hook(self, mod: nn.Module, owned, saved):
        def hook(dy: torch.Tensor) -> None:
            if not self.active:
                return None
            try:
                with torch.no_grad():
                    parts = self._contributions(mod, owned, saved, dy)
            except Exception as e:  # anything unexpected: exact fallback for this module's parameters
                self._mark_bad(owned, f"{type(mod).__name__}: {type(e).__name__}: {e}")
                return None
            for p, c in parts:
                i = self.index[id(p)]
                self.contrib[i] = c if i not in self.contrib else self.contrib[i] + c
            return None
        return hook

    def _contributions(self, mod: nn.Module, owned, saved, dy: torch.Tensor):
        """[(param, (B,) contribution)] for one call of ``mod``."""
        x, args, kwargs = saved
        if dy.dim() == 0 or dy.shape[0] != self.batch_size:
            self._mark_bad(owned, f"{type(mod).__name__} output is not batch-first (shape {tuple(dy.shape)})")
            return []
        acc = self.acc_dtype_of(dy.device)
        todo = [(n, p, self.G[self.index[id(p)]]) for n, p in owned]
        todo = [(n, p, g) for n, p, g in todo if g is not None]  # no risk gradient: contributes 0
        out = []
        if _is_linear(mod):
            for n, p, g in todo:
                if n == "weight":
                    out.append((p, linear_weight_contrib(x, dy, g, acc, not isinstance(mod, nn.Linear))))
                elif n == "bias":
                    out.append((p, bias_contrib(dy, g, acc)))
                else:
                    raise RuntimeError(f"unexpected parameter {n!r}")
        elif isinstance(mod, nn.Embedding) and mod.max_norm is None and not mod.scale_grad_by_freq:
            out = [(p, embedding_contrib(x, dy, g, mod.padding_idx, acc)) for n, p, g in todo]
        elif isinstance(mod, nn.LayerNorm):
            for n, p, g in todo:
                out.append((p, layer_norm_weight_contrib(mod, x, dy, g, acc) if n == "weight"
                            else bias_contrib(dy, g, acc)))
        elif next(mod.children(), None) is None:
            self.recomputing = True  # the recomputation must not trigger our own forward hooks
            try:
                out = [(p, module_jvp_contrib(mod, n, g, args, kwargs, dy, acc)) for n, p, g in todo]
            finally:
                self.recomputing = False
        else:
            self._mark_bad(owned, f"{type(mod).__name__} owns parameters and has sub-modules")
        return out


def per_sample_geffects(model: nn.Module, risk_fn: Callable[[], torch.Tensor],
                        per_sample_losses_fn: Callable[[], torch.Tensor], *,
                        groups: Union[GroupSpec, Grouping] = "params", accumulate_dtype: Optional[torch.dtype] = None,
                        check_rtol: Optional[float] = None, check: bool = True, return_details: bool = False):
    """(B,) tensor of PG-effects ``<∇R, ∇ℓ_i>`` (accumulate dtype, CPU).

    ``risk_fn()`` returns the scalar risk R; ``per_sample_losses_fn()`` the (B,) objective terms ℓ_i
    (Σ_i ℓ_i is the batch objective, e.g. each sample's share of a token mean). Costs one backward
    for R and one for Σ_i ℓ_i, plus one matmul per Linear; holds one extra gradient (∇R). ``p.grad``
    is left exactly as it was. ``return_details=True`` returns a :class:`PerSampleResult` with the
    split by group (``groups`` as in :class:`GEffect`, default one group per tensor).

    ``check=True`` also forms every parameter's batch gradient to verify that its closed-form values
    sum to ``<G, ∇Σℓ>`` (a parameter used outside its module's forward fails and gets the exact
    fallback). ``check=False`` trusts the closed forms and back-propagates only to the module
    outputs, skipping every weight-gradient matmul (about a third of the cost); use it for models
    whose parameters act only through their own modules (all ``transformers`` decoders tested here).

    Under DDP each rank passes its share of R (local sum / global count) and its own samples; ∇R is
    summed over ranks once (the full risk gradient), and each rank gets the PG-effects of its samples.
    Under FSDP2 and ZeRO-3 (no whole parameters) the same values come from exact dots of reduced
    gradient shards, one backward per sample of the global batch (:mod:`.sharded`); ``check`` does
    not apply there.

    A NaN/inf PG-effect (a non-finite gradient of the risk or of the per-sample losses behind finite
    values) raises ``FloatingPointError`` naming the groups, the samples and which gradient it was."""
    mode = _dist.reduction_mode(model)
    grouping = groups if isinstance(groups, Grouping) else build_grouping(unwrap(model), groups)
    if mode in ("sharded", "zero3"):  # no whole parameters for the closed forms: exact shard dots
        return _sharded(model, grouping, mode, risk_fn, per_sample_losses_fn, accumulate_dtype, return_details)
    model = unwrap(model)
    params = grouping.params

    def acc_of(dev: torch.device) -> torch.dtype:
        return default_accumulate_dtype(dev, accumulate_dtype)

    G, risk_value = _risk_gradient(risk_fn, params, mode)
    cap = _Capture(model, params, G, acc_of)
    try:
        with torch.enable_grad():
            losses = per_sample_losses_fn()
    finally:
        cap.close()
    cap.batch_size = B = check_per_sample_losses(losses).shape[0]

    fallback = dict(cap.bad)
    if check:
        batch_dots = _checked_closed_forms(cap, losses, params, G, fallback, check_rtol, accumulate_dtype)
    else:
        batch_dots = _closed_forms_only(cap, losses, len(params), fallback)
    fallback = {i: why for i, why in fallback.items() if G[i] is not None}
    if fallback:
        warnings.warn("PG-effects: exact per-sample fallback (one backward per sample) for "
                      + "; ".join(f"{grouping.param_names[i]} ({why})" for i, why in fallback.items()),
                      stacklevel=2)
        _exact_fallback(losses, params, G, sorted(fallback), cap.contrib, acc_of)
    del losses
    cap.outputs = []

    table = _group_table(cap.contrib, grouping, B)
    _check_finite(table, batch_dots, grouping, G, mode, accumulate_dtype)
    values = table.sum(0)
    if not return_details:
        return values
    batch = float(batch_dots.sum()) if batch_dots is not None else float(values.sum())
    return PerSampleResult(values, table, list(grouping.names), batch, risk_value,
                           [grouping.param_names[i] for i in sorted(fallback)])


def _sharded(model, grouping: Grouping, mode: str, risk_fn, per_sample_losses_fn, accumulate_dtype,
             return_details: bool):
    """PG-effects under FSDP2 / ZeRO-3: exact dots of reduced gradient shards (:mod:`.sharded`)."""
    table, risk_value, risk_norm2 = sharded_per_sample_geffects(
        model, grouping.params, grouping.group_ids, len(grouping.names), mode, risk_fn, per_sample_losses_fn,
        accumulate_dtype)
    check_finite_pg_effects(table, grouping.names, lambda: risk_norm2)
    values = table.sum(0)
    if not return_details:
        return values
    return PerSampleResult(values, table, list(grouping.names), float(values.sum()), risk_value, [])


def _risk_gradient(risk_fn, params, mode: str):
    """∇R per parameter (None where R does not depend on it) and R's value; under DDP ("replicated")
    each rank's share summed, so every rank holds the whole risk's gradient, as one process would."""
    risk, risk_value = evaluate_risk("risk_fn", risk_fn)
    G = list(torch.autograd.grad(risk, params, allow_unused=True))
    del risk
    if mode == "replicated":
        G = [torch.zeros_like(p) if g is None else g for p, g in zip(params, G)]
        for g in G:
            torch.distributed.all_reduce(g)
        risk_value = float(_dist.all_reduce_sum(torch.tensor(risk_value, dtype=torch.float64)))
    return G, risk_value


def _checked_closed_forms(cap: "_Capture", losses: torch.Tensor, params, G, fallback: Dict[int, str],
                          check_rtol: Optional[float], accumulate_dtype) -> torch.Tensor:
    """One batched backward of Σℓ: the closed forms fire from tensor hooks, while the stream dots
    each parameter's batch gradient with G (row 0) and with itself (row 1); a parameter whose closed
    forms do not sum to its batch dot joins ``fallback``. Returns the batch dots."""
    P = len(params)
    with GradientDotStream(params, list(range(P)), P, 2, partners=G, accumulate_dtype=accumulate_dtype,
                           self_row=1) as stream:
        stream.backward(losses.sum(), row=0, retain_graph=True)
        batch_dots, grad_norm2 = stream.result()
    cap.active = False
    # consistency check, with one host transfer per device: Σ_i closed form vs <G, ∇Σℓ>
    sums = grouped_dots([cap.contrib.get(i) for i in range(P)],
                        [None if i not in cap.contrib else torch.ones_like(cap.contrib[i]) for i in range(P)],
                        range(P), P, accumulate_dtype)
    g_norm2 = grouped_dots(G, G, range(P), P, accumulate_dtype)
    for i in range(P):
        if i in fallback or G[i] is None:
            continue
        rtol = check_rtol if check_rtol is not None else _default_rtol(params[i].dtype)
        scale = math.sqrt(float(g_norm2[i]) * float(grad_norm2[i]))
        if abs(float(sums[i]) - float(batch_dots[i])) > rtol * scale:
            fallback[i] = "closed form does not sum to the batch value (parameter used outside its module?)"
    return batch_dots


def _closed_forms_only(cap: "_Capture", losses: torch.Tensor, P: int, fallback: Dict[int, str]) -> None:
    """Back-propagate Σℓ to the hooked module outputs only (no weight-gradient matmuls); a parameter
    without a closed-form contribution joins ``fallback``. No batch dots: returns None."""
    targets = [o for o in cap.outputs if o.requires_grad]
    torch.autograd.grad(losses.sum(), targets, retain_graph=True, allow_unused=True)
    cap.active = False
    fallback.update({i: "no closed-form contribution" for i in range(P) if i not in cap.contrib and i not in fallback})
    return None


def _group_table(contrib: Dict[int, torch.Tensor], grouping: Grouping, B: int) -> torch.Tensor:
    """(groups, B) float64 table of the per-parameter PG-effects summed by group."""
    table = torch.zeros(len(grouping.names), B, dtype=torch.float64)
    for i, c in contrib.items():
        table[grouping.group_ids[i]] += c.to("cpu", torch.float64)
    return table


def _check_finite(table: torch.Tensor, batch_dots: Optional[torch.Tensor], grouping: Grouping, G, mode: str,
                  accumulate_dtype) -> None:
    """NaN/inf PG-effects raise, naming groups and samples; a parameter acting outside its module shows
    a NaN/inf gradient only in its batch dot. Under DDP every rank raises when one does."""
    batch_groups = None if batch_dots is None else \
        torch.zeros(len(grouping.names), dtype=torch.float64).index_add_(0, torch.tensor(grouping.group_ids),
                                                                         batch_dots.to(torch.float64))
    if mode == "replicated":  # each rank holds its own samples: every rank must raise when one does
        bad_here = not (bool(torch.isfinite(table).all()) and (batch_groups is None or
                                                               bool(torch.isfinite(batch_groups).all())))
        if float(_dist.all_reduce_sum(torch.tensor(float(bad_here), dtype=torch.float64))) and not bad_here:
            raise FloatingPointError("PG-effects are not finite (NaN/inf) on another rank; its error names the "
                                     "groups, samples and the non-finite gradient")
    check_finite_pg_effects(table, grouping.names, lambda: grouped_dots(G, G, grouping.group_ids, len(grouping.names),
                                                                        accumulate_dtype), batch_groups)


def _default_rtol(dtype: torch.dtype) -> float:
    """Allowed |Σ_i closed form − batch dot| relative to ||G||·||∇Σℓ|| (rounding of the two routes)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


def _exact_fallback(losses: torch.Tensor, params, G, idx: List[int], contrib: Dict[int, torch.Tensor],
                    acc_of) -> None:
    """Exact per-sample values for parameters ``idx``: one backward of ℓ_i per sample."""
    sub = [params[i] for i in idx]
    B = losses.shape[0]
    for i in idx:
        contrib[i] = torch.zeros(B, dtype=acc_of(params[i].device), device=params[i].device)
    for b in range(B):
        grads = torch.autograd.grad(losses[b], sub, retain_graph=True, allow_unused=True)
        for i, g in zip(idx, grads):
            if g is not None:
                _ops.dot_accumulate_(contrib[i], [g], [G[i]], [b])


__all__ = ["PerSampleResult", "per_sample_geffects", "linear_weight_contrib", "bias_contrib", "embedding_contrib",
           "layer_norm_weight_contrib", "module_jvp_contrib"]
