"""The batches of one step: this rank's micro-batches and the rows of the two G-effect risks."""
from __future__ import annotations

from typing import List

import torch

from ..data.collate import collate_pairs
from ..data.pairs import ForgetRetainDataset
from ..data.qa import QADataset
from .plan import Chunks, StepPlan


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def step_batches(pairs: ForgetRetainDataset, plan: StepPlan, device) -> List[dict]:
    """This rank's micro-batches of forget samples with their retain partners (of ``plan.epoch``)."""
    pairs.set_epoch(plan.epoch)
    return [to_device(collate_pairs([pairs[i] for i in c]), device) for c in plan.loaded]


def forget_risk_items(pairs: ForgetRetainDataset, global_chunks: Chunks, n: int) -> List[dict]:
    """The first ``n`` forget samples of the step, in global micro-batch order."""
    return [pairs[i]["forget"] for c in global_chunks for i in c][:n]


def retain_risk_items(heldout: QADataset, seed: int, step: int, n: int) -> List[dict]:
    """``n`` held-out retain rows for the retaining risk: a fresh, seeded draw at every step."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    idx = torch.randperm(len(heldout), generator=g)[:min(n, len(heldout))].tolist()
    return [heldout[i] for i in idx]


def n_tokens(items: List[dict]) -> int:
    """Valid shifted labels in ``items`` (the token-mean divisor)."""
    return int(sum(int((it["labels"][1:] != -100).sum()) for it in items))
