"""The :class:`Objective`: forget term + λ·regulariser, with validated hyper-parameters."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Union

import torch

from ..reference import ReferenceModel, RefLogprobCache
from .base import Batch, ForgetTerm, ObjectiveOutput, StepContext, add_weight_mean
from .hparams import HPARAMS
from .regularizers import PDU_DEFAULTS, REGULARIZERS, dual_ascent


def check_pdu(hparams: Mapping[str, object], given: Mapping[str, object]) -> None:
    """PDU needs both its bound ε and a dual step η > 0 (finite): one without the other is refused
    (ε alone would silently keep λ fixed; η alone would bound the retain loss by the default 0)."""
    if "constraint_eps" not in hparams:
        return
    eps, step = float(hparams["constraint_eps"]), float(hparams["dual_step"])
    if not math.isfinite(eps):
        raise ValueError(f"constraint_eps must be a finite number, got {eps!r}")
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"dual_step must be a finite number >= 0, got {step!r}")
    if "constraint_eps" in given and step == 0:
        raise ValueError("constraint_eps is PDU's retain bound ε: give a dual step dual_step > 0 too "
                         "(open-unlearning uses 1.0); with dual_step 0 λ never moves")
    if step > 0 and "constraint_eps" not in given:
        raise ValueError("dual_step > 0 turns on PDU: give its retain bound constraint_eps too")


class Objective:
    """``loss = forget_term + lam · regulariser(retain)``; call it on a dict of batches
    (``forget``, ``retain``, and ``forget_idk`` / ``forget_win`` where the term needs them).

    With ``constraint_eps`` and ``dual_step`` > 0 (PDU), ``lam`` is the starting value of a dual
    variable that the training loop moves after each step with :meth:`dual_update`."""

    def __init__(self, term: ForgetTerm, regularizer: Optional[str] = None, lam: float = 1.0, *,
                 reference: Optional[ReferenceModel] = None,
                 ref_cache: Union[None, RefLogprobCache, Mapping[str, RefLogprobCache]] = None,
                 fused: bool = False, **hparams):
        regularizer = term.default_regularizer if regularizer is None else regularizer
        if regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {regularizer!r}; valid: {', '.join(REGULARIZERS)}")
        valid = {**term.defaults, **REGULARIZERS[regularizer].defaults}
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            hint = ("; constraint_eps and dual_step (PDU) constrain a regulariser: choose gd, kl or rr"
                    if regularizer == "none" and set(unknown) & set(PDU_DEFAULTS) else "")
            raise ValueError(f"unknown hyper-parameter(s) {unknown} for {term.name} with regularizer "
                             f"{regularizer!r}; valid: {sorted(valid) or 'none'}{hint}")
        for k, v in hparams.items():  # the table's bounds (the losses check them again, to the same rule)
            HPARAMS[k].check(v, term.name if k in term.defaults else regularizer)
        self.term = term
        self.regularizer = regularizer
        self.lam = float(lam)
        self.hparams: Dict[str, object] = {**valid, **hparams}
        check_pdu(self.hparams, hparams)
        self.reference = reference
        # cached reference log-probs per sub-batch name; a bare cache belongs to "forget"
        self.ref_caches: Dict[str, RefLogprobCache] = (
            {} if ref_cache is None else {"forget": ref_cache} if isinstance(ref_cache, RefLogprobCache)
            else dict(ref_cache))
        self.fused = fused

    @property
    def name(self) -> str:
        return self.term.name

    @property
    def needs_batches(self):
        return self.term.needs_batches + (("retain",) if self.regularizer != "none" else ())

    @property
    def needs_reference_model(self) -> bool:
        """The term or the regulariser runs the original model θ_o at every step (UNDIAL, KL, RR)."""
        return self.term.needs_reference_model or REGULARIZERS[self.regularizer].needs_reference_model

    @property
    def primal_dual(self) -> bool:
        """PDU: λ is the dual variable of the retain constraint ``reg_loss ≤ constraint_eps``."""
        return float(self.hparams.get("dual_step", 0.0)) > 0

    def dual_update(self, reg_loss: float) -> float:
        """PDU: after a step whose (whole accumulated batch's) retain loss was ``reg_loss``, move λ by
        :func:`~.regularizers.dual_ascent` and return the new λ (used from the next step on)."""
        if not self.primal_dual:
            raise ValueError("dual_update is PDU's: give the objective constraint_eps and dual_step > 0")
        self.lam = dual_ascent(self.lam, float(reg_loss), float(self.hparams["constraint_eps"]),
                               float(self.hparams["dual_step"]))
        return self.lam

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"Objective({self.name}, regularizer={self.regularizer}, lam={self.lam}{', ' + hp if hp else ''})"

    def context(self, model: torch.nn.Module, num_items: Optional[Mapping[str, object]] = None,
                per_sample: bool = False) -> StepContext:
        return StepContext(model, self.reference, dict(num_items or {}), self.fused, per_sample)

    def with_cached_refs(self, batches: Mapping[str, Batch]) -> Dict[str, Batch]:
        """``batches`` with ``ref_logprobs`` gathered from the caches where a sub-batch has none."""
        out = dict(batches)
        for key in self.term.ref_batches:
            b, cache = out.get(key), self.ref_caches.get(key)
            if b is not None and cache is not None and "ref_logprobs" not in b and "index" in b:
                out[key] = {**b, "ref_logprobs": cache.gather(b["index"], b["labels"])}
        return out

    def forget_loss(self, model: torch.nn.Module, batches: Mapping[str, Batch],
                    num_items: Optional[Mapping[str, object]] = None, *, per_sample: bool = False):
        """The forget term alone: ``(loss, details)``; ``per_sample=True`` gives (B,) contributions
        ℓ_i that sum to the batch loss (the per-sample terms of PG-effects)."""
        ctx = self.context(model, num_items, per_sample)
        return self.term.fn(ctx, self.with_cached_refs(batches), self.hparams)

    def __call__(self, model: torch.nn.Module, batches: Mapping[str, Batch],
                 num_items: Optional[Mapping[str, object]] = None) -> ObjectiveOutput:
        missing = [k for k in self.needs_batches if k not in batches]
        if missing:
            raise KeyError(f"{self.name} (regularizer {self.regularizer}) needs batches {missing}; "
                           f"got {sorted(batches)}")
        ctx = self.context(model, num_items)
        forget, details = self.term.fn(ctx, self.with_cached_refs(batches), self.hparams)
        reg = None
        loss = forget
        if self.regularizer != "none":
            reg = REGULARIZERS[self.regularizer].fn(ctx, batches["retain"], self.hparams)
            loss = forget + self.lam * reg
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"non-finite {self.name} loss: forget term {float(forget.detach())}, "
                                     f"regulariser {None if reg is None else float(reg.detach())}")
        return ObjectiveOutput(loss, forget, reg, add_weight_mean(details))
