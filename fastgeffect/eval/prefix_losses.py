"""Answer losses with each question's prompt run once (docs/design.md §5.1): the fast path of
:func:`.answer_losses.answer_losses`, same arguments, same numbers.

TOFU scores several answers per question (the answer, the paraphrased one and 3–5 perturbed
ones), and ``answer_losses`` runs the whole prompt + answer for each pair. Here the pairs that
share a question share its prompt: the prompt's tokens but the last are run once into a KV cache,
and each pair then runs only ``[last prompt token] + its answer tokens`` on top of that cache, at
the positions it has in the full sequence. The first answer token is predicted from the last
prompt token, so the prompt pass needs no logits.

The token ids are exactly ``answer_losses``' (the TOFU encoding truncated to ``max_length``, from
:func:`.batch_encode.batch_encode_pairs`, which refuses, as ``encode_qa`` does, a pair whose ids
do not start with its prompt's own ids); a pair whose prompt is a single token has nothing to
cache and is scored by ``answer_losses``.
Prompts are right-padded in their batch and answers appended after the padding: the padded
cache slots are masked, so a pair sees what it sees in its full forward. Only float rounding
differs (other matrix shapes); per-pair NLLs are summed in float64.
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..data.templates import IGNORE_INDEX, Template
from ._common import model_device, pad_id
from .answer_losses import answer_losses
from .batch_encode import batch_encode_pairs
from .kv_cache import cache_keyword, keep_rows, last_logits_only, returned_cache


@torch.no_grad()
def shared_prefix_losses(model, tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str], *,
                         max_length: int = 200, batch_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the summed answer NLL (float64) and the answer-token count (int64), as
    :func:`.answer_losses.answer_losses` gives them; ``batch_size`` bounds both the prompts and
    the pairs of one forward. A model whose forward takes no cache is scored by ``answer_losses``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cache_kw = cache_keyword(model)
    if cache_kw is None:
        return answer_losses(model, tokenizer, template, questions, answers, max_length=max_length,
                             batch_size=batch_size)
    ids, labels, real, truncated, prompt_lengths = batch_encode_pairs(tokenizer, template, questions, answers,
                                                                      max_length)
    if truncated:
        warnings.warn(f"{truncated} of {len(ids)} question+answer pairs exceed max_length={max_length} tokens "
                      "and were truncated (as TOFU does); their losses cover the kept answer tokens only",
                      stacklevel=2)
    # a one-token prompt leaves nothing to cache: those pairs take the full forward
    shared = {i: p for i, p in enumerate(prompt_lengths) if p >= 2}
    other = [i for i, p in enumerate(prompt_lengths) if p < 2]
    loss = torch.zeros(len(ids), dtype=torch.float64)
    count = torch.zeros(len(ids), dtype=torch.int64)
    if other:
        with warnings.catch_warnings():  # the truncation warning was given above for every pair
            warnings.simplefilter("ignore")
            ol, on = answer_losses(model, tokenizer, template, [questions[i] for i in other],
                                   [answers[i] for i in other], max_length=max_length, batch_size=batch_size)
        loss[other], count[other] = ol, on
    # pairs grouped by prompt (the prompt's ids minus the last one: the cached prefix)
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, p in shared.items():
        groups.setdefault(tuple(ids[i][: p - 1]), []).append(i)
    prefixes = sorted(groups, key=len)
    for s in range(0, len(prefixes), batch_size):
        chunk = prefixes[s: s + batch_size]
        pairs = [(r, i) for r, pre in enumerate(chunk) for i in groups[pre]]
        _score_chunk(model, cache_kw, chunk, pairs, ids, labels, shared, batch_size, pad_id(tokenizer), loss, count)
    return loss, count


def _right_pad(seqs: Sequence[Sequence[int]], pad: int):
    T = max(len(x) for x in seqs)
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        att[r, : len(s)] = 1
    return x, att


def _score_chunk(model, cache_kw: str, chunk, pairs, ids, labels, shared, batch_size: int, pad: int,
                 loss: torch.Tensor, count: torch.Tensor) -> None:
    """One batch of prefixes into a cache, then its pairs (length-sorted) in batches on top of it."""
    device = model_device(model)
    px, patt = _right_pad(chunk, pad)
    out = model(input_ids=px.to(device), attention_mask=patt.to(device), use_cache=True, **last_logits_only(model))
    prefix_cache = returned_cache(out)
    del out
    pairs = sorted(pairs, key=lambda ri: len(ids[ri[1]]) - shared[ri[1]])
    for s in range(0, len(pairs), batch_size):
        part = pairs[s: s + batch_size]
        rows = [r for r, _ in part]
        # the suffix: the last prompt token and the kept answer tokens (the EOS label's slot is no input)
        suffix = [ids[i][shared[i] - 1: len(ids[i]) - 1] for _, i in part]
        x, att = _right_pad(suffix, pad)
        y = torch.full(x.shape, IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros(x.shape, dtype=torch.long)
        for k, (_, i) in enumerate(part):
            p = shared[i]
            y[k, : len(ids[i]) - p] = torch.tensor(labels[i][p:], dtype=torch.long)
            pos[k] = torch.arange(p - 1, p - 1 + x.shape[1])
        cache = keep_rows(copy.deepcopy(prefix_cache), torch.tensor(rows, device=device))
        mask = torch.cat([patt[rows], att], dim=1)
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       use_cache=True, **{cache_kw: cache}).logits
        del cache
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        y = y.to(device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                              reduction="none").view(y.shape)
        idx = [i for _, i in part]
        loss[idx] = nll.double().sum(-1).cpu()
        count[idx] = (y != IGNORE_INDEX).sum(-1).cpu()
