"""The step's gradient under ``--geffect-guard`` (:mod:`.guard`): two passes over the step's
micro-batches instead of one. The regulariser's pass first: its gradient, reduced across ranks,
updates the guard's retain direction and stays in ``p.grad`` weighted by λ; then the forget term's
pass adds g_u on top, and the guard takes the conflicting part of g_u out. Each term runs its own
forward, as inside the objective, so the passes cost what the plain step costs (one forward and one
backward per term and micro-batch); every reduction still divides by the whole step's counts.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from ..objectives import Objective
from ..objectives.base import ObjectiveOutput, add_weight_mean
from ..objectives.regularizers import REGULARIZERS
from .guard import GradientGuard
from .objective_logs import ObjectiveLogs

# raises on every rank when any rank's term failed (the loop's own: a rank stopping alone would hang)
StopIfNonfinite = Callable[[Optional[FloatingPointError]], None]


def regulariser_loss(objective: Objective, model: torch.nn.Module, batches, counts) -> tuple:
    """The objective's regulariser alone, unweighted (λ is applied to its gradient): ``(loss, {})``."""
    if objective.regularizer == "none":
        raise ValueError(f"{objective.name} has no regulariser: the guard needs a retain set (--regularizer gd, kl "
                         "or rr)")
    ctx = objective.context(model, counts)
    return REGULARIZERS[objective.regularizer].fn(ctx, batches["retain"], objective.hparams), {}


def forget_term_loss(objective: Objective, model: torch.nn.Module, batches, counts) -> tuple:
    """The objective's forget term alone: ``(loss, details)``."""
    return objective.forget_loss(model, batches, counts)


def _pass(name: str, term, micro: Sequence[dict], weights: Sequence[float], backward, world: int,
          stop_if_nonfinite: StopIfNonfinite) -> List[tuple]:
    """Forward and backward of ``term`` on each micro-batch (the last one syncs): its detached values."""
    out, last = [], len(micro) - 1
    for j, (m, w) in enumerate(zip(micro, weights)):
        try:
            loss, details = term(m)
            error = None if bool(torch.isfinite(loss.detach())) else FloatingPointError(
                f"non-finite {name} loss {float(loss.detach())}")
        except FloatingPointError as e:
            loss, details, error = None, None, e
        stop_if_nonfinite(error)
        backward(loss * (w * world), sync=j == last)  # each rank's loss is its share of the global sum
        out.append((loss.detach(), details))
    return out


def guarded_gradient(objective: Objective, model: torch.nn.Module, guard: GradientGuard, step: int,
                     micro: Sequence[dict], weights: Sequence[float], counts: dict, backward, world: int,
                     stop_if_nonfinite: StopIfNonfinite) -> dict:
    """Leaves the guarded gradient ``guard(g_u) + λ·g_r`` of step ``step`` in ``p.grad`` (zeroed
    before); returns the step's logs: the objective's, as the plain step logs them, and the guard's."""
    lam = objective.lam  # this step's λ (PDU moves it after the step)
    regs = _pass(f"{objective.regularizer} regulariser", lambda m: regulariser_loss(objective, model, m, counts),
                 micro, weights, backward, world, stop_if_nonfinite)
    guard.after_retain(lam, step)
    forgets = _pass(f"{objective.name} forget term", lambda m: forget_term_loss(objective, model, m, counts),
                    micro, weights, backward, world, stop_if_nonfinite)
    logs = ObjectiveLogs(len(micro))
    for (f, details), (r, _), w in zip(forgets, regs, weights):
        if w != 0.0:
            logs.add(ObjectiveOutput(f + lam * r, f, r, add_weight_mean(details)))
    return {**logs.result(), **guard.after_forget(lam)}


__all__ = ["guarded_gradient", "regulariser_loss", "forget_term_loss"]
