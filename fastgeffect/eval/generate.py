"""Batched greedy decoding with left padding (what TOFU's ``run_generation`` does, without
mutating the caller's tokenizer): prompts are sorted by length, left-padded by hand and handed
to ``model.generate(do_sample=False)``."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from ._common import model_device, pad_id


def left_pad(seqs: Sequence[Sequence[int]], pad: int):
    """(input_ids, attention_mask) with every sequence right-aligned."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            x[r, T - len(s):] = torch.tensor(list(s), dtype=torch.long)
            att[r, T - len(s):] = 1
    return x, att


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_length: Optional[int] = 200,
                    max_new_tokens: Optional[int] = None, batch_size: int = 32, add_special_tokens: bool = True,
                    stopping_criteria_fn: Optional[Callable] = None, return_ids: bool = False):
    """Greedy continuations of ``prompts`` (decoded new tokens, special tokens skipped).

    Budget: ``max_new_tokens`` if given, else TOFU's ``max_length`` rule (prompt + continuation at
    most ``max_length`` tokens, counted on the batch's padded length). Generation stops at EOS.
    ``stopping_criteria_fn(batch_indices, prompt_len)`` may return a ``StoppingCriteria`` list
    for the batch (used by PS to stop a row as soon as it left its target). ``return_ids=True``
    returns the new token ids of each prompt instead of text (pad/EOS included, as generated).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is None and max_length is None:
        raise ValueError("give max_length or max_new_tokens")
    if max_new_tokens is not None and max_new_tokens < 1:  # an empty generation would score as a real one
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompts) == 0:
        return []
    device = model_device(model)
    pad = pad_id(tokenizer)
    enc = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    empty = [i for i, e in enumerate(enc) if not e]
    if empty:
        raise ValueError(f"prompts {empty[:5]} encode to no token: nothing to condition on")
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: List[Optional[str]] = [None] * len(enc)
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        x, att = left_pad([enc[i] for i in chunk], pad)
        T = x.shape[1]
        budget = max_new_tokens if max_new_tokens is not None else max_length - T
        if budget <= 0:
            for i in chunk:
                out[i] = [] if return_ids else ""
            continue
        kwargs = {}
        if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is None:
            kwargs["eos_token_id"] = tokenizer.eos_token_id  # stop at EOS even if the config forgot it
        if stopping_criteria_fn is not None:
            kwargs["stopping_criteria"] = stopping_criteria_fn(chunk, T)
        gen = model.generate(input_ids=x.to(device), attention_mask=att.to(device), do_sample=False,
                             max_new_tokens=budget, pad_token_id=pad, use_cache=True,
                             temperature=None, top_p=None, top_k=None, **kwargs)
        new = gen[:, T:].cpu()
        texts = new.tolist() if return_ids else tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, t in zip(chunk, texts):
            out[i] = t
    return out  # type: ignore[return-value]
