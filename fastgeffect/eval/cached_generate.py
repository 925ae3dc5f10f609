"""Greedy generation by our own KV-cache loop in which a row leaves the batch as soon as it is done
(docs/design.md §5.1): the fast path of :func:`.generate.greedy_generate` for the TOFU metrics,
with the same batches, budgets and texts.

``greedy_generate`` hands each batch to Hugging Face ``generate``, which keeps every row in the
batch (feeding pad tokens to the finished ones) until the last row ends, then cuts each row to
its own budget. Here each batch is the same (``batches``: TOFU's in ``tofu`` mode, length-sorted
in ``independent`` mode), left-padded the same way, and prefilled with the inputs ``generate``
gives the model (position ids from the attention mask, an all-ones mask dropped, the LM head on
the last position only); then every step feeds only the rows still running, and a row stops at
an EOS id (the generation config's, else the tokenizer's) or at its own budget. A row's tokens
are therefore computed from the same inputs as in ``generate``; only the batch's height shrinks.

The loop implements plain greedy decoding only: a generation config asking for anything else
(a repetition penalty, beams, forced or suppressed tokens, ...; :func:`plain_greedy`) or a model
whose forward takes no cache keyword goes to ``greedy_generate``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._common import model_device, pad_id
from .generate import batches, budgets, check_generate_args, greedy_generate, left_pad
from .kv_cache import cache_keyword, keep_rows, last_logits_only, returned_cache

# generation-config fields that would make ``generate`` do more than an argmax per step, with
# their neutral values (None: transformers 5 leaves unset fields None; the rest: 4.x defaults)
NEUTRAL = {"num_beams": (None, 1), "penalty_alpha": (None,), "dola_layers": (None,),
           "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
           "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
           "bad_words_ids": (None,), "force_words_ids": (None,), "constraints": (None,),
           "min_length": (None, 0), "min_new_tokens": (None,), "forced_bos_token_id": (None,),
           "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
           "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
           "stop_strings": (None,), "max_time": (None,), "watermarking_config": (None,),
           "prefill_chunk_size": (None,), "cache_implementation": (None,), "assistant_model": (None,),
           "prompt_lookup_num_tokens": (None,)}


def plain_greedy(model) -> bool:
    """Whether ``generate(do_sample=False)`` on this model is a plain argmax per step."""
    cfg = getattr(model, "generation_config", None)
    return all(getattr(cfg, k, None) in ok for k, ok in NEUTRAL.items())


def eos_ids(model, tokenizer) -> List[int]:
    """The ids that end a row: the generation config's EOS (an id or a list), else the tokenizer's,
    as ``greedy_generate`` passes it."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def cached_greedy_generate(model, tokenizer, prompts: Sequence[str], *, mode: str = "independent",
                           max_length: Optional[int] = 200, max_new_tokens: Optional[int] = None,
                           batch_size: int = 32, add_special_tokens: bool = True) -> List[str]:
    """The continuations :func:`.generate.greedy_generate` gives (same arguments, texts only)."""
    check_generate_args(mode, batch_size, max_length, max_new_tokens)
    cache_kw = cache_keyword(model)
    if cache_kw is None or not plain_greedy(model):
        return greedy_generate(model, tokenizer, prompts, mode=mode, max_length=max_length,
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               add_special_tokens=add_special_tokens)
    if len(prompts) == 0:
        return []
    enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]  # one batched call
    empty = [i for i, e in enumerate(enc) if not e]
    if empty:
        raise ValueError(f"prompts {empty[:5]} encode to no token: nothing to condition on")
    lengths = [len(e) for e in enc]
    stop = torch.tensor(eos_ids(model, tokenizer))
    out: List[Optional[str]] = [None] * len(enc)
    for chunk in batches(lengths, mode, batch_size):
        own = budgets([lengths[i] for i in chunk], mode, max_length, max_new_tokens)
        x, att = left_pad([enc[i] for i in chunk], pad_id(tokenizer))
        rows = greedy_rows(model, cache_kw, x, att, own, stop) if max(own) > 0 else [[] for _ in chunk]
        for i, t in zip(chunk, tokenizer.batch_decode(rows, skip_special_tokens=True)):
            out[i] = t
    return out  # type: ignore[return-value]


def greedy_rows(model, cache_kw: str, x: torch.Tensor, att: torch.Tensor, own: Sequence[int],
                stop: torch.Tensor) -> List[List[int]]:
    """The new tokens of each left-padded row (EOS included when generated), at most ``own[r]``."""
    device = model_device(model)
    pos = (att.cumsum(-1) - 1).masked_fill(att == 0, 0)
    mask = None if bool(att.all()) else att.to(device)  # as generate drops a mask without padding
    out = model(input_ids=x.to(device), attention_mask=mask, position_ids=pos.to(device), use_cache=True,
                **last_logits_only(model))
    cache = returned_cache(out)
    new: List[List[int]] = [[] for _ in own]
    alive = list(range(len(own)))  # the original rows of the batch's current rows
    last = pos[:, -1].to(device)
    stop = stop.to(device)
    while True:
        nxt = out.logits[:, -1].to(dtype=torch.float32).argmax(-1)
        ended = torch.isin(nxt, stop).tolist()
        keep = []
        for k, (r, t) in enumerate(zip(alive, nxt.tolist())):
            if own[r] <= 0:
                continue  # no budget: it only shared the prefill, as in generate
            new[r].append(t)
            if not ended[k] and len(new[r]) < own[r]:
                keep.append(k)
        if not keep:
            return new
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=device)
            cache = keep_rows(cache, idx)
            nxt, last = nxt[idx], last[idx]
            mask = mask[idx] if mask is not None else None
            alive = [alive[k] for k in keep]
        last = last + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], use_cache=True,
                    **{cache_kw: cache})
