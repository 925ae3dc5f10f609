"""Intervals over seeds: the mean of a metric over a setting's seeds with a 95 % t-interval and a 95 %
percentile bootstrap interval, and paired differences between two settings over the same seeds.

Pure functions of numbers (numpy, scipy), no files. Which interval is the headline: the t-interval.
With the 2–3 seeds a study can afford, the percentile bootstrap interval of a mean never reaches
beyond the observed values (its resampled means lie between the smallest and the largest), so it
covers the true mean at most 1 − 2·0.5^k of the time for k seeds (50 % at 2 seeds, 75 % at 3),
whatever its nominal level; the t-interval (mean ± t_{k−1}·s/√k) holds its level when seed-to-seed
noise is roughly normal and widens honestly with few seeds (t_1 = 12.7). Both are given, named.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import t as student_t

LEVEL = 0.95  # the level of every interval
RESAMPLES = 10_000  # bootstrap resamples
BOOTSTRAP_SEED = 0  # the resampling is seeded: the same numbers give the same interval
HEADLINE = "t"  # the interval tables lead with (module docstring: why)


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, its t-interval and its percentile bootstrap interval (None with one value)."""
    n: int
    mean: float
    t_low: Optional[float]
    t_high: Optional[float]
    boot_low: Optional[float]
    boot_high: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _values(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty list of numbers, got {values!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"expected finite numbers, got {values!r}")
    return x


def bootstrap_means(values: Sequence[float], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The means of ``resamples`` resamples (with replacement, each the size of ``values``), drawn by
    ``numpy.random.default_rng(seed)`` as one ``(resamples, n)`` array of indices."""
    x = _values(values)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    return x[idx].mean(axis=1)


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> Tuple[float, float]:
    """The percentile bootstrap interval of the mean: the (1 − level)/2 and (1 + level)/2 quantiles
    (numpy's linear interpolation) of :func:`bootstrap_means`."""
    means = bootstrap_means(values, resamples, seed)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Optional[Tuple[float, float]]:
    """mean ± t_{(1+level)/2, n−1} · s / √n (s: the sample standard deviation); None for one value."""
    x = _values(values)
    if x.size < 2:
        return None
    half = float(student_t.ppf((1 + level) / 2, x.size - 1)) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return float(x.mean()) - half, float(x.mean()) + half


def interval(values: Sequence[float]) -> Interval:
    """Mean, t-interval and bootstrap interval of ``values`` (the intervals None for one value)."""
    x = _values(values)
    t = t_interval(x)
    boot = bootstrap_interval(x) if x.size > 1 else None
    return Interval(int(x.size), float(x.mean()), *(t or (None, None)), *(boot or (None, None)))


def paired_differences(a: Mapping[int, float], b: Mapping[int, float], a_name: str = "a",
                       b_name: str = "b") -> Dict[int, float]:
    """``b[s] − a[s]`` for every seed ``s``; ValueError naming the seeds one of them lacks (an
    unpaired seed would make the difference one of seeds, not of settings)."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        lacks = [f"{name} lacks seed(s) {', '.join(map(str, seeds))}"
                 for name, seeds in ((b_name, only_a), (a_name, only_b)) if seeds]
        raise ValueError(f"paired differences {b_name} − {a_name} need the same seeds: {'; '.join(lacks)}")
    return {s: b[s] - a[s] for s in sorted(a)}
