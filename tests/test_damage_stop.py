"""--stop-at-retain-damage's decision (fastgeffect.training.damage_stop) on constructed G-effect records."""
import math

import pytest

from fastgeffect.training.damage_stop import DamageSum, damage_stop_step


def records(predicted, realised, r0=2.0):
    """A G-effect log: per step an unlearning line (large changes, never summed) and a retain line."""
    out = []
    for s, (p, r) in enumerate(zip(predicted, realised)):
        out.append({"step": s, "risk": "unlearn", "risk_value": 1.0, "predicted_opt": 100.0, "realised": 100.0})
        out.append({"step": s, "risk": "retain", "risk_value": r0 + 0.5 * s, "predicted_opt": p, "realised": r})
    return out


def test_the_first_step_after_which_the_relative_sum_exceeds_the_threshold():
    # R_retain(θ_0) = 2 (dyadic values: exact sums): predicted relative sums 0.0625, 0.0625, 0.1875, 0.375;
    # realised 0.125, 0.25, 0.1875, 0.375
    recs = records([0.125, 0.0, 0.25, 0.375], [0.25, 0.25, -0.125, 0.375])
    assert damage_stop_step(recs, 0.0625) == 2  # exceeds: equal is not enough
    assert damage_stop_step(recs, 0.1875) == 3
    assert damage_stop_step(recs, 0.375) is None
    assert damage_stop_step(recs, 0.125, "realised") == 1
    assert damage_stop_step(recs, 0.25, "realised") == 3  # step 2's 0.1875 is below again
    assert damage_stop_step(list(reversed(recs)), 0.0625) == 2  # read in step order
    assert damage_stop_step(recs[:4], 0.0625) is None  # steps 0-1 only


def test_a_non_finite_change_is_unbounded_damage_and_the_sum_resumes():
    recs = records([0.01, None, 0.0], [0.0, 0.0, 0.0])
    assert damage_stop_step(recs, 1e6) == 1
    full = DamageSum(0.05)  # relative sums 0.03, 0.06
    steps = [full.add(s, 2.0, {"predicted_opt": p}) for s, p in enumerate([0.06, 0.06, 0.1])]
    assert steps[:1] == [None] and steps[1]["step"] == 1 and steps[1]["damage"] == pytest.approx(0.06)
    assert steps[1]["steps_taken"] == 2 and steps[1]["from"] == "predicted" and steps[1]["threshold"] == 0.05
    resumed = DamageSum(0.05)
    resumed.load(full.state())  # the saved sum continues where it was
    assert resumed.total == full.total and resumed.r0 == 2.0
    assert DamageSum(0.1).add(0, 2.0, {"predicted_opt": None})["damage"] is None  # JSON-safe
    with pytest.raises(ValueError, match="relative damage is undefined"):
        DamageSum(0.1).add(0, 0.0, {"predicted_opt": 0.0})
    with pytest.raises(ValueError, match="source"):
        damage_stop_step(recs, 0.1, "both")
    assert math.isinf(DamageSum(0.1, r0=1.0, total=math.inf).total)
