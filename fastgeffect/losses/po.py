"""PO: train the forget questions towards refusal answers (plain NLL on the refusal)."""
from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from ._common import NumItems
from .nll import nll


def po(logits: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch: NumItems = None,
       return_details: bool = False, per_sample: bool = False):
    """token-mean NLL of refusal answers to the forget questions (labels are the refusal tokens)."""
    return nll(logits, labels, num_items_in_batch=num_items_in_batch, return_details=return_details,
               per_sample=per_sample)


def load_refusals(path: Optional[Union[str, Path]] = None) -> List[str]:
    """Refusal sentences: the project's own list, or a user file with one per line (plain text or a
    JSON string per line, such as TOFU's ``idontknow.jsonl``)."""
    if path is None:
        text = resources.files("fastgeffect.resources").joinpath("refusals.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith('"'):
            line = json.loads(line)
        out.append(line)
    if not out:
        raise ValueError(f"no refusal sentence found in {path or 'the built-in list'}")
    return out


def sample_refusals(n: int, refusals: Optional[Sequence[str]] = None, seed: int = 0) -> List[str]:
    """``n`` refusal answers drawn with replacement, reproducibly for a seed."""
    refusals = list(refusals) if refusals is not None else load_refusals()
    rng = random.Random(seed)
    return [rng.choice(refusals) for _ in range(n)]
