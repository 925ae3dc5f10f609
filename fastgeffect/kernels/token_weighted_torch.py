"""Chunk op of the fused weighted log-likelihood in plain PyTorch (the CPU path).

Same contract and numerics as :mod:`.token_weighted_triton`: for one chunk of compacted rows it
computes per-row log-probs and weights (the table entry's torch function) and, when asked,
overwrites the logits chunk with the logits gradient ``scale · w · (onehot(y) − softmax(z))``.
Temporaries are (chunk × vocab) in fp32, never (tokens × vocab).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..losses.token_weights import TokenWeight


def token_weighted_chunk_torch(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                             explicit: Optional[torch.Tensor], scale: torch.Tensor, entry: TokenWeight,
                             alpha: float, beta: float, write_grad: bool):
    """``logits`` (C, V) contiguous, modified in place when ``write_grad``; ``labels`` (C,)
    valid ids; ``scale`` a 0-d tensor (1/denominator). Returns ``(logp, w·logp)``, each (C,)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    lse = torch.logsumexp(z, dim=-1)
    y = labels.long().unsqueeze(1)
    logp = z.gather(1, y).squeeze(1) - lse
    w = entry.fn(logp, None if ref is None else ref.to(acc), explicit, alpha, beta)
    if write_grad:
        c = w * scale.to(acc)
        g = torch.exp(z - lse.unsqueeze(1)).mul_(-c.unsqueeze(1))  # −c·p
        g.scatter_add_(1, y, c.unsqueeze(1))                         # +c at the label
        logits.copy_(g)
    return logp, w * logp
