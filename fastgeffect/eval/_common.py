"""Small shared helpers of the evaluators: device, pad id, record checks."""
from __future__ import annotations

import numbers
from typing import Iterable, List, Optional, Sequence

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
    """Every record has every field as a string (``perturbed_answer``: a string or a non-empty list
    of strings): a null or a number would be scored as the text "None" or fail deep inside."""
    if len(records) == 0:
        raise ValueError(f"{name}: the set is empty; there is nothing to evaluate")
    for f in fields:
        missing = [i for i, r in enumerate(records) if f not in r]
        if missing:
            raise ValueError(f"{name}: records {missing[:5]}{'...' if len(missing) > 5 else ''} lack the field {f!r}")
        ok = _is_text_list if f == "perturbed_answer" else _is_text
        bad = [i for i, r in enumerate(records) if not ok(r[f])]
        if bad:
            raise ValueError(f"{name}: the field {f!r} of record {bad[0]} is {records[bad[0]][f]!r}, not "
                             f"{'a list of strings' if f == 'perturbed_answer' else 'a string'}"
                             f"{f' (records {bad[:5]} in all)' if len(bad) > 1 else ''}; fix or drop those rows")


def check_ds_size(ds_size: Optional[int]) -> None:
    """``ds_size`` (rows per set, TOFU's name) is None (all rows) or a positive integer: a slice
    ``[:0]`` keeps every row and ``[:-1]`` silently drops the last one."""
    if ds_size is not None and (isinstance(ds_size, bool) or not isinstance(ds_size, numbers.Integral) or ds_size < 1):
        raise ValueError(f"ds_size must be a positive number of rows per set (or None for all rows), got {ds_size!r}")


def _is_text(v) -> bool:
    return isinstance(v, str)


def _is_text_list(v) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_is_text, v)))


def as_list(x) -> List[str]:
    return [x] if isinstance(x, str) else list(x)
