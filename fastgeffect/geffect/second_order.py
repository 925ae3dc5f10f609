"""The second-order term of a risk's change under the optimiser's real step (issue 28, item 3).

``R(θ + Δθ) = R(θ) + <∇R, Δθ> + ½ Δθᵀ H Δθ + O(|Δθ|³)``. The update effect (:mod:`.update`) gives
the first-order term, ``predicted_opt = <∇R, Δθ>``; Adam's first steps move every coordinate by
about ``lr``, so where that term is small the second one decides the sign. It is computed here
exactly, with one Hessian-vector product per risk: the risk's gradient with its graph kept
(``create_graph=True``), dotted with the step, differentiated once more, dotted with the step.

H is the Hessian of the *risk*, which is always computed from materialised logits (``F.cross_entropy``),
never through the fused LM-head kernels of the objective: the objective enters only through Δθ,
a first-order quantity. Attention runs on torch's math SDPA backend for the duration (the flash and
memory-efficient kernels have no double backward). The step needs the parameters whole and the
optimiser state in torch's own form: sharded parameters (FSDP2, DeepSpeed ZeRO-3) are refused.
Memory: the risk's backward graph is kept until the second backward (about one more set of
activations than a plain backward) plus three parameter-sized vectors (step, gradient, product).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import distributed as _dist
from .risk import RiskFn, evaluate_risk
from .update import UpdateDirections

SHARDED = ("sharded", "zero3")


def second_order_error(update_effects: bool, reduction_mode: Optional[str]) -> Optional[str]:
    """Why the second-order term cannot be measured in this run (None: it can). ``reduction_mode``:
    :func:`fastgeffect.distributed.reduction_mode` of the model, None without G-effects."""
    if reduction_mode is None:
        return "the second-order term needs G-effects (geffect_every > 0)"
    if reduction_mode in SHARDED:
        return ("the second-order term is not available with sharded parameters (FSDP2, DeepSpeed ZeRO-3): its "
                "Hessian-vector product needs the whole parameters and torch's own optimiser state; use DDP or "
                "one process")
    if not update_effects:
        return "the second-order term needs the update effects (it is a term of the real step's prediction)"
    return None


def optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                   max_grad_norm: Optional[float] = None) -> List[Optional[torch.Tensor]]:
    """``Δθ_p`` that ``optimizer`` will take from the gradients now in ``p.grad`` (clipped to
    ``max_grad_norm`` first when given), per parameter: ``-lr_p · d_p`` with the update effect's
    direction ``d_p`` (:class:`~.update.UpdateDirections`), None where it will not move ``p``."""
    names = [f"param {i}" for i in range(len(params))]
    dirs = UpdateDirections(optimizer, params, names, [p.grad for p in params], max_grad_norm)
    out: List[Optional[torch.Tensor]] = []
    for i, p in enumerate(params):
        d = dirs.direction(i, p.grad)
        out.append(None if d is None else d.reshape(p.shape).mul(-float(dirs.groups[i]["lr"])))
    return out


def hvp_term(value: torch.Tensor, params: Sequence[nn.Parameter], step: Sequence[Optional[torch.Tensor]]
             ) -> torch.Tensor:
    """``½ Δθᵀ H Δθ`` (a float64 scalar tensor) of the scalar ``value`` (its graph not yet
    back-propagated) for the step ``step`` (per parameter, None: does not move): one double backward."""
    pairs = [(p, s) for p, s in zip(params, step) if s is not None]
    if not pairs:
        return torch.zeros((), dtype=torch.float64)
    ps = [p for p, _ in pairs]
    grads = torch.autograd.grad(value, ps, create_graph=True, allow_unused=True)
    dot = sum((g * s.to(g.dtype)).sum() for g, (_, s) in zip(grads, pairs) if g is not None)
    if not isinstance(dot, torch.Tensor) or not dot.requires_grad:  # R linear (or constant) along Δθ
        return torch.zeros((), dtype=torch.float64)
    hv = torch.autograd.grad(dot, ps, allow_unused=True)
    del grads, dot
    terms = [(h.double() * s.double()).sum() for h, (_, s) in zip(hv, pairs) if h is not None]
    return 0.5 * torch.stack(terms).sum().cpu() if terms else torch.zeros((), dtype=torch.float64)


def math_attention():
    """torch's math SDPA backend: the fused attention kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover  (torch < 2.3; setup.py asks for >= 2.4)
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def second_order_terms(model: nn.Module, risks: Mapping[str, RiskFn], optimizer: torch.optim.Optimizer,
                       params: Sequence[nn.Parameter], max_grad_norm: Optional[float] = None) -> Dict[str, float]:
    """Per risk, ``½ Δθᵀ H_R Δθ`` for the step ``optimizer`` will take from ``p.grad`` (read, not
    changed): one forward and one double backward per risk. Data parallel (DDP): each rank's risk
    is its share, the step is replicated, so the shares' terms are summed (one all-reduce)."""
    mode = _dist.reduction_mode(model)
    if mode in SHARDED:
        raise NotImplementedError(second_order_error(True, mode))
    step = optimizer_step(optimizer, params, max_grad_norm)
    no_sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    values = []
    with no_sync:
        for name, fn in risks.items():
            try:
                with math_attention():
                    value, _ = evaluate_risk(name, fn)
                values.append(hvp_term(value, params, step))
            except RuntimeError as e:
                if "not implemented" not in str(e):
                    raise
                raise RuntimeError(f"second-order term of risk {name!r}: the risk's forward is not twice "
                                   f"differentiable ({e}); measure without the second-order term") from e
            del value
    out = torch.stack(values)
    if _dist.is_distributed():
        out = _dist.all_reduce_sum(out)
    return dict(zip(risks, out.tolist()))


def with_second_order(outcome: Mapping[str, dict], terms: Mapping[str, float]) -> Dict[str, dict]:
    """The step's outcome (risk -> fields, with ``predicted_opt``) with ``second_order`` and the
    second prediction ``predicted_opt2 = predicted_opt + second_order`` added (None where not finite)."""
    out = {}
    for name, fields in outcome.items():
        s = terms[name]
        s = s if math.isfinite(s) else None
        first = fields.get("predicted_opt")
        out[name] = {**fields, "second_order": s,
                     "predicted_opt2": None if s is None or first is None else first + s}
    return out


__all__ = ["hvp_term", "math_attention", "optimizer_step", "second_order_error", "second_order_terms",
           "with_second_order"]
