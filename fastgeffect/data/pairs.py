"""Forget/retain pairs for unlearning: each item is one forget sample plus one retain sample.

The retain sample is drawn from the retain pool (held-out rows already excluded) with a
generator seeded by ``(seed, epoch, rank)``: reproducible, re-drawn each epoch with
``set_epoch``, and different across data-parallel ranks. Within an epoch the pool is walked in
a random order without replacement (concatenated permutations when the forget set is larger).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from .qa import QADataset


def retain_order(n_forget: int, n_retain: int, seed: int, epoch: int = 0, rank: int = 0) -> np.ndarray:
    """Retain position paired with each forget position, for one (seed, epoch, rank)."""
    if n_forget < 1 or n_retain < 1:
        raise ValueError(f"need at least one forget and one retain sample, got {n_forget} and {n_retain}")
    rng = np.random.default_rng([seed, epoch, rank])
    reps = -(-n_forget // n_retain)
    return np.concatenate([rng.permutation(n_retain) for _ in range(reps)])[:n_forget]


class ForgetRetainDataset(Dataset):
    """Items ``{"forget": f, "retain": r}`` (+ the forget question with a refusal answer under
    ``refusal_key``, when ``forget_idk`` is given; it must have the same rows as ``forget``).
    ``refusal_key`` is the sub-batch the objective reads the refusals from: ``forget_idk`` (PO,
    IdkDPO) or ``forget_win`` (DPO, whose preferred answers are the refusals)."""

    def __init__(self, forget: QADataset, retain: QADataset, forget_idk: Optional[QADataset] = None, *,
                 seed: int = 0, rank: int = 0, refusal_key: str = "forget_idk"):
        if forget_idk is not None and len(forget_idk) != len(forget):
            raise ValueError(f"forget_idk has {len(forget_idk)} items, forget has {len(forget)}")
        self.forget, self.retain, self.forget_idk = forget, retain, forget_idk
        self.seed, self.rank, self.refusal_key = seed, rank, refusal_key
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the retain partners for ``epoch`` (call at the start of every epoch)."""
        self.epoch = epoch
        self.order = retain_order(len(self.forget), len(self.retain), self.seed, epoch, self.rank)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        item = {"forget": self.forget[i], "retain": self.retain[int(self.order[i])]}
        if self.forget_idk is not None:
            item[self.refusal_key] = self.forget_idk[i]
        return item
