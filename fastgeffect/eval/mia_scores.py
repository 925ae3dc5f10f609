"""Per-sample statistics of the membership-inference attacks (open-unlearning's definitions, its
``src/evals/metrics/mia/``), from one batched forward per batch of TOFU-encoded rows.

What each attack reads (labels: the answer tokens + EOS, as TOFU's collator):

* LOSS / ZLib / Reference: ``avg_loss``, the mean NLL over every labelled token (EOS included).
* Min-K% / Min-K%++ / GradNorm: the log-probabilities of the labelled tokens but the last one
  (open-unlearning drops it as "the EOS prediction").

Every score is signed like a loss: higher means less likely a member.
"""
from __future__ import annotations

import zlib
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from ..data.templates import IGNORE_INDEX, Template
from ._common import check_records, model_device, pad_id
from .answer_losses import encode_pairs

MIN_SIGMA2 = 1e-6  # open-unlearning's clamp of the vocabulary variance in Min-K%++


class Encoded:
    """TOFU encodings of records (``encode_pairs``) and their answer texts, for batching."""

    def __init__(self, tokenizer, template: Template, records: Sequence[dict], max_length: int, name: str):
        check_records(records, ("question", "answer"), name)
        self.ids, self.labels, self.real, _ = encode_pairs(
            tokenizer, template, [r["question"] for r in records], [r["answer"] for r in records], max_length)
        self.pad = pad_id(tokenizer)
        # ZLib compresses the decoded labelled tokens, special tokens skipped (open-unlearning's text)
        self.texts = [tokenizer.decode([t for t in y if t != IGNORE_INDEX], skip_special_tokens=True)
                      for y in self.labels]

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(row indices, input_ids, attention_mask, labels)``: rows of similar length, right-padded."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        for s in range(0, len(order), batch_size):
            chunk = order[s: s + batch_size]
            yield (chunk, *pad_rows([self.ids[i] for i in chunk], [self.labels[i] for i in chunk],
                                    [self.real[i] for i in chunk], self.pad))


def pad_rows(ids: Sequence[List[int]], labels: Sequence[List[int]], real: Sequence[int], pad: int):
    """Right-padded ``(input_ids, attention_mask, labels)``; the EOS label's input slot is padding."""
    T = max(len(x) for x in ids)
    x = torch.full((len(ids), T), pad, dtype=torch.long)
    y = torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((len(ids), T), dtype=torch.long)
    for r, (a, b, n) in enumerate(zip(ids, labels, real)):
        x[r, : len(a)], y[r, : len(b)] = torch.tensor(a), torch.tensor(b)
        att[r, :n] = 1
    return x, att, y


def shifted_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax of the logits predicting positions 1..T-1 (in at least fp32)."""
    lg = logits[:, :-1]
    return torch.log_softmax(lg if lg.dtype == torch.float64 else lg.float(), dim=-1)


def min_k_positions(labels_row: torch.Tensor) -> torch.Tensor:
    """Label positions Min-K% reads: the labelled ones but the last (open-unlearning's EOS drop)."""
    return (labels_row != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]


def min_k_score(values: np.ndarray, k: float) -> float:
    """−mean of the ⌊k·n⌋ (at least 1) smallest values; 0 for an empty row (open-unlearning's)."""
    if values.size == 0:
        return 0.0
    n = max(1, int(len(values) * k))
    return float(-np.mean(np.sort(values)[:n]))


def zlib_score(avg_loss: float, text: str) -> float:
    """ZLib: the mean loss over the zlib-compressed length of the answer text in bytes."""
    return avg_loss / len(zlib.compress(text.encode("utf-8")))


@torch.no_grad()
def token_statistics(model, enc: Encoded, *, batch_size: int, vocab_moments: bool) -> Dict[str, list]:
    """Per row: ``avg_loss`` (float), ``token_lp`` (the Min-K% log-probs, float64 numpy) and, with
    ``vocab_moments``, ``mink_pp`` (Min-K%++'s normalised log-probs (lp − μ)/σ at the same positions)."""
    device = model_device(model)
    n = len(enc)
    out: Dict[str, list] = {"avg_loss": [0.0] * n, "token_lp": [None] * n}
    if vocab_moments:
        out["mink_pp"] = [None] * n
    for chunk, x, att, y in enc.batches(batch_size):
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits
        lp = shifted_logprobs(logits)  # (B, T-1, V), row t predicts token t+1
        y = y.to(device)
        target = y[:, 1:]
        mask = target != IGNORE_INDEX
        nll = -lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        avg = nll.double().sum(-1) / (y != IGNORE_INDEX).sum(-1)  # open-unlearning's count: all labels
        if vocab_moments:
            p = lp.exp()
            mu = (p * lp).sum(-1)
            sigma = ((p * lp.square()).sum(-1) - mu.square()).clamp(min=MIN_SIGMA2).sqrt()
        next_lp = lp.gather(-1, x.to(device)[:, 1:].unsqueeze(-1)).squeeze(-1)  # of the input tokens
        for r, i in enumerate(chunk):
            out["avg_loss"][i] = float(avg[r])
            pos = min_k_positions(y[r]) - 1  # label position t is predicted by row t-1
            out["token_lp"][i] = next_lp[r, pos].double().cpu().numpy()
            if vocab_moments:
                z = (next_lp[r, pos] - mu[r, pos]) / sigma[r, pos]
                out["mink_pp"][i] = z.double().cpu().numpy()
    return out
