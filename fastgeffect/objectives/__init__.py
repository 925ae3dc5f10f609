"""Registry of unlearning objectives: name -> forget term with defaults (docs/design.md §3).

    obj = get_objective("tnpo", regularizer="gd", lam=1.0, beta=4.0, ref_cache=cache)
    out = obj(model, {"forget": fb, "retain": rb})
    out.loss.backward()

A new objective is one small file defining a :class:`ForgetTerm` plus one line below (a
token-weighted one: an entry in ``fastgeffect/losses/token_weights.py`` and one line in
``token_weighted.py``). Every hyper-parameter name is in :data:`HPARAMS`.
"""
from typing import Dict

from .base import ForgetTerm, ObjectiveOutput, StepContext
from .ceu import CEU
from .dpo import DPO, IDKDPO
from .hparams import HPARAMS, HParam
from .npo import NPO
from .objective import Objective
from .regularizers import REGULARIZERS, Regularizer
from .rmu import RMU
from .simnpo import SIMNPO
from .token_weighted import GA, GRADDIFF, PO, SATIMP, TNPO, WGA, WTNPO
from .undial import UNDIAL

OBJECTIVES: Dict[str, ForgetTerm] = {t.name: t for t in (
    GA, WGA, NPO, TNPO, WTNPO, PO, RMU, GRADDIFF, SIMNPO, DPO, IDKDPO, SATIMP, UNDIAL, CEU,
)}
REGULARIZER_NAMES = tuple(REGULARIZERS)


def get_objective(name: str, regularizer: str = None, lam: float = 1.0, **kwargs) -> Objective:
    """An :class:`Objective` by registry name; ``regularizer=None`` takes the term's default."""
    key = name.lower()
    if key not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return Objective(OBJECTIVES[key], regularizer, lam, **kwargs)


__all__ = ["OBJECTIVES", "REGULARIZERS", "REGULARIZER_NAMES", "HPARAMS", "HParam", "ForgetTerm", "Regularizer",
           "Objective", "ObjectiveOutput", "StepContext", "get_objective"]
