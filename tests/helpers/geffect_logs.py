"""Comparing G-effects. A G-effect has no fixed sign and can be far smaller than the terms it sums
(a retaining G-effect is often ~1e-3 of its step's unlearning one), so rounding differences are
measured against the size of those terms, never relative to the one value."""
from collections import defaultdict


def abs_sum(groups: dict) -> float:
    """Σ|group| of one measurement: the scale of rounding in its total."""
    return sum(abs(v) for v in groups.values())


def step_scales(records, key="groups") -> dict:
    """step -> Σ|group| over every record (every risk) of that step (``key``: the groups' field)."""
    scale = defaultdict(float)
    for r in records:
        scale[r["step"]] += abs_sum(r[key])
    return scale


def assert_same_geffects(want, got, rel, groups=False):
    """The same (step, risk) records, each total (and with ``groups`` each group) within
    ``rel`` × its step's scale (:func:`step_scales` of ``want``); likewise the update effects
    where both records hold them (on their own scale)."""
    assert [(r["step"], r["risk"]) for r in want] == [(r["step"], r["risk"]) for r in got]
    _assert_same(want, got, rel, groups, "total", "groups")
    both = [(a, b) for a, b in zip(want, got) if "update_groups" in a and "update_groups" in b]
    _assert_same([a for a, _ in both], [b for _, b in both], rel, groups, "update_total", "update_groups")


def _assert_same(want, got, rel, groups, total, group_key):
    scale = step_scales(want, group_key)
    for a, b in zip(want, got):
        tol = rel * scale[a["step"]]
        assert abs(b[total] - a[total]) <= tol, (total, a, b, tol)
        for g in a[group_key] if groups else ():
            assert abs(b[group_key][g] - a[group_key][g]) <= tol, (g, a, b, tol)
