"""TOFU aggregation, as TOFU's ``aggregate_eval_stat.py`` computes it (docs/design.md §5).

Per evaluation file (``eval_log.json`` → "Retain", ``eval_real_author_wo_options.json`` →
"Real Authors", ``eval_real_world_wo_options.json`` → "Real World", ``eval_log_forget.json`` →
"Forget"), under TOFU's names:

* ``Prob. X``: mean exp(−avg_gt_loss) on retain/forget; on real authors / world facts the mean
  of p_true / (p_true + Σ p_perturbed), p = exp(−avg loss);
* ``ROUGE X``: mean ``rougeL_recall``;
* ``Truth Ratio X``: with q the perturbed-to-paraphrased probability ratio, mean min(q, 1/q) on
  forget and mean max(0, 1 − q) elsewhere. ``truth_ratio="geometric"`` (the default, as
  ``aggregate_eval_stat.py``, behind TOFU's published numbers): q = exp(avg_paraphrased_loss −
  mean avg perturbed loss), the geometric mean of the perturbed probabilities over the
  paraphrased one; ``"arithmetic"`` (TOFU's ``utils.get_model_utility``): q = mean exp(−avg
  perturbed loss) / exp(−avg_paraphrased_loss). Forget Quality uses the geometric r = 1/q in
  both TOFU scripts, so it does not depend on this choice;
* ``Model Utility``: scipy's harmonic mean of the 9 non-forget numbers;
* ``Forget Quality`` (= ``KS Test PVal Forget``) and ``KS Test Forget``: ``ks_2samp`` between
  the forget truth ratios r of the model and of a retain-only model; ``log Forget Quality`` is
  its natural log.

Exponentials are taken in log space (softmax, expm1), so the large losses of an unlearned model
never give a 0/0; ``log Forget Quality`` is None when the p-value underflows to 0.

Input checks (never a silent wrong number): a log missing a needed key, keys whose sample
indices differ, a per-sample value that is not a finite number (null, NaN, a string), per-sample
lists of different lengths or empty, an empty log, and a retain log whose sample count differs
from the forget log's (another eval size, or a retain model of another split) raise
``ValueError`` naming the file, key and sample; when both forget logs carry ``generated_text``,
their ground-truth answers must agree too. A torn or empty log file is named (``read_json``).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from scipy.special import logsumexp
from scipy.stats import hmean, ks_2samp

from ..data.templates import TEMPLATES
from ..jsonfile import read_json
from .open_unlearning_retain import check_questions, is_open_unlearning, retain_log_from_open_unlearning

FILES = {
    "eval_log.json": "Retain",
    "eval_real_author_wo_options.json": "Real Authors",
    "eval_real_world_wo_options.json": "Real World",
    "eval_log_forget.json": "Forget",
}
UTILITY_FILES = ("eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json")
METRICS = ("ROUGE", "Prob.", "Truth Ratio")
TRUTH_RATIO_AGGS = ("geometric", "arithmetic")
SPLIT_ROWS = "forget01 has 40 rows, forget05 200, forget10 400, each cut to the eval size, TOFU's 300"


def _number_problem(v) -> Optional[str]:
    """What is wrong with a per-sample value (a finite number, or a non-empty list of them), or None."""
    if isinstance(v, (list, tuple)):
        if not v:
            return "an empty list"
        return next((p for p in map(_number_problem, v) if p), None)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{v!r}, not a number"
    if not math.isfinite(v):
        return f"{v}, not a finite number"
    return None


def _values(log: Mapping, key: str, fname: str, ref_keys=None) -> np.ndarray:
    if key not in log:
        raise ValueError(f"{fname}: the log has no {key!r} entry (keys: {sorted(log)})")
    entry = log[key]
    if not isinstance(entry, Mapping) or len(entry) == 0:
        raise ValueError(f"{fname}: {key!r} must be a non-empty mapping from sample index to value")
    if ref_keys is not None and list(entry.keys()) != ref_keys:
        raise ValueError(f"{fname}: {key!r} covers samples {len(entry)} that differ from the log's other "
                         f"entries ({len(ref_keys)}); the log is inconsistent")
    for i, v in entry.items():  # a null, NaN or string would become a NaN metric
        problem = _number_problem(v)
        if problem:
            raise ValueError(f"{fname}: {key!r} of sample {i!r} is {problem}: the evaluation that wrote this log "
                             "failed (non-finite model outputs?) or the file was edited; re-evaluate the model")
    vals = list(entry.values())
    if isinstance(vals[0], (list, tuple)):
        lens = {len(v) if isinstance(v, (list, tuple)) else 1 for v in vals}
        if len(lens) != 1:
            raise ValueError(f"{fname}: {key!r} has per-sample lists of different lengths {sorted(lens)}")
    return np.asarray(vals, dtype=np.float64)


def _ratio_losses(log: Mapping, fname: str):
    """(avg paraphrased loss per sample, avg perturbed losses per sample × perturbed answer)."""
    para = log.get("avg_paraphrased_loss")
    keys = list(para.keys()) if isinstance(para, Mapping) else None
    para = _values(log, "avg_paraphrased_loss", fname)
    pert = _values(log, "average_perturb_loss", fname, keys)
    return para, (pert[:, None] if pert.ndim == 1 else pert)  # 1-D: a single perturbed answer per sample


def log_truth_ratio(log: Mapping, fname: str = "log") -> np.ndarray:
    """log r per sample, r = exp(mean avg perturbed loss − avg paraphrased loss) TOFU's aggregate
    statistic. Kept in log space: r over- or underflows for the large losses unlearning gives."""
    para, pert = _ratio_losses(log, fname)
    return pert.mean(axis=-1) - para


def check_truth_ratio(truth_ratio: str) -> None:
    if truth_ratio not in TRUTH_RATIO_AGGS:
        raise ValueError(f"unknown truth-ratio aggregation {truth_ratio!r}; valid: {', '.join(TRUTH_RATIO_AGGS)}")


def log_perturbed_ratio(log: Mapping, fname: str = "log", truth_ratio: str = "geometric") -> np.ndarray:
    """log q per sample: the perturbed answers' probability over the paraphrased answer's, the
    perturbed probabilities averaged geometrically (q = 1/r, :func:`log_truth_ratio`) or
    arithmetically (TOFU's ``get_model_utility``), in log space."""
    check_truth_ratio(truth_ratio)
    if truth_ratio == "geometric":
        return -log_truth_ratio(log, fname)
    para, pert = _ratio_losses(log, fname)
    return logsumexp(-pert, axis=-1) - math.log(pert.shape[-1]) + para


def file_metrics(log: Mapping, fname: str, truth_ratio: str = "geometric") -> Dict[str, float]:
    """The three sub-metrics of one TOFU log file (``truth_ratio``: the module docstring)."""
    if fname not in FILES:
        raise ValueError(f"unknown TOFU log file {fname!r}; valid: {', '.join(FILES)}")
    name = FILES[fname]
    gt_entry = log.get("avg_gt_loss")
    keys = list(gt_entry.keys()) if isinstance(gt_entry, Mapping) else None
    gt = _values(log, "avg_gt_loss", fname)
    if "eval_log" in fname:
        prob = float(np.mean(np.exp(-gt)))
    else:
        pert = _values(log, "average_perturb_loss", fname, keys)
        if pert.ndim == 1:
            pert = pert[:, None]
        # p_true / (p_true + Σ p_perturbed), p = exp(−avg loss), as a softmax: no 0/0 when every p underflows
        neg = -np.concatenate([gt[:, None], pert], axis=1)
        prob = float(np.mean(np.exp(neg[:, 0] - logsumexp(neg, axis=1))))
    rouge = float(_values(log, "rougeL_recall", fname, keys).mean())
    _values(log, "avg_paraphrased_loss", fname, keys)  # same samples as the rest
    lq = log_perturbed_ratio(log, fname, truth_ratio)
    if name == "Forget":
        tr = float(np.mean(np.exp(-np.abs(lq))))  # min(q, 1/q)
    else:
        tr = float(np.mean(-np.expm1(np.minimum(lq, 0))))  # max(0, 1 − q)
    return {f"ROUGE {name}": rouge, f"Prob. {name}": prob, f"Truth Ratio {name}": tr}


def _norm(s: str) -> str:
    return "".join(str(s).split())  # decoding may move spaces around punctuation


# the templates' answer markers as _norm leaves them: what a cut answer can start with (rouge_references)
_ANSWER_MARKERS = tuple(sorted({_norm(t.answer_start or t.question_end) for t in TEMPLATES.values()} - {""}))


def _ground_truths(log: Mapping) -> Optional[List[str]]:
    """The ground-truth answers of a log's ``generated_text`` ([prompt, generation, truth]), if any."""
    gen = log.get("generated_text")
    if not isinstance(gen, Mapping) or not all(isinstance(x, (list, tuple)) and x for x in gen.values()):
        return None
    return [str(x[-1]) for x in gen.values()]


def _is_cut_of(stored: str, answer: str) -> bool:
    """Whether a log's stored ground truth is ``answer`` or TOFU's cut of it: the answer tokens kept
    within max_length, decoded (a prefix of the answer; where the tokenizer does not give the
    template's answer marker back, the decoded text still starts with that marker)."""
    s, a = _norm(stored), _norm(answer)
    if a.startswith(s):
        return True
    lead = next((m for m in _ANSWER_MARKERS if s.startswith(m)), None)
    return lead is not None and a.startswith(s[len(lead):])


def check_retain_log(retain_forget_log: Mapping, n: int, answers: Optional[Sequence[str]] = None,
                     name: str = "the retain model's eval_log_forget.json", *,
                     stored: Optional[Sequence[str]] = None, questions: Optional[Sequence[str]] = None) -> None:
    """Refuse a retain model's forget log that does not cover the same forget rows as this
    evaluation of ``n`` samples: another forget split, eval size or evaluation length, each named.

    ``answers``: this evaluation's raw ground truths (when known); the log's stored ones may be a cut
    of them (TOFU stores the answer as decoded from the tokens within max_length). ``stored``: what
    this evaluation's own log stores, when known: then the cuts must be the same (a log made at another
    length has other truth ratios for the rows that do not fit). ``questions``: this evaluation's forget
    questions, which a log read from open-unlearning's file must hold in its prompts (when it has them)."""
    n_retain = len(log_truth_ratio(retain_forget_log, name))
    if questions is not None:
        check_questions(retain_forget_log, questions, name)
    theirs = _ground_truths(retain_forget_log)
    sizes = (f"; the sizes differ too ({n_retain} samples there, {n} here)" if n_retain != n else "")
    compared = theirs is not None and (answers is not None or stored is not None)
    if compared:
        common = range(min(n, n_retain, len(theirs)))
        ours = answers if answers is not None else stored
        other = [i for i in common if not (_is_cut_of(theirs[i], ours[i]) or _is_cut_of(ours[i], theirs[i]))]
        if other:
            raise ValueError(f"{name} has other ground-truth answers (samples {other[:5]}): it was made on another "
                             f"forget set (another forget split: {SPLIT_ROWS}){sizes}; use the retain log of this "
                             "split")
        if stored is not None:
            cut = [i for i in common if _norm(theirs[i]) != _norm(stored[i])]
            if cut:
                raise ValueError(f"{name} stores samples {cut[:5]} cut at another length than this evaluation "
                                 "(the answers are the same, truncated differently): it was evaluated with another "
                                 "max length (TOFU's max_length, --eval-max-length, --max-length), which changes "
                                 f"those rows' truth ratios{sizes}; remake the retain log at this evaluation's "
                                 "length")
    if n_retain == n:
        return
    if compared:
        raise ValueError(f"{name} has {n_retain} samples but this forget evaluation {n}: the same forget split "
                         f"evaluated with another eval size; evaluate with ds_size (--eval-size, --ds-size) "
                         f"{n_retain} to match it, or remake the retain log with {n}")
    raise ValueError(f"{name} has {n_retain} samples but this forget log has {n}: the sizes differ. Either the "
                     f"eval size (ds_size, --eval-size, --ds-size) differs: evaluate with {n_retain} to match it "
                     f"(or remake the retain log with {n}); or it comes from another forget split ({SPLIT_ROWS})")


def forget_quality(forget_log: Mapping, retain_forget_log: Mapping) -> Dict[str, Optional[float]]:
    """KS-test p-value between the forget truth ratios of the model and of a retain-only model
    (on log r: the test only ranks the values). ``log Forget Quality`` is None when the p-value
    underflows to 0."""
    a = log_truth_ratio(forget_log, "eval_log_forget.json")
    check_retain_log(retain_forget_log, len(a), stored=_ground_truths(forget_log))
    res = ks_2samp(a, log_truth_ratio(retain_forget_log, "the retain model's eval_log_forget.json"))
    p = float(res.pvalue)
    if p == 0:
        warnings.warn("Forget Quality is 0 (the KS p-value underflows): log Forget Quality is undefined "
                      "and reported as None (null in JSON)", stacklevel=2)
    return {"Forget Quality": p, "log Forget Quality": math.log(p) if p > 0 else None,
            "KS Test PVal Forget": p, "KS Test Forget": float(res.statistic)}


def aggregate(logs: Mapping[str, Mapping], retain_forget_log: Optional[Mapping] = None, *,
              require_all: bool = True, truth_ratio: str = "geometric") -> Dict[str, Optional[float]]:
    """Aggregate TOFU logs ``{file name: per-sample log}``; ``truth_ratio`` ``geometric``
    (``aggregate_eval_stat.py``) or ``arithmetic`` (``utils.get_model_utility``), module docstring.

    ``require_all=True`` (TOFU's setting) needs all four files. With ``require_all=False`` the
    sub-metrics of the files present are reported and ``Model Utility`` only when the three
    non-forget files are all there (never a harmonic mean of fewer numbers).
    """
    check_truth_ratio(truth_ratio)
    unknown = [f for f in logs if f not in FILES]
    if unknown:
        raise ValueError(f"unknown TOFU log files {unknown}; valid: {', '.join(FILES)}")
    missing = [f for f in FILES if f not in logs]
    if require_all and missing:
        raise ValueError(f"missing TOFU log files {missing}")
    out: Dict[str, Optional[float]] = {}
    for fname in FILES:
        if fname in logs:
            out.update(file_metrics(logs[fname], fname, truth_ratio))
    if all(f in logs for f in UTILITY_FILES):
        out["Model Utility"] = float(hmean([out[f"{m} {FILES[f]}"] for f in UTILITY_FILES for m in METRICS]))
    if retain_forget_log is not None:
        if "eval_log_forget.json" not in logs:
            raise ValueError("Forget Quality needs eval_log_forget.json among the logs")
        out.update(forget_quality(logs["eval_log_forget.json"], retain_forget_log))
    return out


def _read_log(path: Path) -> dict:
    """A JSON object from a log file (read_json names a torn or empty file)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a TOFU log is a JSON object, this file holds a {type(data).__name__}")
    return data


def load_logs(path: Union[str, Path]) -> Dict[str, dict]:
    """TOFU logs from a folder holding the four files, or from ``eval_log_aggregated.json``
    (one JSON nesting them under their file names)."""
    p = Path(path)
    if p.is_dir():
        logs = {f: _read_log(p / f) for f in FILES if (p / f).is_file()}
        if not logs:
            agg = p / "eval_log_aggregated.json"
            if agg.is_file():
                return load_logs(agg)
            raise FileNotFoundError(f"{p} holds none of the TOFU log files {list(FILES)}")
        return logs
    if not p.is_file():
        raise FileNotFoundError(f"no such log file or folder: {p}")
    data = _read_log(p)
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
    bad = [k for k, v in nested.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(f"{p}: the entries {bad} are not per-sample logs (JSON objects)")
    return nested


def load_retain_log(retain) -> dict:
    """A retain-only model's ``eval_log_forget.json`` content, from a dict, a file, an
    ``eval_log_aggregated.json``, a folder of logs, or open-unlearning's ``TOFU_EVAL.json`` (file,
    dict, or a folder holding it and no TOFU log), converted (:mod:`.open_unlearning_retain`)."""
    if isinstance(retain, Mapping):
        if is_open_unlearning(retain):
            return retain_log_from_open_unlearning(retain)
        return dict(retain["eval_log_forget.json"]) if "eval_log_forget.json" in retain else dict(retain)
    p = Path(retain)
    if p.is_file():
        data = _read_log(p)
        if "avg_gt_loss" in data:  # a bare forget log, whatever its file name
            return data
        if is_open_unlearning(data):
            return retain_log_from_open_unlearning(data, str(p))
    if p.is_dir() and not any((p / f).is_file() for f in FILES) and (p / "TOFU_EVAL.json").is_file():
        return load_retain_log(p / "TOFU_EVAL.json")
    logs = load_logs(p)
    if "eval_log_forget.json" not in logs:
        raise ValueError(f"{p} has no eval_log_forget.json for Forget Quality")
    return logs["eval_log_forget.json"]


def format_table(metrics: Mapping[str, Optional[float]]) -> str:
    w = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{w}}  {'undefined' if v is None else format(v, '.6g')}" for k, v in metrics.items())
