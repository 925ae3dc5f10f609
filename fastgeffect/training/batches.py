"""The batches of one step: this rank's micro-batches (the rows of the two G-effect risks are
:mod:`fastgeffect.geffect.risk`'s)."""
from __future__ import annotations

from typing import List

import torch

from ..data.collate import collate_pairs
from ..data.pairs import ForgetRetainDataset
from ..geffect.risk import forget_risk_items, n_tokens, retain_risk_items  # noqa: F401  (re-exported)
from .plan import StepPlan


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def step_batches(pairs: ForgetRetainDataset, plan: StepPlan, device) -> List[dict]:
    """This rank's micro-batches of forget samples with their retain partners (of ``plan.epoch``)."""
    pairs.set_epoch(plan.epoch)
    return [to_device(collate_pairs([pairs[i] for i in c]), device) for c in plan.loaded]
