"""Stopping on predicted damage (``--stop-at-retain-damage X``): unlearning stops after the first
step t at which the cumulative relative change of the retain risk, Σ_{s≤t} Δ_s / R_retain(θ_0),
exceeds X, Δ_s being the step's predicted change under the AdamW step (``predicted_opt``) or, with
``source="realised"``, its realised change. R_retain(θ_0) is the retain risk's value at step 0.
With fixed risk rows the realised changes add up to the change of one risk since θ_0.

:func:`damage_stop_step` is the decision over a G-effect log's records (pure);
:class:`DamageSum` is the same sum kept step by step by the loop, saved with its resumable state.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Optional

# the G-effect log's field each source sums
FIELD = {"predicted": "predicted_opt", "realised": "realised"}


@dataclass
class DamageSum:
    threshold: float
    source: str = "predicted"
    r0: Optional[float] = None    # the retain risk at step 0
    total: float = 0.0            # Σ Δ_s of the steps added so far

    def add(self, step: int, risk_value: float, changes: Mapping[str, Optional[float]]) -> Optional[dict]:
        """Add step ``step``'s change (``changes``: its retain outcome; ``risk_value``: the risk before
        it); the stop record when the relative sum now exceeds the threshold, else None. A change
        that is not finite (None in the log) counts as unbounded damage."""
        if self.r0 is None:
            if not risk_value > 0:
                raise ValueError(f"the retain risk at step {step} is {risk_value}: the relative damage is undefined")
            self.r0 = float(risk_value)
        value = changes.get(FIELD[self.source])
        self.total += math.inf if value is None else float(value)
        damage = self.total / self.r0
        if not damage > self.threshold:
            return None
        return {"reason": f"{self.source} retain damage above --stop-at-retain-damage", "step": step,
                "steps_taken": step + 1, "damage": damage if math.isfinite(damage) else None,
                "threshold": self.threshold, "from": self.source}

    def state(self) -> dict:
        return asdict(self)

    def load(self, state: Optional[dict]) -> None:
        """Continue the sum of a saved state (a state without one: nothing was added yet)."""
        if state is not None:
            self.r0, self.total = state["r0"], state["total"]


def damage_stop_step(records: Iterable[Mapping], threshold: float, source: str = "predicted") -> Optional[int]:
    """The step after which unlearning stops for ``records`` (G-effect log lines; the retain risk's,
    one per step from step 0, are read in step order), or None when the damage never exceeds
    ``threshold``."""
    if source not in FIELD:
        raise ValueError(f"source must be one of {', '.join(FIELD)}, got {source!r}")
    retain = sorted((r for r in records if r["risk"] == "retain"), key=lambda r: r["step"])
    damage = DamageSum(threshold, source)
    for r in retain:
        if damage.add(r["step"], r["risk_value"], r) is not None:
            return r["step"]
    return None


__all__ = ["FIELD", "DamageSum", "damage_stop_step"]
