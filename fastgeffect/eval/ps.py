"""PS-exact / PS-perturb ("Unlearning with Control", UWC); extraction strength is re-exported here.

PS comes under three protocols (``ps_scores(protocol=...)``, docs/design.md "PS protocols"):
``paper`` and ``uwc-linear`` reproduce the public code behind the paper's Table 1 and UWC's
scripts (eval/ps_protocols.py: their prompt, budget, matching and search; eval/ps_samples.py:
their rows); ``clean`` is fastgeffect's own (eval/ps_clean.py): the model's training template,
whitespace-normalised words, and a reproduction check that cannot be satisfied by stopping early.

``clean`` PS of a sample: the answer is split into words w_1..w_n; m is the smallest number of leading
words such that greedy decoding from ``prompt + answer_start + w_1..w_m`` reproduces the rest of
the answer exactly (the continuation's first line, compared word by word, must equal
w_{m+1}..w_n), with m = n when no prefix works; PS = 1 − m/n (1: the question alone suffices,
0: never). This is UWC's definition (``phi_exact.py``: word prefixes, continuation cut at the
first newline, ``(k+1)/n`` summed and subtracted from 1) with m found by binary search
(docs/design.md §5), batched so that the whole set advances one search step at a time.
``search="linear"`` scans m = 0, 1, ... as UWC's script does (identical when reproduction is
monotone in m). PS-exact uses ``question``, PS-perturb ``paraphrased_question``.

Every protocol has two methods with the same m and score on every row (docs/design.md §5.2):
``"search"`` generates at every search step (the reference), ``"teacher-forced"`` (the default)
reads greedy decoding off one teacher-forced pass per row and generates only the probes that pass
cannot decide (eval/ps_teacher_forced.py, eval/ps_fast_clean.py, eval/ps_fast_protocols.py).

Extraction strength lives in eval/memorization.py (re-exported here).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..data.templates import Template
from .memorization import extraction_strength  # noqa: F401  (re-exported: its old home)
from .ps_clean import SEARCHES, clean_ps_search
from .ps_fast_clean import clean_ps_fast
from .ps_fast_protocols import paper_ps_fast, uwc_linear_ps_fast
from .ps_protocols import PS_PROTOCOLS, paper_ps_scores, uwc_linear_ps_scores
from .ps_teacher_forced import default_margin, fast_path_blockers

PS_METHODS = ("teacher-forced", "search")  # the fast path (ps_fast_*.py) and the reference search


@torch.no_grad()
def ps_scores(model, tokenizer, template: Template, records: Sequence[dict], *, protocol: str = "clean",
              family: str = "phi", question_key: str = "question", answer_key: str = "answer",
              search: str = "binary", batch_size: int = 32, method: str = "teacher-forced",
              margin: Optional[float] = None) -> Dict[str, object]:
    """PS of every record under ``protocol``: ``{"ps": mean, "scores": per sample, ...}``.

    ``clean`` also gives ``"prefix_words": m, "num_words": n, "generate_calls"`` (generation
    calls); ``template``, ``search`` and ``batch_size`` serve it only: ``paper`` and ``uwc-linear``
    fix their own prompt and batching (padding changes outputs), ``family`` (phi, llama2) picks
    uwc-linear's string rules.

    ``method="teacher-forced"`` (the default) reads greedy decoding off one teacher-forced pass per
    row and generates only where that cannot decide; ``"search"`` generates at every search step
    (the reference). Both give the same m and score on every row (docs/design.md §5.2); a model
    whose ``generation_config`` makes greedy decoding differ from the argmax always takes the
    reference. ``margin``: the top-1 - top-2 logit gap from which a teacher-forced token is
    trusted (default: ``MARGINS`` of the model's dtype, eval/ps_teacher_forced.py)."""
    if protocol not in PS_PROTOCOLS:
        raise ValueError(f"unknown PS protocol {protocol!r}; valid: {', '.join(PS_PROTOCOLS)}")
    if search not in SEARCHES:
        raise ValueError(f"search must be 'binary' or 'linear', got {search!r}")
    if method not in PS_METHODS:
        raise ValueError(f"unknown PS method {method!r}; valid: {', '.join(PS_METHODS)}")
    if margin is not None and not margin >= 0:
        raise ValueError(f"margin must be a logit gap >= 0, got {margin!r}")
    fast = method == "teacher-forced" and not fast_path_blockers(model)
    was_training = model.training
    model.eval()
    try:
        margin = default_margin(model) if margin is None else margin
        if protocol == "paper":
            if fast:
                return paper_ps_fast(model, tokenizer, records, question_key=question_key, answer_key=answer_key,
                                     margin=margin)
            return paper_ps_scores(model, tokenizer, records, question_key=question_key, answer_key=answer_key)
        if protocol == "uwc-linear":
            kw = dict(family=family, question_key=question_key, answer_key=answer_key)
            if fast:
                return uwc_linear_ps_fast(model, tokenizer, records, margin=margin, batch_size=batch_size, **kw)
            return uwc_linear_ps_scores(model, tokenizer, records, **kw)
        if fast:
            return clean_ps_fast(model, tokenizer, template, records, question_key, answer_key, search, batch_size,
                                 margin)
        return clean_ps_search(model, tokenizer, template, records, question_key, answer_key, search, batch_size)
    finally:
        model.train(was_training)


def ps_report(model, tokenizer, template: Template, sets: Dict[str, Sequence[dict]], *,
              perturb_sets: Optional[Dict[str, Sequence[dict]]] = None, protocol: str = "clean",
              family: str = "phi", batch_size: int = 32, search: str = "binary",
              method: str = "teacher-forced", known: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """PS-exact of each named set and PS-perturb (when its records have ``paraphrased_question``)
    of the same set or of ``perturb_sets[name]`` (protocols that sample them apart, ps_samples.py),
    e.g. ``{"retain": [...], "forget": [...]}`` → ``{"PS-exact retain": ..., ...}``. ``known``: metrics
    already computed on these rows (e.g. UWC's search at the chosen α), taken as they are."""
    return {k: row["ps"] for k, row in ps_report_rows(model, tokenizer, template, sets, perturb_sets=perturb_sets,
                                                       protocol=protocol, family=family, batch_size=batch_size,
                                                       search=search, method=method, known=known).items()}


def ps_report_rows(model, tokenizer, template: Template, sets: Dict[str, Sequence[dict]], *,
                   perturb_sets: Optional[Dict[str, Sequence[dict]]] = None, protocol: str = "clean",
                   family: str = "phi", batch_size: int = 32, search: str = "binary",
                   method: str = "teacher-forced", known: Optional[Dict[str, float]] = None
                   ) -> Dict[str, Dict[str, object]]:
    """:func:`ps_report` with each metric's rows: ``{"PS-exact retain": {"ps": mean, "scores": per row,
    "prefix_words": m, "num_words": n}, ...}`` in row order (m and n where the protocol gives them:
    ``clean``'s ``prefix_words``, uwc-linear's ``given_words``), so that a study can resample the rows.
    A metric in ``known`` is not computed: its entry holds only ``{"ps": known value}``."""
    perturb_sets = sets if perturb_sets is None else perturb_sets
    known = known or {}
    kw = dict(protocol=protocol, family=family, batch_size=batch_size, search=search, method=method)

    def score(key, recs, **extra):
        return {"ps": known[key]} if key in known else _rows(ps_scores(model, tokenizer, template, recs, **extra, **kw))
    out = {}
    for name, recs in sets.items():
        out[f"PS-exact {name}"] = score(f"PS-exact {name}", recs)
        perturb = perturb_sets.get(name)
        if perturb and all("paraphrased_question" in r for r in perturb):
            out[f"PS-perturb {name}"] = score(f"PS-perturb {name}", perturb, question_key="paraphrased_question")
    return out


ROW_KEYS = ("prefix_words", "given_words", "num_words")  # the per-row m and n a protocol's result may hold


def _rows(res: Dict[str, object]) -> Dict[str, object]:
    return {"ps": res["ps"], "scores": list(res["scores"]), **{k: list(res[k]) for k in ROW_KEYS if k in res}}
