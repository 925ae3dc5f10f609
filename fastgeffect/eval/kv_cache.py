"""What the evaluators' own forward loops need from a causal LM's KV cache, across transformers
versions (``past_key_values`` became ``cache`` in 5.x): which keyword takes the cache, where the
output returns it, and whether the model takes explicit position ids and ``logits_to_keep``.

A model whose ``forward`` names none of them (a wrapper taking ``**kwargs``, e.g. a peft model)
is not given to those loops: :func:`cache_keyword` returns None and the callers fall back to
their reference paths (plain full forwards, Hugging Face ``generate``).
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers >= 5.x, then the older name


def forward_parameters(model) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing is known
        return set()


def cache_keyword(model) -> Optional[str]:
    """The keyword under which ``model.forward`` takes a KV cache, or None when the loops cannot
    drive it (no cache keyword or no ``position_ids``: the shared-prefix losses place each answer
    after its own prompt by explicit positions)."""
    params = forward_parameters(model)
    if "position_ids" not in params:
        return None
    return next((k for k in CACHE_KEYWORDS if k in params), None)


def returned_cache(output):
    """The cache an output carries (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    for k in CACHE_KEYWORDS:
        cache = getattr(output, k, None)
        if cache is not None:
            return cache
    raise ValueError("the model returned no KV cache although use_cache=True was passed")


def last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model takes it (the LM head then runs on the last position
    only, as ``generate`` does at prefill); nothing otherwise."""
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}


def keep_rows(cache, rows: torch.Tensor):
    """``cache`` keeping only ``rows`` (batch indices): a ``Cache`` in place
    (``batch_select_indices``), the legacy tuple of (key, value) pairs as a new tuple."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(rows)
        return cache
    return tuple(tuple(t[rows] for t in layer) for layer in cache)
