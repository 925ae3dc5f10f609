"""Which p-values Forget Quality can take: the two-sample KS test at sample sizes n and m.

Forget Quality is ``scipy.stats.ks_2samp``'s p-value between n truth ratios of the model and m of its
retain twin. Its statistic D = sup |F_n − G_m| is a value |i/n − j/m| reached on a path through the
merged order of the two samples, so only a few p-values are possible at small n: at n = m = 10, 1,
0.994, 0.787, 0.418, 0.168, 0.052, ... (D = 0.1, 0.2, ...). FQ then moves in steps of whole rows,
and every FQ above 0.05 leaves the model indistinguishable from its twin.

The test *cannot resolve* at n, m (:func:`cannot_resolve`) when fewer than :data:`MIN_LEVELS`
distinct p-values ≥ :data:`LEVEL_P` are attainable: too few to rank runs by. Samples without ties
(truth ratios are continuous) are assumed.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import numpy as np
from scipy.stats import ks_2samp

LEVEL_P = 0.05  # above it the test does not tell the model from its twin
MIN_LEVELS = 10  # fewer distinct attainable p-values above LEVEL_P: the test cannot resolve
LIST_DOWN_TO = 1e-3  # the note lists the attainable p-values down to this one


def _band_path(n: int, m: int, c: int) -> Optional[List[int]]:
    """A path from (0, 0) to (n, m) (steps 0: next value of the first sample, 1: of the second) whose
    points (i, j) all have |i·m − j·n| ≤ c and one of them = c; None when there is none."""
    i, j = np.arange(n + 1)[:, None], np.arange(m + 1)[None, :]
    dev = np.abs(i * m - j * n)
    inside = dev <= c
    fwd = np.zeros_like(inside)  # reachable from (0, 0) inside the band
    for a in range(n + 1):
        for b in range(m + 1):
            if inside[a, b]:
                fwd[a, b] = (a == 0 and b == 0) or (a > 0 and fwd[a - 1, b]) or (b > 0 and fwd[a, b - 1])
    back = np.zeros_like(inside)  # reaches (n, m) inside the band
    for a in range(n, -1, -1):
        for b in range(m, -1, -1):
            if inside[a, b]:
                back[a, b] = (a == n and b == m) or (a < n and back[a + 1, b]) or (b < m and back[a, b + 1])
    touch = np.argwhere(fwd & back & (dev == c))
    if not len(touch):
        return None
    a, b = (int(v) for v in touch[0])
    head = []  # from the touching point back to (0, 0) through fwd
    x, y = a, b
    while (x, y) != (0, 0):
        if x > 0 and fwd[x - 1, y]:
            head.append(0)
            x -= 1
        else:
            head.append(1)
            y -= 1
    tail = []  # from the touching point on to (n, m) through back
    x, y = a, b
    while (x, y) != (n, m):
        if x < n and back[x + 1, y]:
            tail.append(0)
            x += 1
        else:
            tail.append(1)
            y += 1
    return head[::-1] + tail


def samples_of_path(path: List[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Two samples whose merged order is ``path``: the k-th step's value is k."""
    steps = np.asarray(path)
    return np.flatnonzero(steps == 0).astype(float), np.flatnonzero(steps == 1).astype(float)


def attainable_ks_pvalues(n: int, m: int, down_to: float = 0.0) -> List[Tuple[float, float]]:
    """``(D, p)`` for every statistic D > 0 the two-sided ``ks_2samp`` can give between samples of n
    and m distinct values, D ascending, p from ``ks_2samp`` itself (its default method, as Forget
    Quality calls it) on two samples that attain D; stops after the first p below ``down_to``."""
    if n < 1 or m < 1:
        raise ValueError(f"sample sizes must be >= 1, got n={n}, m={m}")
    grid = np.abs(np.arange(n + 1)[:, None] * m - np.arange(m + 1)[None, :] * n)
    out = []
    for c in np.unique(grid[grid > 0]):
        k = int(c) // n
        # n = m: k steps of one sample first keep every point within k/n (no search needed)
        path = [0] * k + [1, 0] * (n - k) + [1] * k if n == m else _band_path(n, m, int(c))
        if path is None:
            continue
        x, y = samples_of_path(path)
        with warnings.catch_warnings():  # scipy notes where its exact method falls back to the asymptotic one
            warnings.simplefilter("ignore", RuntimeWarning)
            res = ks_2samp(x, y)
        out.append((float(res.statistic), float(res.pvalue)))
        if res.pvalue < down_to:
            break
    return out


def cannot_resolve(pvalues: List[Tuple[float, float]]) -> bool:
    """Fewer than :data:`MIN_LEVELS` distinct attainable p-values ≥ :data:`LEVEL_P`."""
    return len({p for _, p in pvalues if p >= LEVEL_P}) < MIN_LEVELS


def resolution_note(n: int, m: int) -> Optional[str]:
    """The summary's note where Forget Quality cannot resolve at n, m (None where it can)."""
    pvalues = attainable_ks_pvalues(n, m, down_to=LIST_DOWN_TO)
    if not cannot_resolve(pvalues):
        return None
    listed = ", ".join(f"{p:.3g} (D = {d:.3g})" for d, p in pvalues)
    listed += "" if pvalues[-1][0] == 1.0 else ", ..."  # D = 1 (no overlap) is the largest statistic
    return (f"Forget Quality cannot resolve at n = {n} forget rows against m = {m} of the retain twin: the KS "
            f"test can only give the p-values {listed} — fewer than {MIN_LEVELS} distinct values ≥ "
            f"{LEVEL_P}, so FQ moves in steps of whole rows and any FQ ≥ {LEVEL_P} does not tell the model "
            "from its twin")
