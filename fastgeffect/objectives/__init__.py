"""Registry of unlearning objectives: name -> forget term with defaults (DESIGN.md §3).

    obj = get_objective("tnpo", regularizer="gd", lam=1.0, beta=4.0, ref_cache=cache)
    out = obj(model, {"forget": fb, "retain": rb})
    out.loss.backward()

A new objective is one small file defining a :class:`ForgetTerm` plus one line below.
"""
from typing import Dict

from .base import ForgetTerm, ObjectiveOutput, StepContext
from .dpo import DPO, IDKDPO
from .ga import GA, GRADDIFF
from .npo import NPO
from .objective import Objective
from .po import PO
from .regularizers import REGULARIZER_DEFAULTS
from .rmu import RMU
from .simnpo import SIMNPO
from .tnpo import TNPO
from .wga import WGA
from .wtnpo import WTNPO

OBJECTIVES: Dict[str, ForgetTerm] = {t.name: t for t in (
    GA, WGA, NPO, TNPO, WTNPO, PO, RMU, GRADDIFF, SIMNPO, DPO, IDKDPO,
)}
REGULARIZER_NAMES = tuple(REGULARIZER_DEFAULTS)


def get_objective(name: str, regularizer: str = None, lam: float = 1.0, **kwargs) -> Objective:
    """An :class:`Objective` by registry name; ``regularizer=None`` takes the term's default."""
    key = name.lower()
    if key not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return Objective(OBJECTIVES[key], regularizer, lam, **kwargs)


__all__ = ["OBJECTIVES", "REGULARIZER_NAMES", "ForgetTerm", "Objective", "ObjectiveOutput", "StepContext",
           "get_objective"]
