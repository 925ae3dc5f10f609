"""Collators: stack encoded QA items into a batch, trimmed to the longest item of the batch."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .templates import IGNORE_INDEX

FIELDS = ("input_ids", "attention_mask", "labels")


def collate_qa(items: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """``{input_ids, attention_mask, labels, index}`` of a list of ``QADataset`` items.

    Items are right-padded to the same length; columns that are padding in every item are cut
    off. The label EOS sits on the first padding position (TOFU style), so it is kept.
    """
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    batch = {k: torch.stack([it[k] for it in items]) for k in FIELDS}
    used = (batch["attention_mask"] != 0) | (batch["labels"] != IGNORE_INDEX)
    cols = used.any(dim=0).nonzero()
    length = int(cols.max()) + 1 if cols.numel() else 1
    batch = {k: v[:, :length].contiguous() for k, v in batch.items()}
    batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return batch


def collate_pairs(items: Sequence[dict]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Batch of ``ForgetRetainDataset`` items: ``{"forget": ..., "retain": ..., "forget_idk": ...}``
    (each part collated with ``collate_qa``; ``forget_idk`` only when the items have it)."""
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    keys: List[str] = list(items[0].keys())
    return {k: collate_qa([it[k] for it in items]) for k in keys}
