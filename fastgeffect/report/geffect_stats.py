"""What the tables and plots show of a G-effect log: one risk's series, the layer groups in order,
cumulative sums, how well each prediction tracks the realised change, each group's share."""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

GROUP_ORDER = ("embed", "shallow", "middle", "deep", "lm")
# the predictions of a risk's change a record of a run with update effects holds, with their labels
PREDICTORS = (("predicted_gd", "raw G-effect, −lr·e"), ("predicted_opt", "update effect, −lr·u"))
# the per-group effects a record holds ("update_groups" only with update effects), with their labels
GROUP_EFFECTS = (("groups", "raw G-effect"), ("update_groups", "update effect"))
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


def prediction_quality(rows: Sequence[dict], key: str) -> Dict[str, Optional[float]]:
    """How well ``key`` predicts the realised change over steps: Pearson correlation and the
    median of realised / predicted (None where undefined: < 2 steps, a constant series)."""
    pairs = [(r[key], r["realised"]) for r in rows]
    ratios = [real / pred for pred, real in pairs if pred != 0]
    try:
        corr = statistics.correlation(*zip(*pairs)) if len(pairs) >= 2 else None
    except statistics.StatisticsError:  # a constant series has no correlation
        corr = None
    return {"corr": corr, "median_ratio": statistics.median(ratios) if ratios else None, "steps": len(pairs)}


def group_shares(records: Sequence[dict], risk: str, key: str) -> Dict[str, float]:
    """Each group's share of Σ_g |Σ_steps effect_g| of ``risk`` (``key``: "groups" for the raw
    G-effect, "update_groups" for the update effect): which layers the steps move, on one scale."""
    rows = [r for r in records if r["risk"] == risk and key in r]
    sums = {g: sum(r[key].get(g, 0.0) for r in rows) for g in groups_of(records)}
    norm = sum(abs(v) for v in sums.values()) or 1.0
    return {g: v / norm for g, v in sums.items()}
