"""Our TOFU evaluation in open-unlearning's files (docs/design.md §5), so its tooling reads our runs.

open-unlearning's TOFU evaluator writes ``TOFU_EVAL.json`` (per metric ``{"agg_value": x,
"value_by_index": {"0": {...}, ...}}``, keys sorted, indent 4) and ``TOFU_SUMMARY.json`` (metric →
``agg_value``, the metrics whose value is known). :func:`write_open_unlearning` writes both from
our per-sample logs, under its metric names (``configs/eval/tofu_metrics``), with its per-index
entries and definitions (truth ratio q = exp(−mean avg perturbed loss) / exp(−avg paraphrased
loss), the geometric one):

* ``{p}_Q_A_Prob`` (``prob``, ``avg_loss``), ``{p}_Q_A_PERT_Prob`` (lists), ``{p}_Q_A_ROUGE``
  (``rouge1_recall``, ``rougeL_recall``, ``input``, ``generation``, ``ground_truth``) for p in
  ``forget`` / ``retain`` / ``ra`` / ``wf``; ``forget/retain_Q_A_PARA_Prob``;
  ``ra/wf_Q_A_Prob_normalised`` (``prob``: TOFU's Prob. on those sets);
* ``forget_truth_ratio`` (``score`` = q; aggregated as mean min(q, 1/q)) and ``{p}_Truth_Ratio``
  (aggregated as mean max(0, 1 − q)); a q that overflows is written as null;
* ``model_utility`` (the harmonic mean of the nine, geometric truth ratios) and ``forget_quality``
  (from ``metrics["Forget Quality"]``), ``agg_value`` only;
* ``extra``: further metrics by their names (``mia_min_k``, ``privleak``, ``exact_memorization``,
  ...), each a number (its ``agg_value``) or a dict with an ``agg_value`` (and ``value_by_index``).

Reading a retain model's file for Forget Quality / PrivLeak: :mod:`.open_unlearning_retain`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np

from ..jsonfile import write_json
from .aggregate import FILES, aggregate, log_perturbed_ratio
from .open_unlearning_retain import privleak_reference, retain_log_from_open_unlearning

EVAL_FILE = "TOFU_EVAL.json"
SUMMARY_FILE = "TOFU_SUMMARY.json"
PREFIX = {"eval_log_forget.json": "forget", "eval_log.json": "retain",
          "eval_real_author_wo_options.json": "ra", "eval_real_world_wo_options.json": "wf"}

__all__ = ["EVAL_FILE", "SUMMARY_FILE", "open_unlearning_logs", "summary", "write_open_unlearning",
           "privleak_reference", "retain_log_from_open_unlearning"]


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def _probs(losses: Mapping) -> dict:
    """Per index ``{"prob": exp(-l), "avg_loss": l}`` (lists for several answers); agg: the mean."""
    def one(v):
        return {"prob": [math.exp(-x) for x in v], "avg_loss": list(v)} if isinstance(v, list) else \
            {"prob": math.exp(-v), "avg_loss": v}
    vbi = {i: one(v) for i, v in losses.items()}
    per_row = [np.mean(e["prob"]) for e in vbi.values()]
    return {"agg_value": float(np.mean(per_row)), "value_by_index": vbi}


def _entries(log: Mapping, fname: str, ours: Mapping[str, Optional[float]]) -> Dict[str, dict]:
    """open-unlearning's metrics of one of our logs; ``ours``: its geometric sub-metrics (aggregate)."""
    p, name = PREFIX[fname], FILES[fname]
    out = {f"{p}_Q_A_Prob": _probs(log["avg_gt_loss"]), f"{p}_Q_A_PERT_Prob": _probs(log["average_perturb_loss"])}
    if p in ("forget", "retain"):
        out[f"{p}_Q_A_PARA_Prob"] = _probs(log["avg_paraphrased_loss"])
    else:  # TOFU's Prob. on the knowledge sets: the answer's share among the answers
        gt = np.asarray(list(log["avg_gt_loss"].values()), dtype=np.float64)
        pert = np.asarray(list(log["average_perturb_loss"].values()), dtype=np.float64).reshape(len(gt), -1)
        neg = -np.concatenate([gt[:, None], pert], axis=1)
        share = np.exp(neg[:, 0] - np.logaddexp.reduce(neg, axis=1))
        vbi = {i: {"prob": float(v)} for i, v in zip(log["avg_gt_loss"], share)}
        out[f"{p}_Q_A_Prob_normalised"] = {"agg_value": ours[f"Prob. {name}"], "value_by_index": vbi}
    if "rougeL_recall" in log:
        gen = log.get("generated_text", {})
        vbi = {}
        for i in log["rougeL_recall"]:
            e = {"rouge1_recall": log.get("rouge1_recall", {}).get(i), "rougeL_recall": log["rougeL_recall"][i]}
            if i in gen:
                e.update(input=gen[i][0], generation=gen[i][1], ground_truth=gen[i][2])
            vbi[i] = e
        out[f"{p}_Q_A_ROUGE"] = {"agg_value": ours[f"ROUGE {name}"], "value_by_index": vbi}
    lq = log_perturbed_ratio(log, fname, "geometric")
    tr = "forget_truth_ratio" if p == "forget" else f"{p}_Truth_Ratio"
    out[tr] = {"agg_value": ours[f"Truth Ratio {name}"],
               "value_by_index": {i: {"score": _finite(math.exp(v)) if v < 709 else None}
                                  for i, v in zip(log["avg_paraphrased_loss"], lq)}}
    return out


def open_unlearning_logs(logs: Mapping[str, Mapping], metrics: Optional[Mapping] = None,
                         extra: Optional[Mapping[str, object]] = None) -> Dict[str, dict]:
    """The content of ``TOFU_EVAL.json``: ``{metric: {"agg_value": ..., "value_by_index": ...}}``
    from our logs ``{TOFU file name: per-sample log}``, ``metrics`` (our aggregated ones: Forget
    Quality is taken from there) and ``extra`` (module docstring)."""
    ours = aggregate(logs, require_all=False, truth_ratio="geometric")
    out: Dict[str, dict] = {}
    for fname, log in logs.items():
        out.update(_entries(log, fname, ours))
    if "Model Utility" in ours:
        out["model_utility"] = {"agg_value": ours["Model Utility"]}
    if metrics is not None and metrics.get("Forget Quality") is not None:
        out["forget_quality"] = {"agg_value": metrics["Forget Quality"]}
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping):
            if "agg_value" not in value:
                raise ValueError(f"extra metric {key!r}: a dict needs an 'agg_value' (open-unlearning's form)")
            out[key] = dict(value)
        elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            out[key] = {"agg_value": None if value is None else _finite(float(value))}
        else:
            raise ValueError(f"extra metric {key!r} is {value!r}: give a number, None or a dict with 'agg_value'")
    return dict(sorted(out.items()))


def summary(ou_logs: Mapping[str, Mapping]) -> Dict[str, float]:
    """``TOFU_SUMMARY.json``'s content: each metric's ``agg_value``, where known (as open-unlearning)."""
    return {k: v["agg_value"] for k, v in ou_logs.items() if v.get("agg_value") is not None}


def write_open_unlearning(out_dir: Union[str, Path], logs: Mapping[str, Mapping], metrics: Optional[Mapping] = None,
                          extra: Optional[Mapping[str, object]] = None) -> Dict[str, dict]:
    """Write ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json`` into ``out_dir`` (each atomically) and
    return the former's content (:func:`open_unlearning_logs`). Bad ``extra`` is refused before
    anything is written."""
    ou = open_unlearning_logs(logs, metrics, extra)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / EVAL_FILE, ou, indent=4)
    write_json(out / SUMMARY_FILE, summary(ou), indent=4)
    return ou
