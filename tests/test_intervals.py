"""Intervals over seeds (fastgeffect/report/intervals.py) against written-out references, and the
p-values Forget Quality's KS test can take (fastgeffect/report/ks_resolution.py) against scipy."""
import itertools
import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from fastgeffect.report import intervals as iv
from fastgeffect.report.ks_resolution import (
    _band_path,
    attainable_ks_pvalues,
    cannot_resolve,
    resolution_note,
    samples_of_path,
)

VALUES = [0.412, 0.448, 0.395]


def slow_bootstrap(values, resamples, seed, level):
    """One resample at a time from the same generator, the quantiles by the textbook linear rule."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        idx = rng.integers(0, len(values), size=len(values))
        means.append(sum(values[i] for i in idx) / len(values))
    means.sort()

    def quantile(q):
        pos = (len(means) - 1) * q
        lo = math.floor(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)
    return quantile((1 - level) / 2), quantile((1 + level) / 2)


@pytest.mark.parametrize("values", [VALUES, [1.0, 3.0], [0.1, 0.5, 0.2, 0.9, 0.4]])
def test_bootstrap_matches_a_slow_loop(values):
    fast = iv.bootstrap_interval(values, resamples=2000, seed=7)
    slow = slow_bootstrap(values, 2000, 7, iv.LEVEL)
    scale = max(abs(v) for v in values)
    assert fast == pytest.approx(slow, abs=1e-12 * scale)
    assert iv.bootstrap_interval(values) == iv.bootstrap_interval(values)  # seeded: the same numbers, one interval
    assert min(values) <= fast[0] <= fast[1] <= max(values)


def test_t_interval_matches_the_hand_formula():
    # t quantiles in closed form: 2 degrees of freedom (2p − 1) / √(2p(1 − p)), 1 degree tan(π(p − ½))
    p = (1 + iv.LEVEL) / 2
    mean = sum(VALUES) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in VALUES) / 2)
    half = (2 * p - 1) / math.sqrt(2 * p * (1 - p)) * s / math.sqrt(3)
    low, high = iv.t_interval(VALUES)
    assert (low, high) == pytest.approx((mean - half, mean + half), abs=1e-12 * max(VALUES))
    # two seeds: s = |a − b| / √2, so the half-width is t · 1
    t1 = math.tan(math.pi * (p - 0.5))
    assert t1 == pytest.approx(12.706, abs=1e-3)  # the table's value
    low, high = iv.t_interval([1.0, 3.0])
    assert (low, high) == pytest.approx((2 - t1, 2 + t1), abs=1e-12 * (2 + t1))
    assert iv.t_interval([0.5]) is None


def test_interval_of_one_value_has_none_and_bad_input_is_named():
    one = iv.interval([0.5])
    assert (one.n, one.mean, one.t_low, one.boot_low) == (1, 0.5, None, None)
    for bad in ([], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="expected"):
            iv.interval(bad)


def test_paired_differences_pair_by_seed_and_name_a_missing_seed():
    a, b = {0: 0.5, 1: 0.25, 2: 1.0}, {2: 0.5, 0: 0.75, 1: 0.25}
    assert iv.paired_differences(a, b, "ga", "npo") == {0: 0.25, 1: 0.0, 2: -0.5}
    with pytest.raises(ValueError, match="npo − ga need the same seeds: npo lacks seed\\(s\\) 2"):
        iv.paired_differences(a, {0: 0.5, 1: 0.5}, "ga", "npo")
    with pytest.raises(ValueError, match="ga lacks seed\\(s\\) 3"):
        iv.paired_differences(a, {**b, 3: 0.1}, "ga", "npo")


def every_statistic(n, m):
    """(D, p) of ks_2samp over every interleaving of n and m distinct values (the slow reference)."""
    out = set()
    for first in itertools.combinations(range(n + m), n):
        path = [1] * (n + m)
        for k in first:
            path[k] = 0
        x, y = samples_of_path(path)
        res = ks_2samp(x, y)
        out.add((round(float(res.statistic), 12), round(float(res.pvalue), 12)))
    return sorted(out)


@pytest.mark.parametrize("n, m", [(3, 4), (4, 4), (2, 5), (5, 3), (4, 6), (5, 5)])
def test_attainable_p_values_are_every_p_value_scipy_can_give(n, m):
    got = [(round(d, 12), round(p, 12)) for d, p in attainable_ks_pvalues(n, m)]
    assert got == every_statistic(n, m)


def test_the_equal_size_shortcut_agrees_with_the_search():
    n = 6
    fast = attainable_ks_pvalues(n, n)
    for k, (d, p) in enumerate(fast, 1):
        x, y = samples_of_path(_band_path(n, n, k * n))
        res = ks_2samp(x, y)
        assert (d, p) == (pytest.approx(k / n, abs=1e-12), pytest.approx(float(res.pvalue), abs=1e-12))


def test_the_issue_s_values_at_ten_rows_and_the_resolution_rule():
    pv = attainable_ks_pvalues(10, 10, down_to=1e-3)
    got = {round(d, 9): p for d, p in pv}
    for d, p in ((0.2, 0.994), (0.3, 0.787), (0.4, 0.418), (0.5, 0.168)):  # the values issue 29 quotes
        assert got[d] == pytest.approx(p, abs=5e-4)
    assert pv[-1][1] < 1e-3 <= pv[-2][1]  # stops after the first below down_to
    assert cannot_resolve(pv)
    note = resolution_note(10, 10)
    assert "cannot resolve at n = 10" in note and "0.168 (D = 0.5)" in note and note.count(", ...") == 1
    assert resolution_note(300, 300) is None  # dozens of attainable values above 0.05
    assert not cannot_resolve(attainable_ks_pvalues(300, 300, down_to=0.05))
