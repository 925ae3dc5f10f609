"""Per-sample answer losses, batched: TOFU's ``get_batch_loss`` (sum of token NLLs over the answer
tokens, EOS included) and the answer-token count, for many (question, answer) pairs at once.

Samples are encoded exactly as TOFU does (``fastgeffect.data.templates.encode_qa``), sorted by
length so each batch is cut to its longest sequence (right padding never changes a causal LM's
outputs on the real tokens), and returned in the input order.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import torch

from ..data.templates import IGNORE_INDEX, Template, encode_qa
from ..losses import token_logprobs, valid_mask
from ._common import model_device


def encode_pairs(tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str],
                 max_length: int) -> Tuple[List[List[int]], List[List[int]], List[int], int]:
    """TOFU encodings of the pairs, trimmed of padding: (input_ids, labels, n_real_tokens, n_truncated)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    ids, labels, real, truncated = [], [], [], 0
    for q, a in zip(questions, answers):
        enc = encode_qa(tokenizer, template, q, a, max_length)
        n = sum(enc["attention_mask"])
        real.append(n)
        if n == max_length:
            truncated += 1  # no room for the EOS label: TOFU truncates silently, we warn
            ids.append(enc["input_ids"]), labels.append(enc["labels"])
        else:  # keep the real tokens plus the EOS label that follows them
            ids.append(enc["input_ids"][: n + 1]), labels.append(enc["labels"][: n + 1])
    return ids, labels, real, truncated


@torch.no_grad()
def answer_losses(model, tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str], *,
                  max_length: int = 200, batch_size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the summed answer NLL (float64 tensor) and the number of answer tokens (int64).

    ``avg loss = loss / tokens`` is TOFU's ``avg_gt_loss``. Answers that do not fit in
    ``max_length`` tokens are truncated, as TOFU does, with a warning saying how many.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids, labels, real, truncated = encode_pairs(tokenizer, template, questions, answers, max_length)
    if truncated:
        warnings.warn(f"{truncated} of {len(ids)} question+answer pairs exceed max_length={max_length} tokens "
                      "and were truncated (as TOFU does); their losses cover the kept answer tokens only",
                      stacklevel=2)
    device = model_device(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    loss = torch.zeros(len(ids), dtype=torch.float64)
    count = torch.zeros(len(ids), dtype=torch.int64)
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        T = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), T), tokenizer.eos_token_id, dtype=torch.long)
        y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            n = len(ids[i])
            x[r, :n], y[r, :n] = torch.tensor(ids[i]), torch.tensor(labels[i])
            att[r, : real[i]] = 1  # the EOS label's input slot is padding (attention 0), as in TOFU
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits
        y = y.to(device)
        lp = token_logprobs(logits, y)
        mask = valid_mask(y)
        loss[chunk] = (-(lp * mask).sum(-1)).double().cpu()
        count[chunk] = mask.sum(-1).cpu()
    return loss, count
