"""Scalar names shared by every report of a run (TensorBoard from the driver, a Trainer's ``report_to``):
``geffect/<risk>/<group>`` and ``geffect/<risk>/total``, ``risk/<risk>``, ``train/<term>``,
``weights/<stat>``, ``<prefix>/<metric>``. Pure functions from records to ``{name: float}``."""
from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Dict, Mapping

if TYPE_CHECKING:  # a type only: the command line imports these names without the engine
    from .geffect import GEffectResult


def _number(v) -> bool:
    """A finite real (``bool`` excluded): what a scalar chart can show."""
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def geffect_scalars(results: Mapping[str, GEffectResult]) -> Dict[str, float]:
    """Per-group and total G-effects, and the risk value, of one measurement."""
    out: Dict[str, float] = {}
    for risk, res in results.items():
        out[f"geffect/{risk}/total"] = float(res.total)
        for group, value in res.groups.items():
            out[f"geffect/{risk}/{group}"] = float(value)
        out[f"risk/{risk}"] = float(res.risk)
    return out


def train_scalars(row: Mapping) -> Dict[str, float]:
    """One ``train_log.jsonl`` row: ``train/<term>`` for each number (loss terms, grad norm, ...),
    ``<key>/<stat>`` for a nested dict of numbers (the objective-weight statistics ``weights``).
    ``step`` and ``epoch`` are the x axis, not charts; ``None`` (an undefined value) is left out."""
    out: Dict[str, float] = {}
    for k, v in row.items():
        if k in ("step", "epoch"):
            continue
        if isinstance(v, Mapping):
            out.update({f"{k}/{s}": float(x) for s, x in v.items() if _number(x)})
        elif _number(v):
            out[f"train/{k}"] = float(v)
    return out


def metric_scalars(metrics: Mapping, prefix: str) -> Dict[str, float]:
    """``<prefix>/<name>`` for each number of an evaluation's metrics (other entries left out)."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if _number(v)}


__all__ = ["geffect_scalars", "train_scalars", "metric_scalars"]
