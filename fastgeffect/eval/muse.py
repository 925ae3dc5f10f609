"""MUSE's evaluation (issue 27): ``verbmem_f``, ``knowmem_f``, ``knowmem_r`` and ``privleak`` of one
model on a MUSE folder read by :func:`fastgeffect.data.muse.load_muse`, with MUSE's definitions
(:mod:`.muse_memorization`, :mod:`.muse_privleak`).

    from fastgeffect.data.muse import load_muse
    from fastgeffect.eval.muse import evaluate_muse

    data = load_muse("MUSE-News")
    metrics = evaluate_muse(model, tokenizer, data, retain_model=retrained)
    # {"verbmem_f": ..., "knowmem_f": ..., "knowmem_r": ..., "privleak": ..., "privleak_auc": ...,
    #  "privleak_reference_auc": ..., "privleak_reference": "retain model"}

Higher ``verbmem_f`` / ``knowmem_f`` mean more of the forget set remembered (they should fall
under unlearning); ``knowmem_r`` is utility (it should stay); ``privleak`` is near 0 for a model
that looks like the retrained one, very negative for one that still leaks its forget set.
Every argument is checked before any model work. The models are put in eval mode for the
evaluation and given back in the mode they came in.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Dict, Optional, Sequence

from ..data.muse import MuseData
from .mia import check_models
from .muse_memorization import DEFAULT_BATCH_SIZE, knowmem, verbmem_f
from .muse_privleak import MUSE_K, muse_privleak

MUSE_METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
NEEDS = {"verbmem_f": (("verbmem", "forget"),), "knowmem_f": (("knowmem", "forget_qa"), ("knowmem", "forget_qa_icl")),
         "knowmem_r": (("knowmem", "retain_qa"), ("knowmem", "retain_qa_icl")),
         "privleak": (("privleak", "forget"), ("privleak", "holdout"))}


def check_args(data, metrics, batch_size, max_rows, reference_auc) -> None:
    if not isinstance(data, MuseData):
        raise TypeError(f"data must be a MuseData (fastgeffect.data.muse.load_muse), got {type(data).__name__}")
    unknown = [m for m in metrics if m not in MUSE_METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown MUSE metric(s) {unknown or 'none given'}; valid: {', '.join(MUSE_METRICS)}")
    missing = [f"{sub}/{split}" for m in metrics for sub, split in NEEDS[m] if split not in getattr(data, sub)]
    if missing:
        raise ValueError(f"the MUSE data lacks {', '.join(missing)}, needed by the metrics asked for")
    for name, v in (("batch_size", batch_size), ("max_rows", max_rows)):
        if (v is not None or name == "batch_size") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer{' or None' if name == 'max_rows' else ''}, got {v!r}")
    if reference_auc is not None and (isinstance(reference_auc, bool) or not isinstance(reference_auc, numbers.Real)
                                      or not 0 < reference_auc <= 1):
        raise ValueError(f"reference_auc must be an AUC in (0, 1], got {reference_auc!r}")


@contextmanager
def eval_mode(*models):
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.train(was)


def evaluate_muse(model, tokenizer, data: MuseData, *, retain_model=None, batch_size: int = DEFAULT_BATCH_SIZE,
                  max_rows: Optional[int] = None, metrics: Sequence[str] = MUSE_METRICS,
                  reference_auc: Optional[float] = None, privleak_max_length: Optional[int] = None,
                  return_logs: bool = False) -> Dict[str, object]:
    """MUSE's metrics of ``model`` on ``data`` (module docstring).

    ``retain_model``: the retrained model, privleak's reference; without it ``reference_auc``
    (MUSE's orientation, e.g. ``muse_privleak.MUSE_RETRAIN_AUC["news"]`` for MUSE's own Llama-2-7B
    models) or else 0.5, named in ``privleak_reference``. ``max_rows``: the first rows of each
    evaluated set only (the in-context rows are always all used). ``privleak_max_length``: cut
    privleak texts to that many tokens (default: whole, as MUSE). ``return_logs``: add ``"logs"``,
    per metric the per-row records (responses and scores; privleak: the Min-K% scores).
    """
    check_args(data, metrics, batch_size, max_rows, reference_auc)
    if retain_model is not None and reference_auc is not None:
        raise ValueError("give the retained model or a reference AUC, not both")
    check_models(model, tokenizer, retain_model)
    out: Dict[str, object] = {}
    logs: Dict[str, object] = {}
    kw = dict(batch_size=batch_size, max_rows=max_rows)
    with eval_mode(model, retain_model):
        if "verbmem_f" in metrics:
            out["verbmem_f"], logs["verbmem_f"] = verbmem_f(model, tokenizer, data.verbmem["forget"], **kw)
        for name, part in (("knowmem_f", "forget"), ("knowmem_r", "retain")):
            if name in metrics:
                out[name], logs[name] = knowmem(model, tokenizer, data.knowmem[f"{part}_qa"],
                                                data.knowmem[f"{part}_qa_icl"], **kw)
        if "privleak" in metrics:
            cut = (lambda rows: rows) if max_rows is None else (lambda rows: rows[:max_rows])
            res = muse_privleak(model, tokenizer, cut(data.privleak["forget"]), cut(data.privleak["holdout"]),
                                retain_model=retain_model, reference_auc=reference_auc, k=MUSE_K,
                                batch_size=batch_size, max_length=privleak_max_length)
            logs["privleak"] = {k: res.pop(k) for k in ("forget_scores", "holdout_scores")}
            out.update(res)
    if return_logs:
        out["logs"] = logs
    return out


__all__ = ["MUSE_METRICS", "evaluate_muse"]
