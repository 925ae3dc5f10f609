"""Batched greedy decoding with left padding, in one of two explicit modes (docs/design.md §13),
without mutating the caller's tokenizer.

* ``tofu``: TOFU's ``run_generation`` exactly: batches of ``batch_size`` prompts in the given order
  (TOFU's evaluation uses 30), left-padded, and ``max_length − T`` new tokens with T the padded
  prompt length of the batch. A sample's continuation therefore depends on the other prompts of its
  batch: a long neighbour shortens its budget.
* ``independent``: every sample gets ``max_length − (its own prompt length)`` new tokens, so its
  continuation does not depend on the batch size or on which prompts share its batch (batches are
  length-sorted only for speed; left padding is masked, so only float rounding could differ, and
  it flips no token in the tests). Recommended for new work.

With ``max_new_tokens`` both modes give every sample that same budget.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from ._common import model_device, pad_id

GEN_MODES = ("tofu", "independent")
TOFU_BATCH_SIZE = 30  # TOFU's eval batch size (config/eval_everything.yaml): its budgets depend on it


def check_gen_mode(mode: str) -> None:
    if mode not in GEN_MODES:
        raise ValueError(f"unknown generation mode {mode!r}; valid: {', '.join(GEN_MODES)}")


def check_generate_args(mode: str, batch_size: int, max_length: Optional[int], max_new_tokens: Optional[int]) -> None:
    check_gen_mode(mode)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is None and max_length is None:
        raise ValueError("give max_length or max_new_tokens")
    if max_new_tokens is not None and max_new_tokens < 1:  # an empty generation would score as a real one
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


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


def budgets(lengths: Sequence[int], mode: str, max_length: Optional[int], max_new_tokens: Optional[int]) -> List[int]:
    """New-token budget of each prompt of one batch (``lengths``: their token counts); <= 0: none."""
    if max_new_tokens is not None:
        return [max_new_tokens] * len(lengths)
    if mode == "tofu":
        return [max_length - max(lengths)] * len(lengths)  # the batch's padded length
    return [max_length - n for n in lengths]


def batches(lengths: Sequence[int], mode: str, batch_size: int) -> List[List[int]]:
    """Index batches: in order for ``tofu`` (TOFU's dataloader), length-sorted for ``independent``."""
    order = list(range(len(lengths))) if mode == "tofu" else sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, mode: str = "independent",
                    max_length: Optional[int] = 200, max_new_tokens: Optional[int] = None, batch_size: int = 32,
                    add_special_tokens: bool = True, stopping_criteria_fn: Optional[Callable] = None,
                    return_ids: bool = False):
    """Greedy continuations of ``prompts`` (decoded new tokens, special tokens skipped).

    Budget: ``max_new_tokens`` if given, else ``max_length`` (prompt + continuation) counted as
    ``mode`` says (module docstring). Generation stops at EOS. ``stopping_criteria_fn(batch_indices,
    prompt_len)`` may return a ``StoppingCriteria`` list for the batch (used by PS to stop a row as
    soon as it left its target). ``return_ids=True`` returns the new token ids of each prompt
    instead of text (pad/EOS included, as generated, cut to the prompt's own budget).
    """
    check_generate_args(mode, batch_size, max_length, max_new_tokens)
    if len(prompts) == 0:
        return []
    device = model_device(model)
    pad = pad_id(tokenizer)
    enc = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    empty = [i for i, e in enumerate(enc) if not e]
    if empty:
        raise ValueError(f"prompts {empty[:5]} encode to no token: nothing to condition on")
    lengths = [len(e) for e in enc]
    out: List[Optional[str]] = [None] * len(enc)
    for chunk in batches(lengths, mode, batch_size):
        own = budgets([lengths[i] for i in chunk], mode, max_length, max_new_tokens)
        x, att = left_pad([enc[i] for i in chunk], pad)
        T = x.shape[1]
        new = torch.empty((len(chunk), 0), dtype=torch.long)
        if max(own) > 0:
            kwargs = {}
            if getattr(getattr(model, "generation_config", None), "eos_token_id", None) is None:
                kwargs["eos_token_id"] = tokenizer.eos_token_id  # stop at EOS even if the config forgot it
            if stopping_criteria_fn is not None:
                kwargs["stopping_criteria"] = stopping_criteria_fn(chunk, T)
            gen = model.generate(input_ids=x.to(device), attention_mask=att.to(device), do_sample=False,
                                 max_new_tokens=max(own), pad_token_id=pad, use_cache=True,
                                 temperature=None, top_p=None, top_k=None, **kwargs)
            new = gen[:, T:].cpu()
        # greedy decoding is causal: a row's first b tokens are what a budget of b would have given
        rows = [new[r, :max(b, 0)].tolist() for r, b in enumerate(own)]
        texts = rows if return_ids else tokenizer.batch_decode(rows, skip_special_tokens=True)
        for i, t in zip(chunk, texts):
            out[i] = t
    return out  # type: ignore[return-value]
