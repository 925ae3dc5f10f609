"""Conflict-free updates (``--geffect-guard gru|pcgrad``): the unlearning gradient g_u loses its part
against a retain direction r when the two conflict, ⟨g_u, r⟩ < 0:

    g_u ← g_u − (⟨g_u, r⟩ / ‖r‖²) r

over the whole model (``scope="model"``, GRU's and PCGrad's own definition) or for each G-effect
layer group on its own (``scope="group"``: the dot products and norms of that group's parameters).

* ``pcgrad`` (Yu et al., NeurIPS 2020, "Gradient Surgery for Multi-Task Learning"): r = g_r, this
  step's retain gradient. PCGrad projects every task's gradient on the normal plane of every
  conflicting other; here only the unlearning gradient is projected (the retain gradient is the
  constraint, as in GRU), the baseline GRU is compared with.
* ``gru`` (Wang et al., ICML 2025, "GRU: Mitigating the Trade-off between Unlearning and Retention
  for Large Language Models", arXiv 2503.09117; its trainer as ported to open-unlearning, pull
  request #83, ``trainer/unlearn/gru.py``). The source defines: r_t = γ·g_r,t + (1 − γ)·r_{t−1}, an
  exponential moving average of the retain gradient ("for stable estimation") with r_{−1} = 0 and
  ``gamma_gru`` γ = 0.8; the projection above when ⟨g_u, r_t⟩ < 0 (no change otherwise), on the
  whole model's flattened gradients; g_u the forget loss's gradient (GA's, NPO's), g_r the gradient
  of the plain NLL on the step's retain rows, accumulated over the step's micro-batches; the
  optimiser steps on the projected g_u alone. Taken here: the same r_t, γ (``--gru-gamma``, default
  0.8), zero start and projection. Ours besides: the per-group scope; the retain gradient is the
  objective's regulariser's (``gd`` is GRU's retain NLL; ``kl`` and ``rr`` give theirs), and the
  step is the guarded g_u plus λ·g_r as the objective weighs it (λ = 0 with ``--regularizer gd``:
  GRU's GA variant exactly).

Memory: one gradient-sized buffer, r (kept between steps by GRU). The step's gradient is built in
``p.grad`` by two passes (:mod:`.guarded_step`): the regulariser's first, whose reduced gradient
updates r, and stays in ``p.grad`` scaled by λ; then the forget term's on top, so
``p.grad = g_u + λ·g_r`` and ⟨g_u, r⟩ = ⟨p.grad, r⟩ − λ⟨g_r, r⟩, the second dot taken before the
forget pass. Dot products are per group (fp64, the streaming dot op of ``geffect.stream``) on the
reduced gradients: under DDP every rank holds them whole; under FSDP2 each dots its shards and the
per-group sums are all-reduced once.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from .. import distributed as dist_
from ..geffect.stream import grouped_dots
from .config import GUARDS, SCOPES


# ---- the formulas (pure) ------------------------------------------------------------------------
def projection_coefficients(dots: torch.Tensor, norms2: torch.Tensor, scope: str) -> torch.Tensor:
    """Per group, c_g such that the guarded gradient is g_u − c_g·r on group g: ``dots`` = ⟨g_u, r⟩ and
    ``norms2`` = ‖r‖² per group. ``scope="model"``: one c = ⟨g_u, r⟩/‖r‖² over the whole model, for
    every group, where the model's dot is negative; ``"group"``: each group's own, where its dot is.
    0 where there is no conflict, and where r is 0 (a direction with nothing to project on)."""
    dots, norms2 = dots.to(torch.float64), norms2.to(torch.float64)
    if scope == "model":
        d, n = float(dots.sum()), float(norms2.sum())
        return torch.full_like(dots, d / n if d < 0 and n > 0 else 0.0)
    if scope == "group":
        conflict = (dots < 0) & (norms2 > 0)
        return torch.where(conflict, dots / torch.where(conflict, norms2, torch.ones_like(norms2)),
                           torch.zeros_like(dots))
    raise ValueError(f"unknown guard scope {scope!r}; valid: {', '.join(SCOPES)}")


def moving_average_(average: torch.Tensor, grad: Optional[torch.Tensor], gamma: float) -> torch.Tensor:
    """GRU's retain direction in place: ``average ← γ·grad + (1 − γ)·average`` (no gradient: 0)."""
    average.mul_(1.0 - gamma)
    if grad is not None:
        average.add_(grad, alpha=gamma)
    return average


def guard_gradients(g_u: Sequence[torch.Tensor], r: Sequence[torch.Tensor], group_ids: Sequence[int],
                    n_groups: int, scope: str) -> List[torch.Tensor]:
    """The guarded unlearning gradient of tensors already in memory (a new list; the inputs stay)."""
    c = projection_coefficients(grouped_dots(g_u, r, group_ids, n_groups), grouped_dots(r, r, group_ids, n_groups),
                                scope)
    return [u - float(c[g]) * v for u, v, g in zip(g_u, r, group_ids)]


# ---- the state of a run (r between steps) ---------------------------------------------------------
class GradientGuard:
    """The guard of one unlearning run over ``params`` (the trainable parameters, grouped by
    ``group_ids``); ``sharded``: FSDP2 gradients, whose local dot products are all-reduced."""

    def __init__(self, params: Sequence[torch.nn.Parameter], group_ids: Sequence[int], n_groups: int, method: str,
                 scope: str, gamma: float, sharded: bool = False):
        if method not in GUARDS[1:]:
            raise ValueError(f"unknown guard {method!r}; valid: {', '.join(GUARDS[1:])}")
        if scope not in SCOPES:
            raise ValueError(f"unknown guard scope {scope!r}; valid: {', '.join(SCOPES)}")
        self.params, self.group_ids, self.n_groups = list(params), [int(g) for g in group_ids], int(n_groups)
        self.method, self.scope, self.sharded = method, scope, sharded
        self.gamma = 1.0 if method == "pcgrad" else float(gamma)  # PCGrad: the step's own retain gradient
        self.direction: Optional[List[torch.Tensor]] = None  # r, like the gradients (DTensor shards under FSDP2)
        self.retain_dot: Optional[torch.Tensor] = None  # ⟨g_r, r⟩ per group, of the step under way
        # the step whose retain gradient r last took in: a step that failed after its retain pass (a
        # non-finite forget term or gradient norm) is saved with it, and re-done from the same θ
        self.through: Optional[int] = None

    def dots(self, a: Sequence[Optional[torch.Tensor]], b: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Σ⟨a_i, b_i⟩ per group over the whole (reduced) gradients: local shards, then one all-reduce."""
        keep = [dist_.counted_here(p) for p in self.params]
        la = [dist_.local_part(x) if x is not None and k else None for x, k in zip(a, keep)]
        lb = [dist_.local_part(x) if x is not None and k else None for x, k in zip(b, keep)]
        out = grouped_dots(la, lb, self.group_ids, self.n_groups)
        return dist_.all_reduce_sum(out) if self.sharded else out

    def after_retain(self, lam: float, step: int) -> None:
        """``p.grad`` holds the retain gradient g_r of step ``step`` (reduced): r takes it in (unless it
        already has: the step is being re-done), ⟨g_r, r⟩ is kept, and ``p.grad`` becomes λ·g_r (the
        forget pass adds g_u to it)."""
        grads = [p.grad for p in self.params]
        if self.direction is None:  # r_{-1} = 0
            self.direction = [torch.zeros_like(p if g is None else g) for p, g in zip(self.params, grads)]
        with torch.no_grad():
            if self.through != step:
                for r, g in zip(self.direction, grads):
                    moving_average_(r, g, self.gamma)
                self.through = step
            self.retain_dot = self.dots(grads, self.direction)
            for g in grads:
                if g is not None:
                    g.mul_(lam)

    def after_forget(self, lam: float) -> Dict[str, float]:
        """``p.grad`` holds g_u + λ·g_r: the conflicting part of g_u is taken out, in place. Returns
        the step's log: groups projected, ⟨g_u, r⟩ (whole model) and the norm of what was removed."""
        if self.retain_dot is None:
            raise RuntimeError("after_forget() before after_retain(): the retain pass of the step is missing")
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            norms2 = self.dots(self.direction, self.direction)
            dots = self.dots(grads, self.direction) - lam * self.retain_dot
            c = projection_coefficients(dots, norms2, self.scope)
            for p, r, gid in zip(self.params, self.direction, self.group_ids):
                if c[gid] != 0:
                    if p.grad is None:
                        p.grad = torch.zeros_like(r)
                    p.grad.add_(r, alpha=-float(c[gid]))
        self.retain_dot = None
        dot, removed = float(dots.sum()), math.sqrt(float((c * c * norms2).sum()))
        # a non-finite gradient stops the step at clipping; its log line holds null, as strict JSON wants
        return {"guard_projected": int((c != 0).sum()), "guard_dot": dot if math.isfinite(dot) else None,
                "guard_removed_norm": removed if math.isfinite(removed) else None}

    def state(self) -> Optional[dict]:
        """r and the step it last took in, for the resumable state (on the CPU: the tensors themselves
        there, written at once, not copied; None for PCGrad, whose r is the step's own, before the
        first step, and under FSDP2, whose shards only their rank holds: a resume there starts r again
        from 0)."""
        if self.direction is None or self.sharded or self.method == "pcgrad":
            return None
        return {"direction": [r.detach().to("cpu") for r in self.direction], "through": self.through}

    def load(self, state: Optional[dict]) -> None:
        """Continue with the r of a saved state (None: r starts from 0, as at the first step)."""
        if state is None:
            if self.sharded and self.method == "gru":
                warnings.warn("--geffect-guard gru under FSDP2: the resumable state holds no moving average of the "
                              "retain gradient (its shards live on their ranks); it starts again from 0", stacklevel=2)
            return
        saved = state["direction"]
        if len(saved) != len(self.params):
            raise RuntimeError(f"the saved guard state has {len(saved)} tensors for {len(self.params)} trainable "
                               "parameters: resume with the same model and --lora")
        self.direction = [s.to(p.device, p.dtype) for s, p in zip(saved, self.params)]
        self.through = state["through"]


__all__ = ["GUARDS", "SCOPES", "projection_coefficients", "moving_average_", "guard_gradients", "GradientGuard"]
