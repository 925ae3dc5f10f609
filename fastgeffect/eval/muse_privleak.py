"""MUSE's ``privleak`` (``swj0419/muse_bench``, ``metrics/privleak.py`` and ``eval.py``): the
Min-40% membership AUC on privleak forget vs holdout texts, relative to the retrained model's.

Per text (MUSE's ``inference``): the text encoded with the tokenizer's special tokens, whole (or
its first ``max_length`` tokens when given), the log-probability of every token after the first;
the Min-K% score is −mean of the ``int(n·k)`` smallest of those n log-probs, k = 0.4. A text whose
``int(n·k)`` is 0 is refused (MUSE's score would be NaN).

MUSE's AUC (its key ``forget_holdout_Min-40%``) labels forget texts 0 and holdout texts 1 and
ranks by −score: near 0 when the forget texts are much likelier than the holdout ones (the
target model), about 0.5 for a model that never saw either. It is 1 − open-unlearning's AUC of
:mod:`.mia` (forget 0, holdout 1, ranked by the loss-like score), which is what is computed here
with :func:`.mia.roc_auc`, so :func:`.privleak.privleak` gives MUSE's value::

    privleak = (auc − auc_retrain) / auc_retrain · 100     (MUSE's orientation of both AUCs)

(plus 1e-10 in the denominator). The reference AUC is the retrained model's on the same texts
(``retain_model``), else ``reference_auc`` when given (e.g. MUSE's published value for its own
retrained Llama-2-7B, :data:`MUSE_RETRAIN_AUC`), else 0.5; the result says which.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ._common import model_device, pad_id
from .mia import roc_auc
from .mia_scores import shifted_logprobs
from .privleak import NO_TWIN_AUC, privleak

MUSE_K = 0.4  # MUSE's privleak key forget_holdout_Min-40%
# MUSE's AUC_RETRAIN["news"|"books"]["forget_holdout_Min-40%"] (constants.py): its retrained Llama-2-7B
MUSE_RETRAIN_AUC = {"news": 0.47719999999999996, "books": 0.5392999999999999}


def encode_texts(tokenizer, texts: Sequence[str], k: float, max_length: Optional[int], name: str) -> List[List[int]]:
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}: text {i} is {t!r}, not a string")
        ids = tokenizer(t, add_special_tokens=True)["input_ids"]
        ids = ids if max_length is None else ids[:max_length]
        if int((len(ids) - 1) * k) < 1:
            raise ValueError(f"{name}: text {i} has {len(ids)} token(s): Min-{round(k * 100)}% would average "
                             f"int({len(ids) - 1}·{k}) = 0 log-probs ({t[:60]!r})")
        out.append(ids)
    return out


def check_positions(model, ids: Sequence[List[int]]) -> None:
    """A text longer than the model's positions would be scored on positions it never learned."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    longest = max(map(len, ids))
    if isinstance(limit, int) and longest > limit:
        raise ValueError(f"a MUSE privleak text has {longest} tokens, more than the model's {limit} positions: "
                         f"cut the texts with privleak_max_length={limit} (MUSE scores whole texts)")


@torch.no_grad()
def text_logprobs(model, ids: Sequence[List[int]], pad: int, batch_size: int) -> List[np.ndarray]:
    """Per text: the log-probs of its tokens 1..n−1 (float64), from right-padded, length-sorted batches."""
    device = model_device(model)
    out: List[Optional[np.ndarray]] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        T = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(ids[i])], att[r, : len(ids[i])] = torch.tensor(ids[i]), 1
        x = x.to(device)
        lp = shifted_logprobs(model(input_ids=x, attention_mask=att.to(device)).logits)
        tok = lp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
        for r, i in enumerate(chunk):
            out[i] = tok[r, : len(ids[i]) - 1].double().cpu().numpy()
    return out  # type: ignore[return-value]


def min_k_muse(logprobs: np.ndarray, k: float = MUSE_K) -> float:
    """MUSE's Min-K% score: −mean of the int(n·k) smallest log-probs."""
    return float(-np.mean(np.sort(logprobs)[: int(len(logprobs) * k)]))


def muse_auc(model, tokenizer, forget_texts: Sequence[str], holdout_texts: Sequence[str], *, k: float = MUSE_K,
             batch_size: int = 32, max_length: Optional[int] = None) -> Dict[str, object]:
    """``{"auc" (MUSE's orientation), "forget_scores", "holdout_scores"}`` of one model."""
    f = encode_texts(tokenizer, forget_texts, k, max_length, "MUSE privleak forget")
    h = encode_texts(tokenizer, holdout_texts, k, max_length, "MUSE privleak holdout")
    check_positions(model, f + h)
    pad = pad_id(tokenizer)
    fs = [min_k_muse(v, k) for v in text_logprobs(model, f, pad, batch_size)]
    hs = [min_k_muse(v, k) for v in text_logprobs(model, h, pad, batch_size)]
    auc_ou = roc_auc([0] * len(fs) + [1] * len(hs), fs + hs)
    return {"auc": 1.0 - auc_ou, "forget_scores": fs, "holdout_scores": hs}


def muse_privleak(model, tokenizer, forget_texts: Sequence[str], holdout_texts: Sequence[str], *,
                  retain_model=None, reference_auc: Optional[float] = None, k: float = MUSE_K,
                  batch_size: int = 32, max_length: Optional[int] = None) -> Dict[str, object]:
    """``{"privleak", "privleak_auc", "privleak_reference_auc", "privleak_reference",
    "forget_scores", "holdout_scores"}``: MUSE's privleak in percent, the model's and the
    reference's AUCs (MUSE's orientation), which reference was used (module docstring) and the
    model's Min-K% score of each text."""
    if retain_model is not None and reference_auc is not None:
        raise ValueError("give the retained model or a reference AUC, not both")
    kw = dict(k=k, batch_size=batch_size, max_length=max_length)
    if retain_model is not None:  # the reference first: a bad input fails before the model's pass
        ref, source = muse_auc(retain_model, tokenizer, forget_texts, holdout_texts, **kw)["auc"], "retain model"
    elif reference_auc is not None:
        ref, source = float(reference_auc), f"given reference AUC {reference_auc}"
    else:
        ref, source = NO_TWIN_AUC, f"{NO_TWIN_AUC} (no retain model)"
    res = muse_auc(model, tokenizer, forget_texts, holdout_texts, **kw)
    auc = res["auc"]
    return {"privleak": privleak(1.0 - auc, 1.0 - ref), "privleak_auc": auc, "privleak_reference_auc": ref,
            "privleak_reference": source, "forget_scores": res["forget_scores"],
            "holdout_scores": res["holdout_scores"]}


__all__ = ["MUSE_K", "MUSE_RETRAIN_AUC", "min_k_muse", "muse_auc", "muse_privleak"]
