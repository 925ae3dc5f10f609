"""Chunk op of the fused KL regulariser in plain PyTorch (the CPU path).

Same contract and numerics as :mod:`.kl_triton`: per-row KL between the current (``logits``)
and reference (``ref_logits``) next-token distributions, and, when asked, the gradient with
respect to the current logits written over ``logits``:
forward KL(r‖q): ``scale·(q − r)``; reverse KL(q‖r): ``scale·q·(log q − log r − KL)``.
Entries of probability 0 (logit −inf) follow 0·log 0 = 0, as in :func:`fastgeffect.losses.kl`.
"""
from __future__ import annotations

import torch


def kl_chunk_torch(logits: torch.Tensor, ref_logits: torch.Tensor, scale: torch.Tensor, reverse: bool,
                   write_grad: bool) -> torch.Tensor:
    """``logits``/``ref_logits`` (C, V); returns the per-row KL (C,)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logq = torch.log_softmax(logits.to(acc), dim=-1)
    logr = torch.log_softmax(ref_logits.to(acc), dim=-1)
    if not reverse:
        r = logr.exp()
        per_row = (r * (logr - logq).masked_fill_(r == 0, 0.0)).sum(-1)
        if write_grad:
            logits.copy_(logq.exp_().sub_(r).mul_(scale.to(acc)))
    else:
        q = logq.exp()
        a = logq.sub_(logr).masked_fill_(q == 0, 0.0)  # log q − log r (logq no longer needed)
        per_row = (q * a).sum(-1)
        if write_grad:
            logits.copy_(q.mul_(a.sub_(per_row.unsqueeze(1))).mul_(scale.to(acc)))
    return per_row
