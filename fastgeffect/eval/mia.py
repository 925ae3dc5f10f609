"""Membership inference (docs/design.md §5.4): open-unlearning's six attacks, by its metric names,
each an AUC between forget rows (members) and holdout rows (non-members).

Label convention (open-unlearning's ``mia_auc``): forget rows are labelled 0, holdout rows 1, and
every score is signed like a loss (higher = less likely a member), so the AUC is
P(holdout score > forget score) + ½ P(tie): near 1 when the forget rows are much more likely
than the holdout rows, 0.5 when the attack cannot tell them apart.

* ``mia_loss``: the mean answer NLL (EOS included).
* ``mia_zlib``: that loss over the zlib-compressed byte length of the answer text.
* ``mia_min_k``: −mean of the k-fraction lowest answer-token log-probs (EOS excluded).
* ``mia_min_k_plus_plus``: the same over (log p − μ)/σ, μ and σ² the mean and variance of log p
  under the model's own next-token distribution (σ² clamped at 1e-6).
* ``mia_reference``: the mean answer NLL minus the reference model's (the retain twin, say).
* ``mia_gradnorm``: the mean over parameter tensors of the p-norm of the row's gradient of its
  mean answer NLL (EOS excluded); p = 2 from ghost norms (:mod:`.gradnorm`).
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..data.templates import IGNORE_INDEX, Template
from ._common import model_device
from .gradnorm import check_p, per_sample_grad_norms
from .mia_scores import Encoded, min_k_score, shifted_logprobs, token_statistics, zlib_score

ATTACKS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference", "mia_gradnorm")
DEFAULT_K = 0.4  # open-unlearning's TOFU configs (min_k, min_k_plus_plus)
DEFAULT_P = 2
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LENGTH = 200


def attack_name(attack: str) -> str:
    """The metric name of an attack: ``mia_min_k`` or its short form ``min_k``."""
    name = attack if isinstance(attack, str) and attack.startswith("mia_") else f"mia_{attack}"
    if name not in ATTACKS:
        raise ValueError(f"unknown membership-inference attack {attack!r}; choose from {', '.join(ATTACKS)} "
                         "(or the same without 'mia_')")
    return name


def check_k(k) -> float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < k <= 1:
        raise ValueError(f"k (the Min-K% fraction of tokens) must be in (0, 1], got {k!r}")
    return float(k)


def vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_models(model, tokenizer, reference_model) -> None:
    """The tokenizer's ids fit the model, and a reference model shares the model's vocabulary."""
    v = vocab_size(model)
    if len(tokenizer) > v:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {v}: "
                         "they do not belong together")
    if reference_model is not None and vocab_size(reference_model) != v:
        raise ValueError(f"the reference model's vocabulary has {vocab_size(reference_model)} tokens but the "
                         f"model's has {v}: the reference must use the same tokenizer")


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Binary ROC AUC: scikit-learn's ``roc_auc_score`` (the Mann–Whitney U of the positives, label
    1, over n_pos·n_neg, ties counting ½), after checking the scores are finite and both labels occur."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} membership scores are not finite (NaN/inf)")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the AUC needs both forget and holdout rows")
    return float(roc_auc_score(y, s))


def _gradnorm_scores(model, enc: Encoded, p: float, batch_size: int) -> Dict[str, object]:
    """Per row: the mean over parameter tensors of its gradient's p-norm (model left in its mode,
    ``.grad`` untouched)."""
    device = model_device(model)
    scores, fallback = [0.0] * len(enc), set()
    for chunk, x, att, y in enc.batches(batch_size):
        x, att, y = x.to(device), att.to(device), y.to(device)
        scored = torch.zeros_like(y[:, 1:], dtype=torch.bool)
        for r in range(len(chunk)):
            pos = (y[r] != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]  # EOS label dropped (Min-K%'s tokens)
            scored[r, pos - 1] = True
        empty = [chunk[r] for r in range(len(chunk)) if not bool(scored[r].any())]
        if empty:
            raise ValueError(f"rows {empty[:5]} have no answer token before EOS: GradNorm's mean loss is undefined")

        def losses():
            lp = shifted_logprobs(model(input_ids=x, attention_mask=att).logits)
            tok = lp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
            return -(tok * scored).sum(-1) / scored.sum(-1)

        out = per_sample_grad_norms(model, losses, p=p)
        fallback.update(out["fallback"])
        mean = out["norms"].mean(0)
        for r, i in enumerate(chunk):
            scores[i] = float(mean[r])
    return {"scores": scores, "fallback": sorted(fallback)}


def _set_scores(name: str, model, enc: Encoded, *, k: float, p: float, reference_model, batch_size: int,
                stats: Optional[dict] = None) -> Dict[str, object]:
    """One set's per-row scores for attack ``name`` (``stats``: this set's token statistics, reused)."""
    if name == "mia_gradnorm":
        return _gradnorm_scores(model, enc, p, batch_size)
    if stats is None or (name == "mia_min_k_plus_plus" and "mink_pp" not in stats):
        stats = token_statistics(model, enc, batch_size=batch_size, vocab_moments=name == "mia_min_k_plus_plus")
    if name == "mia_loss":
        return {"scores": list(stats["avg_loss"])}
    if name == "mia_zlib":
        return {"scores": [zlib_score(a, t) for a, t in zip(stats["avg_loss"], enc.texts)]}
    if name == "mia_min_k":
        return {"scores": [min_k_score(v, k) for v in stats["token_lp"]]}
    if name == "mia_min_k_plus_plus":
        return {"scores": [min_k_score(v, k) for v in stats["mink_pp"]]}
    ref = token_statistics(reference_model, enc, batch_size=batch_size, vocab_moments=False)["avg_loss"]
    return {"scores": [a - b for a, b in zip(stats["avg_loss"], ref)]}


def _prepare(model, tokenizer, template, forget_records, holdout_records, names, k, p, reference_model,
             batch_size, max_length):
    """Every check before any model work; the two encoded sets."""
    names = [attack_name(a) for a in names]
    check_k(k)
    p = check_p(p)
    if "mia_reference" in names and reference_model is None:
        raise ValueError("mia_reference needs a reference model (the retain twin): pass reference_model=")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_models(model, tokenizer, reference_model)
    forget = Encoded(tokenizer, template, forget_records, max_length, "membership inference, forget rows")
    holdout = Encoded(tokenizer, template, holdout_records, max_length, "membership inference, holdout rows")
    return names, p, forget, holdout


def mia_auc(model, tokenizer, template: Template, forget_records: Sequence[dict], holdout_records: Sequence[dict],
            *, attack: str, k: float = DEFAULT_K, p=DEFAULT_P, reference_model=None,
            batch_size: int = DEFAULT_BATCH_SIZE, max_length: int = DEFAULT_MAX_LENGTH) -> Dict[str, object]:
    """One attack's AUC: ``{"attack", "auc", "forget_scores", "holdout_scores"}`` (scores per row
    in record order; ``mia_gradnorm`` adds ``"gradnorm_fallback"``, the parameters computed by one
    backward per sample)."""
    names, p, forget, holdout = _prepare(model, tokenizer, template, forget_records, holdout_records, [attack], k,
                                         p, reference_model, batch_size, max_length)
    return _auc(names[0], model, forget, holdout, k=k, p=p, reference_model=reference_model, batch_size=batch_size)


def _auc(name, model, forget, holdout, *, k, p, reference_model, batch_size, stats=(None, None)):
    kw = dict(k=k, p=p, reference_model=reference_model, batch_size=batch_size)
    f = _set_scores(name, model, forget, stats=stats[0], **kw)
    h = _set_scores(name, model, holdout, stats=stats[1], **kw)
    out = {"attack": name, "auc": roc_auc([0] * len(forget) + [1] * len(holdout), f["scores"] + h["scores"]),
           "forget_scores": f["scores"], "holdout_scores": h["scores"]}
    if name == "mia_gradnorm":
        out["gradnorm_fallback"] = sorted(set(f["fallback"]) | set(h["fallback"]))
    return out


def mia_report(model, tokenizer, template: Template, forget_records: Sequence[dict],
               holdout_records: Sequence[dict], *, attacks: Optional[Sequence[str]] = None, reference_model=None,
               k: float = DEFAULT_K, p=DEFAULT_P, batch_size: int = DEFAULT_BATCH_SIZE,
               max_length: int = DEFAULT_MAX_LENGTH) -> Dict[str, object]:
    """Several attacks (default: all six, ``mia_reference`` only when a reference model is given):
    ``{metric name: AUC, ..., "per_sample": {metric name: {"forget_scores": [...],
    "holdout_scores": [...]}}}``. The token statistics are computed once per set and shared."""
    if attacks is None:
        attacks = [a for a in ATTACKS if a != "mia_reference" or reference_model is not None]
    names, p, forget, holdout = _prepare(model, tokenizer, template, forget_records, holdout_records, attacks, k,
                                         p, reference_model, batch_size, max_length)
    moments = "mia_min_k_plus_plus" in names
    need = any(n not in ("mia_gradnorm",) for n in names)
    stats = tuple(token_statistics(model, e, batch_size=batch_size, vocab_moments=moments) if need else None
                  for e in (forget, holdout))
    report: Dict[str, object] = {}
    per_sample: Dict[str, dict] = {}
    for name in dict.fromkeys(names):
        out = _auc(name, model, forget, holdout, k=k, p=p, reference_model=reference_model, batch_size=batch_size,
                   stats=stats)
        report[name] = out["auc"]
        per_sample[name] = {key: v for key, v in out.items() if key not in ("attack", "auc")}
    report["per_sample"] = per_sample
    return report


__all__ = ["ATTACKS", "DEFAULT_K", "DEFAULT_P", "attack_name", "check_k", "mia_auc", "mia_report", "roc_auc"]
