"""Small shared helpers of the evaluators: device, pad id, record checks."""
from __future__ import annotations

from typing import Iterable, List, Sequence

import torch


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less module (never a real LM)
        return torch.device("cpu")


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id; a tokenizer without a pad token pads with EOS, as TOFU does
    (padded positions are masked, so the choice never changes a number)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: cannot pad a batch")
    return tokenizer.eos_token_id


def check_records(records: Sequence[dict], fields: Iterable[str], name: str) -> None:
    if len(records) == 0:
        raise ValueError(f"{name}: the set is empty; there is nothing to evaluate")
    for f in fields:
        missing = [i for i, r in enumerate(records) if f not in r]
        if missing:
            raise ValueError(f"{name}: records {missing[:5]}{'...' if len(missing) > 5 else ''} lack the field {f!r}")


def as_list(x) -> List[str]:
    return [x] if isinstance(x, str) else list(x)
