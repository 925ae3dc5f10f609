"""A retain model's open-unlearning evaluation (its TOFU evaluator's ``TOFU_EVAL.json``) as the
reference of Forget Quality and PrivLeak (docs/design.md §5).

open-unlearning writes, per metric, ``{"agg_value": x, "value_by_index": {"0": {...}, ...}}``;
its ``forget_quality`` is the KS test between the model's and the retain model's
``forget_truth_ratio`` scores q = exp(−mean avg perturbed loss) / exp(−avg paraphrased loss)
(the retain file's ``value_by_index``), its ``privleak`` reads the retain file's ``mia_min_k``
``agg_value``. :func:`retain_log_from_open_unlearning` turns such a file into the
``eval_log_forget.json`` content our :func:`~.aggregate.forget_quality` reads:

* with ``forget_Q_A_PARA_Prob`` and ``forget_Q_A_PERT_Prob`` (their ``avg_loss`` per index), the
  losses themselves: the truth ratios are TOFU's, exactly;
* else from ``forget_truth_ratio``'s scores: avg paraphrased loss 0 and one perturbed loss
  −log q, whose truth ratio is q's (the KS test only ranks the values); a score that is not a
  positive finite number is refused;
* ``forget_Q_A_ROUGE``'s ``input`` / ``generation`` / ``ground_truth`` (when there) become
  ``generated_text``, so the rows are checked against the forget rows evaluated (their count,
  answers and questions: :func:`~.aggregate.check_retain_log`).

Indices must be ``"0"`` … ``"n-1"``: the first n rows of the forget split, as ours.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from ..jsonfile import read_json

OU_KEY = "open_unlearning"  # where a converted log keeps what only the open-unlearning file had
PARA, PERT, TRUTH, ROUGE, MIA = ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget_truth_ratio",
                                 "forget_Q_A_ROUGE", "mia_min_k")


def is_open_unlearning(data) -> bool:
    """Whether a JSON object is an open-unlearning evaluation file with what Forget Quality needs."""
    return isinstance(data, Mapping) and any(isinstance(data.get(k), Mapping) and "value_by_index" in data[k]
                                             for k in (PARA, TRUTH))


def _by_index(data: Mapping, metric: str, name: str) -> List[dict]:
    """A metric's per-index entries in index order; the indices must be "0" ... "n-1"."""
    entry = data[metric]
    vbi = entry.get("value_by_index") if isinstance(entry, Mapping) else None
    if not isinstance(vbi, Mapping) or not vbi:
        raise ValueError(f"{name}: {metric!r} has no value_by_index (open-unlearning's per-sample results)")
    keys = list(vbi)
    if sorted(keys, key=lambda k: int(k) if str(k).isdigit() else -1) != [str(i) for i in range(len(keys))]:
        raise ValueError(f"{name}: {metric!r} covers indices {sorted(keys)[:5]}..., not 0 ... {len(keys) - 1}: "
                         "it was evaluated on other rows than the first rows of the forget split")
    rows = [vbi[str(i)] for i in range(len(keys))]
    bad = [i for i, r in enumerate(rows) if not isinstance(r, Mapping)]
    if bad:
        raise ValueError(f"{name}: {metric!r} has no result for indices {bad[:5]} (null entries)")
    return rows


def _number(v, name: str, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name}: {where} is {v!r}, not a finite number; re-evaluate the retain model")
    return float(v)


def _losses(data: Mapping, name: str):
    """(avg paraphrased loss, avg perturbed losses) per index, from the losses or the scores."""
    if PARA in data and PERT in data:
        para, pert = _by_index(data, PARA, name), _by_index(data, PERT, name)
        if len(para) != len(pert):
            raise ValueError(f"{name}: {PARA} has {len(para)} indices and {PERT} {len(pert)}: an inconsistent file")
        p = [_number(r.get("avg_loss"), name, f"{PARA} avg_loss of index {i}") for i, r in enumerate(para)]
        q = []
        for i, r in enumerate(pert):
            losses = r.get("avg_loss")
            losses = losses if isinstance(losses, list) else [losses]
            q.append([_number(v, name, f"{PERT} avg_loss of index {i}") for v in losses])
        return p, q, "forget_Q_A_PARA_Prob / forget_Q_A_PERT_Prob avg_loss"
    scores = []
    for i, r in enumerate(_by_index(data, TRUTH, name)):
        s = r.get("score")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"{name}: {TRUTH} score of index {i} is {s!r}, not a positive finite number: its "
                             f"truth ratio is unknown; pass a file with {PARA} and {PERT} (their losses)")
        scores.append(float(s))
    return [0.0] * len(scores), [[-math.log(s)] for s in scores], "forget_truth_ratio scores"


def retain_log_from_open_unlearning(data: Mapping, name: str = "the open-unlearning retain log") -> dict:
    """Our ``eval_log_forget.json`` form of a retain model's open-unlearning ``TOFU_EVAL.json``
    (module docstring); its ``mia_min_k`` AUC, when there, under ``open_unlearning``."""
    if not is_open_unlearning(data):
        raise ValueError(f"{name} is not an open-unlearning evaluation with {TRUTH} or {PARA}/{PERT} "
                         f"(top-level keys {sorted(data)[:6]})")
    para, pert, source = _losses(data, name)
    log = {"avg_paraphrased_loss": {str(i): v for i, v in enumerate(para)},
           "average_perturb_loss": {str(i): v for i, v in enumerate(pert)}}
    if ROUGE in data:
        rows = _by_index(data, ROUGE, name)
        if len(rows) != len(para):
            raise ValueError(f"{name}: {ROUGE} has {len(rows)} indices and the truth ratios {len(para)}: an "
                             "inconsistent file")
        if all(isinstance(r.get("ground_truth"), str) for r in rows):
            log["generated_text"] = {str(i): [str(r.get("input", "")), str(r.get("generation", "")),
                                              r["ground_truth"]] for i, r in enumerate(rows)}
    meta: Dict[str, object] = {"truth_ratio_from": source}
    ref = privleak_reference(data, name)
    if ref is not None:
        meta[MIA] = ref
    log[OU_KEY] = meta
    return log


def privleak_reference(log: Union[Mapping, str, Path], name: str = "the retain log") -> Optional[float]:
    """The retain model's Min-K% AUC (open-unlearning's ``mia_min_k`` ``agg_value``), PrivLeak's
    reference, from an open-unlearning file (a path, or a folder holding ``TOFU_EVAL.json``), its
    content, or its converted log; None when it has none (a TOFU log never has)."""
    if isinstance(log, (str, Path)):
        path = Path(log) / "TOFU_EVAL.json" if Path(log).is_dir() else Path(log)
        if not path.is_file():
            return None
        name, log = str(path), read_json(path)
        if not isinstance(log, Mapping):
            return None
    if isinstance(log.get(OU_KEY), Mapping):
        return log[OU_KEY].get(MIA)
    entry = log.get(MIA)
    if not isinstance(entry, Mapping) or entry.get("agg_value") is None:
        return None
    auc = _number(entry["agg_value"], name, f"{MIA} agg_value")
    if not 0 <= auc <= 1:
        raise ValueError(f"{name}: {MIA} agg_value is {auc}, not an AUC in [0, 1]")
    return auc


def check_questions(retain_log: Mapping, questions, name: str) -> None:
    """Refuse a converted open-unlearning log whose prompts (``forget_Q_A_ROUGE``'s inputs) do not
    hold this evaluation's forget questions, row by row (whitespace aside)."""
    gen = retain_log.get("generated_text")
    if OU_KEY not in retain_log or not isinstance(gen, Mapping):
        return
    prompts = [str(v[0]) for v in gen.values()]
    other = [i for i, (p, q) in enumerate(zip(prompts, questions))
             if p.strip() and "".join(q.split()) not in "".join(p.split())]
    if other:
        raise ValueError(f"{name}: the inputs of indices {other[:5]} do not hold this evaluation's forget questions "
                         f"(e.g. {questions[other[0]][:60]!r}): it was evaluated on other rows; use the retain "
                         "log of this forget split")
