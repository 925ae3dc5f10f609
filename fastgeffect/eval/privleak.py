"""PrivLeak (MUSE; open-unlearning's ``privleak``, docs/design.md §5.4): how far the model's
Min-K% membership AUC on forget vs holdout rows sits from the retain twin's on the same rows.

MUSE reports AUCs as 1 − x of open-unlearning's convention, so open-unlearning flips both first:
``PrivLeak = ((1 − auc) − (1 − ref)) / (1 − ref) · 100`` (plus 1e-10 in the denominator, as
open-unlearning). 0 is a model the attack sees as the twin; negative values mean the forget rows
still look like members (auc > ref), positive ones that they look less likely than held-out rows
(over-unlearning). Without a twin the reference is 0.5 (open-unlearning's ``ref_value``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from ..data.templates import Template
from .mia import DEFAULT_BATCH_SIZE, DEFAULT_K, DEFAULT_MAX_LENGTH, check_models, mia_auc

NO_TWIN_AUC = 0.5  # open-unlearning's ref_value when no retain model's logs are given
EPS = 1e-10  # open-unlearning's guard in the denominator


def privleak(auc: float, reference_auc: float) -> float:
    """PrivLeak in percent from the model's and the reference's Min-K% AUCs (open-unlearning's sign)."""
    for name, v in (("auc", auc), ("reference_auc", reference_auc)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {v!r}")
    score, ref = 1.0 - auc, 1.0 - reference_auc
    return (score - ref) / (ref + EPS) * 100.0


def privleak_report(model, twin, tokenizer, template: Template, forget_records: Sequence[dict],
                    holdout_records: Sequence[dict], *, k: float = DEFAULT_K, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_length: int = DEFAULT_MAX_LENGTH, model_auc: Optional[float] = None) -> Dict[str, object]:
    """``{"privleak", "mia_min_k", "reference_auc", "reference": "retain twin" | "0.5 (no twin)"}``:
    the Min-K% AUC of ``model`` and of ``twin`` (the retain model, or None) on the same rows.
    ``model_auc`` reuses an already computed ``mia_min_k`` of ``model`` on these rows."""
    check_models(model, tokenizer, twin)
    kw = dict(attack="mia_min_k", k=k, batch_size=batch_size, max_length=max_length)
    if twin is not None:  # the twin first: a bad input fails before the model's pass
        ref = mia_auc(twin, tokenizer, template, forget_records, holdout_records, **kw)["auc"]
    auc = model_auc if model_auc is not None else \
        mia_auc(model, tokenizer, template, forget_records, holdout_records, **kw)["auc"]
    if twin is None:
        ref = NO_TWIN_AUC
    return {"privleak": privleak(auc, ref), "mia_min_k": auc, "reference_auc": ref,
            "reference": "retain twin" if twin is not None else f"{NO_TWIN_AUC} (no twin)"}


__all__ = ["NO_TWIN_AUC", "privleak", "privleak_report"]
