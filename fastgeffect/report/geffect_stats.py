"""What the tables and plots show of a G-effect log: one risk's series, the layer groups in order,
cumulative sums, how well each prediction tracks the realised change, each group's share."""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence

import numpy as np

GROUP_ORDER = ("embed", "shallow", "middle", "deep", "lm")
# the predictions of a risk's change a record of a run with update effects holds, with their labels
PREDICTORS = (("predicted_gd", "raw G-effect, −lr·e"), ("predicted_opt", "update effect, −lr·u"))
# with --second-order, a third prediction: the update effect plus ½ Δθᵀ H Δθ
SECOND_ORDER = ("predicted_opt2", "update effect + ½ΔθᵀHΔθ")
# the per-group effects a record holds ("update_groups" only with update effects), with their labels
GROUP_EFFECTS = (("groups", "raw G-effect"), ("update_groups", "update effect"))
# a tied weight's G-effect by use (GEffectResult's split), the fields of each per-group effect
TIED_USES = {"groups": ("tied_input", "tied_lm_head"), "update_groups": ("update_tied_input", "update_tied_lm_head")}
RISKS = ("unlearn", "retain")  # the two risks of every G-effect log, in the order they are shown


def series(records: Sequence[dict], risk: str, key: Optional[str] = None) -> tuple:
    """(steps, values) of one risk: the total, or group ``key``."""
    rows = [r for r in records if r["risk"] == risk]
    steps = [r["step"] for r in rows]
    vals = [r["total"] if key is None else r["groups"].get(key, float("nan")) for r in rows]
    return steps, vals


def groups_of(records: Sequence[dict]) -> List[str]:
    seen = []
    for r in records:
        for g in r["groups"]:
            if g not in seen:
                seen.append(g)
    return [g for g in GROUP_ORDER if g in seen] + [g for g in seen if g not in GROUP_ORDER]


def cumulative(values: Sequence[float]) -> List[float]:
    out, s = [], 0.0
    for v in values:
        s += v
        out.append(s)
    return out


def with_outcome(records: Sequence[dict], risk: str) -> List[dict]:
    """The records of ``risk`` holding a finite realised change and both predictions of it."""
    keys = ("realised",) + tuple(k for k, _ in PREDICTORS)
    return [r for r in records if r["risk"] == risk and all(isinstance(r.get(k), (int, float)) for k in keys)]


def predictors_of(rows: Sequence[dict]) -> tuple:
    """The predictions ``rows`` (of :func:`with_outcome`) all hold: :data:`PREDICTORS`, and the
    second-order one where every row has it."""
    second = rows and all(isinstance(r.get(SECOND_ORDER[0]), (int, float)) for r in rows)
    return PREDICTORS + ((SECOND_ORDER,) if second else ())


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def sign_agreement(pairs: Sequence[tuple]) -> int:
    """How many ``(predicted, realised)`` pairs have the same sign. Zero is a sign of its own: a zero
    prediction agrees only with a zero realised change, and a nonzero one never with zero."""
    return sum(1 for pred, real in pairs if _sign(pred) == _sign(real))


def iqr_log_ratio(pairs: Sequence[tuple]) -> Optional[float]:
    """The interquartile range of log|realised / predicted| over the pairs where both are nonzero
    (numpy's linear quantiles): how far the size of the prediction spreads from step to step,
    blind to a constant factor. None with fewer than two such pairs."""
    logs = [math.log(abs(real)) - math.log(abs(pred)) for pred, real in pairs if pred != 0 and real != 0]
    if len(logs) < 2:
        return None
    q1, q3 = np.percentile(logs, [25, 75])
    return float(q3 - q1)


def sum_ratio(pairs: Sequence[tuple]) -> Optional[float]:
    """Σ realised / Σ predicted: how well the predictions add up to the cumulative change (None
    when the predictions sum to zero)."""
    total = math.fsum(pred for pred, _ in pairs)
    return math.fsum(real for _, real in pairs) / total if total != 0 else None


def spearman(pairs: Sequence[tuple]) -> Optional[float]:
    """Spearman's rank correlation of predicted and realised (scipy.stats.spearmanr); None with
    fewer than two pairs or a constant series, where it is undefined."""
    if len(pairs) < 2 or any(len(set(xs)) < 2 for xs in zip(*pairs)):
        return None
    from scipy.stats import spearmanr  # here: the report's other users need no scipy import
    return float(spearmanr(*zip(*pairs)).statistic)


def prediction_quality(rows: Sequence[dict], key: str) -> Dict[str, Optional[float]]:
    """How well ``key`` predicts the realised change over steps (None where undefined):
    ``sign_agree`` of ``steps`` steps with the sign right (:func:`sign_agreement`, the headline: a
    median ratio near 1 can hide steps predicted with the wrong sign), ``iqr_log_ratio``
    (:func:`iqr_log_ratio`), ``sum_ratio`` Σ realised / Σ predicted, ``spearman`` the rank
    correlation, ``corr`` Pearson's correlation and ``median_ratio`` the median of realised /
    predicted over the steps with a nonzero prediction."""
    pairs = [(r[key], r["realised"]) for r in rows]
    ratios = [real / pred for pred, real in pairs if pred != 0]
    try:
        corr = statistics.correlation(*zip(*pairs)) if len(pairs) >= 2 else None
    except statistics.StatisticsError:  # a constant series has no correlation
        corr = None
    return {"steps": len(pairs), "sign_agree": sign_agreement(pairs), "iqr_log_ratio": iqr_log_ratio(pairs),
            "sum_ratio": sum_ratio(pairs), "spearman": spearman(pairs), "corr": corr,
            "median_ratio": statistics.median(ratios) if ratios else None}


def group_shares(records: Sequence[dict], risk: str, key: str) -> Dict[str, float]:
    """Each group's share of Σ_g |Σ_steps effect_g| of ``risk`` (``key``: "groups" for the raw
    G-effect, "update_groups" for the update effect): which layers the steps move, on one scale."""
    rows = [r for r in records if r["risk"] == risk and key in r]
    sums = {g: sum(r[key].get(g, 0.0) for r in rows) for g in groups_of(records)}
    norm = sum(abs(v) for v in sums.values()) or 1.0
    return {g: v / norm for g, v in sums.items()}


def tied_shares(records: Sequence[dict], risk: str, key: str) -> Optional[Dict[str, float]]:
    """A tied embedding/LM-head weight's part of :func:`group_shares` split by use, on the same
    scale: ``{"input": ..., "lm_head": ...}`` (they sum to the weight's share of its group); None
    unless every record of ``risk`` holding ``key`` holds the split."""
    rows = [r for r in records if r["risk"] == risk and key in r]
    fields = TIED_USES[key]
    if not rows or any(f not in r for r in rows for f in fields):
        return None
    sums = {g: sum(r[key].get(g, 0.0) for r in rows) for g in groups_of(records)}
    norm = sum(abs(v) for v in sums.values()) or 1.0
    return {use: sum(r[f] for r in rows) / norm for use, f in zip(("input", "lm_head"), fields)}
