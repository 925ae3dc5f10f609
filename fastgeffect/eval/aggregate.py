"""TOFU aggregation, as TOFU's ``aggregate_eval_stat.py`` computes it (docs/design.md §5).

Per evaluation file (``eval_log.json`` → "Retain", ``eval_real_author_wo_options.json`` →
"Real Authors", ``eval_real_world_wo_options.json`` → "Real World", ``eval_log_forget.json`` →
"Forget"), under TOFU's names:

* ``Prob. X``: mean exp(−avg_gt_loss) on retain/forget; on real authors / world facts the mean
  of p_true / (p_true + Σ p_perturbed), p = exp(−avg loss);
* ``ROUGE X``: mean ``rougeL_recall``;
* ``Truth Ratio X``: with r = exp(mean avg perturbed loss − avg_paraphrased_loss), mean
  min(r, 1/r) on forget and mean max(0, 1 − 1/r) elsewhere;
* ``Model Utility``: scipy's harmonic mean of the 9 non-forget numbers;
* ``Forget Quality`` (= ``KS Test PVal Forget``) and ``KS Test Forget``: ``ks_2samp`` between
  the forget truth ratios r of the model and of a retain-only model; ``log Forget Quality`` is
  its natural log.

Input checks (never a silent wrong number): a log missing a needed key, keys whose sample
indices differ, per-sample lists of different lengths, an empty log, and a retain log whose
sample count differs from the forget log's (a retain model of another split) raise ``ValueError``;
when both forget logs carry ``generated_text``, their ground-truth answers must agree too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
from scipy.stats import hmean, ks_2samp

FILES = {
    "eval_log.json": "Retain",
    "eval_real_author_wo_options.json": "Real Authors",
    "eval_real_world_wo_options.json": "Real World",
    "eval_log_forget.json": "Forget",
}
UTILITY_FILES = ("eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json")
METRICS = ("ROUGE", "Prob.", "Truth Ratio")


def _values(log: Mapping, key: str, fname: str, ref_keys=None) -> np.ndarray:
    if key not in log:
        raise ValueError(f"{fname}: the log has no {key!r} entry (keys: {sorted(log)})")
    entry = log[key]
    if not isinstance(entry, Mapping) or len(entry) == 0:
        raise ValueError(f"{fname}: {key!r} must be a non-empty mapping from sample index to value")
    if ref_keys is not None and list(entry.keys()) != ref_keys:
        raise ValueError(f"{fname}: {key!r} covers samples {len(entry)} that differ from the log's other "
                         f"entries ({len(ref_keys)}); the log is inconsistent")
    vals = list(entry.values())
    if isinstance(vals[0], (list, tuple)):
        lens = {len(v) for v in vals}
        if len(lens) != 1:
            raise ValueError(f"{fname}: {key!r} has per-sample lists of different lengths {sorted(lens)}")
    return np.asarray(vals, dtype=np.float64)


def truth_ratio_r(log: Mapping, fname: str = "log") -> np.ndarray:
    """TOFU's aggregate statistic r = exp(mean avg perturbed loss − avg paraphrased loss) per sample."""
    para = log.get("avg_paraphrased_loss")
    keys = list(para.keys()) if isinstance(para, Mapping) else None
    para = _values(log, "avg_paraphrased_loss", fname)
    pert = _values(log, "average_perturb_loss", fname, keys)
    if pert.ndim == 1:  # a single perturbed answer per sample
        pert = pert[:, None]
    return np.exp(pert.mean(axis=-1) - para)


def file_metrics(log: Mapping, fname: str) -> Dict[str, float]:
    """The three sub-metrics of one TOFU log file."""
    if fname not in FILES:
        raise ValueError(f"unknown TOFU log file {fname!r}; valid: {', '.join(FILES)}")
    name = FILES[fname]
    gt_entry = log.get("avg_gt_loss")
    keys = list(gt_entry.keys()) if isinstance(gt_entry, Mapping) else None
    gt = _values(log, "avg_gt_loss", fname)
    if "eval_log" in fname:
        prob = float(np.mean(np.exp(-gt)))
    else:
        p_true = np.exp(-gt)
        p_false = np.exp(-_values(log, "average_perturb_loss", fname, keys))
        if p_false.ndim == 1:
            p_false = p_false[:, None]
        prob = float(np.mean(p_true / np.concatenate([p_true[:, None], p_false], axis=1).sum(-1)))
    rouge = float(_values(log, "rougeL_recall", fname, keys).mean())
    _values(log, "avg_paraphrased_loss", fname, keys)  # same samples as the rest
    r = truth_ratio_r(log, fname)
    if name == "Forget":
        tr = float(np.mean(np.minimum(r, 1 / r)))
    else:
        tr = float(np.mean(np.maximum(0, 1 - 1 / r)))
    return {f"ROUGE {name}": rouge, f"Prob. {name}": prob, f"Truth Ratio {name}": tr}


def _norm(s: str) -> str:
    return "".join(str(s).split())  # decoding may move spaces around punctuation


def forget_quality(forget_log: Mapping, retain_forget_log: Mapping) -> Dict[str, float]:
    """KS-test p-value between the forget truth ratios of the model and of a retain-only model."""
    fname = "eval_log_forget.json"
    a = truth_ratio_r(forget_log, fname)
    b = truth_ratio_r(retain_forget_log, "retain model's " + fname)
    if len(a) != len(b):
        raise ValueError(f"the retain model's forget log has {len(b)} samples but this forget log has {len(a)}: "
                         "it comes from another forget split "
                         "(forget01: 40, forget05: 200, forget10: 300 with ds_size=300)")
    ga, gb = forget_log.get("generated_text"), retain_forget_log.get("generated_text")
    if isinstance(ga, Mapping) and isinstance(gb, Mapping) and len(ga) == len(gb):
        bad = [k for (k, x), y in zip(ga.items(), gb.values()) if _norm(x[-1]) != _norm(y[-1])]
        if bad:
            raise ValueError(f"the retain model's forget log has other ground-truth answers (samples {bad[:5]}): "
                             "it was made on another forget set")
    res = ks_2samp(a, b)
    p = float(res.pvalue)
    return {"Forget Quality": p, "log Forget Quality": math.log(p) if p > 0 else -math.inf,
            "KS Test PVal Forget": p, "KS Test Forget": float(res.statistic)}


def aggregate(logs: Mapping[str, Mapping], retain_forget_log: Optional[Mapping] = None, *,
              require_all: bool = True) -> Dict[str, float]:
    """Aggregate TOFU logs ``{file name: per-sample log}``.

    ``require_all=True`` (TOFU's setting) needs all four files. With ``require_all=False`` the
    sub-metrics of the files present are reported and ``Model Utility`` only when the three
    non-forget files are all there (never a harmonic mean of fewer numbers).
    """
    unknown = [f for f in logs if f not in FILES]
    if unknown:
        raise ValueError(f"unknown TOFU log files {unknown}; valid: {', '.join(FILES)}")
    missing = [f for f in FILES if f not in logs]
    if require_all and missing:
        raise ValueError(f"missing TOFU log files {missing}")
    out: Dict[str, float] = {}
    for fname in FILES:
        if fname in logs:
            out.update(file_metrics(logs[fname], fname))
    if all(f in logs for f in UTILITY_FILES):
        out["Model Utility"] = float(hmean([out[f"{m} {FILES[f]}"] for f in UTILITY_FILES for m in METRICS]))
    if retain_forget_log is not None:
        if "eval_log_forget.json" not in logs:
            raise ValueError("Forget Quality needs eval_log_forget.json among the logs")
        out.update(forget_quality(logs["eval_log_forget.json"], retain_forget_log))
    return out


def load_logs(path: Union[str, Path]) -> Dict[str, dict]:
    """TOFU logs from a folder holding the four files, or from ``eval_log_aggregated.json``
    (one JSON nesting them under their file names)."""
    p = Path(path)
    if p.is_dir():
        logs = {f: json.loads((p / f).read_text()) for f in FILES if (p / f).is_file()}
        if not logs:
            agg = p / "eval_log_aggregated.json"
            if agg.is_file():
                return load_logs(agg)
            raise FileNotFoundError(f"{p} holds none of the TOFU log files {list(FILES)}")
        return logs
    if not p.is_file():
        raise FileNotFoundError(f"no such log file or folder: {p}")
    data = json.loads(p.read_text())
    suffix = [f for f in FILES if p.name.endswith(f)]  # e.g. phi_retain95_wd0_eval_log_forget.json
    if "avg_gt_loss" in data:
        if not suffix:
            raise ValueError(f"{p} is a single per-sample log whose name does not say which TOFU file it is "
                             f"(it should end with one of {list(FILES)})")
        return {max(suffix, key=len): data}
    nested = {k: v for k, v in data.items() if k in FILES}
    if not nested:
        raise ValueError(f"{p} is neither a TOFU log file nor an eval_log_aggregated.json "
                         f"(top-level keys {sorted(data)[:6]})")
    return nested


def load_retain_log(retain) -> dict:
    """A retain-only model's ``eval_log_forget.json`` content, from a dict, a file, an
    ``eval_log_aggregated.json`` or a folder of logs."""
    if isinstance(retain, Mapping):
        return dict(retain["eval_log_forget.json"]) if "eval_log_forget.json" in retain else dict(retain)
    p = Path(retain)
    if p.is_file():
        data = json.loads(p.read_text())
        if "avg_gt_loss" in data:  # a bare forget log, whatever its file name
            return data
    logs = load_logs(p)
    if "eval_log_forget.json" not in logs:
        raise ValueError(f"{p} has no eval_log_forget.json for Forget Quality")
    return logs["eval_log_forget.json"]


def format_table(metrics: Mapping[str, float]) -> str:
    w = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{w}}  {v:.6g}" for k, v in metrics.items())
