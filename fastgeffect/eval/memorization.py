"""Teacher-forced memorisation metrics (open-unlearning's names and definitions), both read off
one forward pass per batch: whether the argmax prediction at each answer position (EOS included)
equals the answer token.

* ``exact_memorization``: the fraction of answer tokens predicted correctly.
* ``extraction_strength``: with L answer tokens and k the first position from which every
  prediction is correct, ES = 1 − k/L; when even the last token is wrong k = L − 1
  (open-unlearning's loop ends there), so ES = 1/L.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from ..data.templates import IGNORE_INDEX, Template
from ..losses import valid_mask
from ._common import check_records, model_device, pad_id
from .answer_losses import encode_pairs


@torch.no_grad()
def answer_hits(model, tokenizer, template: Template, records: Sequence[dict], *, question_key: str = "question",
                answer_key: str = "answer", max_length: int = 200,
                batch_size: int = 32) -> Iterator[Tuple[int, torch.Tensor]]:
    """``(row index, bool vector over its answer tokens: argmax == token)`` for every record, in
    batches of rows of similar length (TOFU's encoding, truncated to ``max_length``)."""
    check_records(records, (question_key, answer_key), "memorisation metrics")
    ids, labels, real, _ = encode_pairs(tokenizer, template, [r[question_key] for r in records],
                                        [r[answer_key] for r in records], max_length)
    device = model_device(model)
    pad = pad_id(tokenizer)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        T = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)
        y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(ids[i])], y[r, : len(ids[i])] = torch.tensor(ids[i]), torch.tensor(labels[i])
            att[r, : real[i]] = 1
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits
        pred = torch.zeros_like(y)
        pred[:, 1:] = logits[:, :-1].argmax(-1).cpu()  # aligned with labels
        mask = valid_mask(y)
        for r, i in enumerate(chunk):
            yield i, (pred[r] == y[r])[mask[r]]


def _es(correct: torch.Tensor) -> float:
    L = int(correct.numel())
    suffix_ok = correct.flip(0).cumprod(0).flip(0).bool()  # all correct from here on
    hits = suffix_ok.nonzero()
    k = int(hits[0]) if len(hits) else L - 1
    return 1.0 - k / L


def _em(correct: torch.Tensor) -> float:
    return float(correct.sum()) / int(correct.numel())


def memorization_scores(model, tokenizer, template: Template, records: Sequence[dict], **kw) -> Dict[str, object]:
    """Both metrics from one pass: ``{"es": mean, "es_scores": [...], "em": mean, "em_scores": [...]}``."""
    es: List[float] = [0.0] * len(records)
    em: List[float] = [0.0] * len(records)
    for i, correct in answer_hits(model, tokenizer, template, records, **kw):
        es[i], em[i] = _es(correct), _em(correct)
    return {"es": sum(es) / len(es), "es_scores": es, "em": sum(em) / len(em), "em_scores": em}


def extraction_strength(model, tokenizer, template: Template, records: Sequence[dict], **kw) -> Dict[str, object]:
    """Teacher-forced extraction strength per record: ``{"es": mean, "scores": per sample}``."""
    out = memorization_scores(model, tokenizer, template, records, **kw)
    return {"es": out["es"], "scores": out["es_scores"]}


def exact_memorization(model, tokenizer, template: Template, records: Sequence[dict], **kw) -> Dict[str, object]:
    """Teacher-forced exact memorisation per record: ``{"em": mean, "scores": per sample}``."""
    out = memorization_scores(model, tokenizer, template, records, **kw)
    return {"em": out["em"], "scores": out["em_scores"]}
