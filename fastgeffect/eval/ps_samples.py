"""Which TOFU rows each PS protocol scores (docs/design.md, "PS protocols").

A protocol's samples: ``{"exact": {"retain": rows, "forget": rows}, "perturb": {...}}``; PS-exact
asks ``question`` of the ``exact`` rows, PS-perturb ``paraphrased_question`` of the ``perturb`` rows.
``load(name)`` returns the rows of a TOFU split (e.g. ``retain90``, ``forget05_perturbed``) in the
hub's order.

``paper`` (``evaluation_everything.py``, tmlr-group/G-effect): ``np.random.seed(42)`` at import,
then for PS-perturb and then PS-exact, retain before forget, ``np.random.choice(n, 50,
replace=False)`` of each set with more than 50 rows (kept whole otherwise); the sets are
``retain_perturbed`` / ``<split>_perturbed`` (perturb) and the first 400 rows of ``retainXX`` /
``<split>`` (exact).

``uwc-linear`` (``phi_exact.py`` etc., tmlr-group/Unlearning-with-Control): the first 40 rows of
``retainXX`` (exact) or ``retain_perturbed`` (perturb); ``forget01`` whole (40 rows), otherwise
``datasets``' ``train_test_split(train_size=40)`` without a seed in a fresh process after
``np.random.seed(42)``: the permutation of ``np.random.default_rng(42)``, its last 40 entries.

``clean`` (fastgeffect's): the first ``eval_size`` rows of the TOFU evaluation sets the other
metrics use (``retain_perturbed``, ``<split>_perturbed``), the same rows for both questions.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np

from ..data.tofu import RETAIN_OF
from .ps_protocols import PS_PROTOCOLS

Rows = List[dict]
Samples = Dict[str, Dict[str, Rows]]
PAPER_SAMPLES, PAPER_RETAIN_POOL = 50, 400
UWC_LINEAR_SAMPLES = 40


def _check_split(split: str) -> None:
    if split not in RETAIN_OF:
        raise ValueError(f"unknown forget split {split!r}; valid: {', '.join(RETAIN_OF)}")


def paper_samples(load: Callable[[str], Rows], split: str) -> Samples:
    _check_split(split)
    rng = np.random.RandomState(42)  # the legacy global generator np.random.seed(42) sets

    def draw(rows: Rows) -> Rows:
        if len(rows) <= PAPER_SAMPLES:
            return list(rows)
        return [rows[i] for i in rng.choice(len(rows), PAPER_SAMPLES, replace=False)]

    # the draws happen in this order in the public code
    perturb = {"retain": draw(load("retain_perturbed"))}
    perturb["forget"] = draw(load(f"{split}_perturbed"))
    exact = {"retain": draw(load(RETAIN_OF[split])[:PAPER_RETAIN_POOL])}
    exact["forget"] = draw(load(split))
    return {"exact": exact, "perturb": perturb}


def uwc_linear_samples(load: Callable[[str], Rows], split: str) -> Samples:
    _check_split(split)

    def forty(rows: Rows) -> Rows:
        if split == "forget01":
            return list(rows)
        perm = np.random.default_rng(42).permutation(len(rows))
        return [rows[i] for i in perm[len(rows) - UWC_LINEAR_SAMPLES:]]

    return {"exact": {"retain": load(RETAIN_OF[split])[:UWC_LINEAR_SAMPLES], "forget": forty(load(split))},
            "perturb": {"retain": load("retain_perturbed")[:UWC_LINEAR_SAMPLES],
                        "forget": forty(load(f"{split}_perturbed"))}}


def clean_samples(sets: Dict[str, Rows], eval_size: int) -> Samples:
    chosen = {name: list(sets[name][:eval_size]) for name in ("retain", "forget")}
    return {"exact": chosen, "perturb": chosen}


def protocol_samples(protocol: str, load: Callable[[str], Rows], split: str, sets: Dict[str, Rows],
                     eval_size: int) -> Samples:
    """The rows ``protocol`` scores; ``sets`` / ``eval_size`` serve ``clean`` only."""
    if protocol == "paper":
        return paper_samples(load, split)
    if protocol == "uwc-linear":
        return uwc_linear_samples(load, split)
    if protocol == "clean":
        return clean_samples(sets, eval_size)
    raise ValueError(f"unknown PS protocol {protocol!r}; valid: {', '.join(PS_PROTOCOLS)}")
