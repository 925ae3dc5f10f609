"""Greedy decoding read off teacher-forced passes: the engine of PS's fast path (docs/design.md §5.2).

Greedy decoding from a context ``c`` appends argmax(logits) token by token. A teacher-forced pass
over ``c + g`` (any guess ``g``) gives the argmax after every position at once, so wherever the
argmax after ``c + g[:i]`` equals ``g[i]`` the decoder walks along ``g``; the first argmax that
differs is the token it writes instead, and nothing after that is known (:func:`read_greedy`).
With ``c`` a prefix of the prompt + answer and ``g`` the rest of it, one pass over each row's
prompt + answer serves every prefix length of that row.

The pass and ``model.generate`` compute the same logits in another order (padding, a KV cache,
another batch), so they agree to float rounding only: a token is trusted only when its top-1 logit
beats the runner-up by ``margin`` (:data:`MARGINS`, per dtype); where it does not, the tokens are
unknown from there on and a real generation decides (:func:`continue_greedy`, from the context plus
the tokens already known, stopping each row as soon as its verdict is certain).

Deciding a verdict from the first tokens of a generation needs what every longer generation
keeps: :func:`settled_text` (the decoded text, less an unfinished character and what a clean-up of
spaces may still change) and :func:`settled_tokens` (the tokens of a re-encoding before its last
word and the whitespace ahead of it).

Greedy generation is the argmax only when no logits processor is configured (repetition penalty,
suppressed tokens, a minimum length, beams, ...): :func:`fast_path_blockers` lists what the model's
``generation_config`` sets; PS then falls back to its reference search.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ._common import model_device

# the smallest top-1 - top-2 logit gap trusted to survive another order of the same float ops
MARGINS = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 0.5, torch.bfloat16: 1.0}
TF32_MARGIN = 0.25  # float32 matmuls run in TF32 on a GPU that allows it
LOGIT_BYTES = 1 << 28  # logits of one teacher-forced batch (rows × positions × vocabulary × 4 bytes)
PAD_WASTE = 1.1  # a teacher-forced batch holds at most this many padded positions per real one
SHARED_MIN = 8  # a prefix every row shares runs once from this many tokens on

# generation_config fields whose non-neutral value makes greedy decoding differ from the argmax
_NEUTRAL = {
    "num_beams": (None, 1), "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "exponential_decay_length_penalty": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "stop_strings": (None,), "max_time": (None,), "penalty_alpha": (None,),
    "dola_layers": (None,), "constraints": (None,), "force_words_ids": (None,), "token_healing": (None, False),
    "prompt_lookup_num_tokens": (None,), "num_return_sequences": (None, 1),
}


def fast_path_blockers(model) -> List[str]:
    """The ``generation_config`` settings under which greedy decoding is not the logits' argmax."""
    cfg = getattr(model, "generation_config", None)
    if cfg is None:
        return []
    return [f"{k}={getattr(cfg, k)!r}" for k, ok in _NEUTRAL.items()
            if hasattr(cfg, k) and getattr(cfg, k) not in ok and getattr(cfg, k) != []]


def default_margin(model) -> float:
    """:data:`MARGINS` for the model's floating-point dtype (float32 matmuls allowed to run in
    TF32 or lower count as that precision)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    if dtype == torch.float32 and (torch.get_float32_matmul_precision() != "highest" or (
            param is not None and param.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)):
        return TF32_MARGIN
    return MARGINS.get(dtype, MARGINS[torch.bfloat16])


def stop_ids_of(model, extra: Sequence[Optional[int]] = ()) -> frozenset:
    """Token ids at which ``model.generate`` ends a row: its config's EOS (one id or several) and ``extra``."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    return frozenset(int(i) for i in ids + [e for e in extra if e is not None])


@torch.no_grad()
def greedy_table(model, seqs: Sequence[Sequence[int]], pad: int,
                 first: Optional[Sequence[int]] = None) -> List[Tuple[List[int], List[float]]]:
    """For each sequence: the argmax token after every position and its margin (top-1 minus top-2
    logit), from teacher-forced passes; positions before ``first[i]`` (none read) may be left out
    (their entries are then -1 with margin -inf: never trusted).

    Batches are length-sorted, right-padded, at most :data:`PAD_WASTE` padding and
    :data:`LOGIT_BYTES` of logits; a model whose forward takes ``logits_to_keep`` computes the
    logits from the batch's first position read on only; a prefix shared by every sequence (a chat
    template's system prompt) runs once, its KV cache reused by every batch."""
    out: List[Optional[Tuple[List[int], List[float]]]] = [None] * len(seqs)
    first = [0] * len(seqs) if first is None else [min(max(0, f), len(q) - 1) for f, q in zip(first, seqs)]
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else 1 << 16
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    shared, cache = _shared_prefix(model, seqs, first)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    s = 0
    while s < len(order):
        e, real = s + 1, len(seqs[order[s]])
        while e < len(order):
            n = len(seqs[order[e]])
            if (e - s + 1) * n > PAD_WASTE * (real + n) or (e - s + 1) * n * vocab * 4 > LOGIT_BYTES:
                break
            real, e = real + n, e + 1
        chunk = order[s:e]
        p0 = min(first[i] for i in chunk) if keep_arg else shared
        arg, gap = _argmax_gap(model, [seqs[i][shared:] for i in chunk], pad, shared, p0, cache, keep_arg)
        for r, i in enumerate(chunk):
            n = len(seqs[i])
            out[i] = ([-1] * p0 + arg[r, :n - p0].tolist(), [-math.inf] * p0 + gap[r, :n - p0].tolist())
        s = e
    return out  # type: ignore[return-value]


def _shared_prefix(model, seqs, first):
    """(length, KV cache) of the prefix every sequence shares (none read), when there is one worth it."""
    n = min(first) if len(seqs) > 1 else 0  # the positions read must stay in the suffixes
    for q in seqs[1:]:
        n = next((j for j, (a, b) in enumerate(zip(seqs[0][:n], q[:n])) if a != b), min(n, len(q)))
    if n < SHARED_MIN:
        return 0, None
    prefix = torch.tensor([list(seqs[0][:n])], device=model_device(model))
    out = model(input_ids=prefix, use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers 5.x renamed it
    if not hasattr(cache, "batch_repeat_interleave"):
        return 0, None
    return n, cache


def _argmax_gap(model, rows, pad: int, shared: int, p0: int, cache, keep_arg: bool):
    """Argmax and top-1 - top-2 gap at absolute positions p0.. of right-padded ``rows`` that follow
    ``shared`` cached positions."""
    device = model_device(model)
    T = max(len(q) for q in rows)
    x = torch.full((len(rows), T), pad, dtype=torch.long)
    att = torch.zeros((len(rows), shared + T), dtype=torch.long)
    att[:, :shared] = 1
    for r, q in enumerate(rows):
        x[r, :len(q)] = torch.tensor(list(q), dtype=torch.long)
        att[r, shared: shared + len(q)] = 1
    kw = {"logits_to_keep": shared + T - p0} if keep_arg else {}
    if cache is not None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kw[name] = copy.deepcopy(cache)
        kw[name].batch_repeat_interleave(len(rows))
    logits = model(input_ids=x.to(device), attention_mask=att.to(device), **kw).logits
    if not keep_arg:
        logits = logits[:, p0 - shared:]
    top = logits.float().topk(2, dim=-1)
    return top.indices[..., 0].cpu(), (top.values[..., 0] - top.values[..., 1]).cpu()


def read_greedy(seq: Sequence[int], table: Tuple[List[int], List[float]], ctx_len: int, *, margin: float,
                stop_ids: frozenset, budget: int) -> Tuple[List[int], bool]:
    """The new tokens that greedy decoding from ``seq[:ctx_len]`` is known to write, read off the
    teacher-forced ``table`` of ``seq``, and whether the generation certainly ends there (a stop
    token or ``budget`` new tokens). Known: every token whose margin is at least ``margin``, while
    the decoder stays on ``seq``; the first token off ``seq`` is known, the ones after it are not."""
    arg, gap = table
    out: List[int] = []
    if ctx_len < 1:
        return out, False  # nothing to condition on: left to generation (which refuses it)
    p = ctx_len - 1
    while len(out) < budget:
        if gap[p] < margin:
            return out, False
        tok = arg[p]
        out.append(tok)
        if tok in stop_ids:
            return out, True
        if p + 1 >= len(seq) or seq[p + 1] != tok:
            return out, len(out) >= budget
        p += 1
    return out, True


def decode_settle(tokenizer) -> int:
    """How many trailing characters of a decoded token prefix may still change when tokens are
    appended: 0 for concatenative decoders (byte-level, Metaspace, WordPiece without cleanup; an
    unfinished UTF-8 character is stripped separately), 4 when spaces before punctuation are
    cleaned up (" n't" is the longest pattern)."""
    cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is not None:
        state = json.loads(backend.decoder.__getstate__())
        cleanup = cleanup or '"cleanup": true' in json.dumps(state)  # e.g. WordPiece(cleanup=True)
    return 4 if cleanup else 0


def settled_text(tokenizer, ids: Sequence[int], settle: int) -> str:
    """The part of ``decode(ids)`` that every decoding of ``ids + more`` starts with."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")  # an unfinished character
    return text[:len(text) - settle] if settle else text


class Encoder:
    """``tokenizer(text, add_special_tokens=True)``: ids and offsets, through the tokenizer's Rust
    backend where that gives the same on the texts it was checked with (a transformers call costs
    ~0.3 ms of Python, and the fast path encodes at every probe), else through transformers."""

    def __init__(self, tokenizer, check: Sequence[str]):
        self.tokenizer, self.backend = tokenizer, None
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None and check:
            ref = tokenizer(list(check), add_special_tokens=True, return_offsets_mapping=True)
            got = backend.encode_batch(list(check), add_special_tokens=True)
            if all(e.ids == list(i) and [tuple(x) for x in e.offsets] == [tuple(x) for x in o]
                   for e, i, o in zip(got, ref["input_ids"], ref["offset_mapping"])):
                self.backend = backend

    def ids(self, text: str) -> List[int]:
        return self.backend.encode(text).ids if self.backend else self.tokenizer(text)["input_ids"]

    def with_offsets(self, text: str):
        if self.backend:
            enc = self.backend.encode(text)
            return enc.ids, enc.offsets
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]


def settled_tokens(tokenizer, text: str, encoder: Optional[Encoder] = None) -> Optional[List[int]]:
    """The leading tokens of ``encode(text)`` that ``encode(text + more)`` keeps for any ``more``
    (special tokens added), or None without offsets (a slow tokenizer).

    Pre-tokenizers split at word boundaries (a word with the space before it, GPT-2 and
    SentencePiece, or after it, the embedded tokenizer) and BPE never merges across them, so only
    the tokens reaching into the last word of ``text`` or into the whitespace before it can change;
    a token that ends a word and carries part of the whitespace after it (the embedded tokenizer's
    "word ") is settled once a word follows that whitespace."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    word = len(text)
    while word and not text[word - 1].isspace():  # the last, maybe unfinished, word
        word -= 1
    cut = word
    while cut and text[cut - 1].isspace():  # the whitespace before it
        cut -= 1
    ids, offsets = (encoder or Encoder(tokenizer, ())).with_offsets(text)
    special = set(tokenizer.all_special_ids)
    keep = 0
    for tok, (start, end) in zip(ids, offsets):
        if start >= end and tok not in special:
            break  # an empty span (trimmed offsets of a whitespace token) says nothing about where it ends
        if end > cut and not (start < cut and end <= word < len(text)):
            break
        keep += 1
    return list(ids[:keep])


def continue_greedy(model, states: Sequence[Sequence[int]], budgets: Sequence[int], *, stop_ids: frozenset,
                    pad: int, batch_size: int,
                    decided: Callable[[int, List[int]], bool]) -> List[Tuple[List[int], bool]]:
    """Greedy generation from every state (token ids) with ``budgets[r]`` new tokens at most, in
    length-sorted left-padded batches; a row stops at a stop token, at its budget, or as soon as
    ``decided(r, new_tokens)``. Returns each row's new tokens up to its stop, and whether it ended
    as the generation itself would (a stop token or the budget) rather than by ``decided``."""
    from transformers import StoppingCriteria, StoppingCriteriaList  # heavy: keeps `import fastgeffect.eval` light

    class _Stop(StoppingCriteria):
        def __init__(self, rows, T):
            self.rows, self.T, self.at = rows, T, {}

        def __call__(self, input_ids, scores=None, **kw):
            for r, i in enumerate(self.rows):
                if i in self.at:
                    continue
                new = input_ids[r, self.T:].tolist()
                if new[-1] in stop_ids or len(new) >= budgets[i] or decided(i, new):
                    self.at[i] = len(new)
            return torch.tensor([i in self.at for i in self.rows], dtype=torch.bool, device=input_ids.device)

    out: List[Optional[Tuple[List[int], bool]]] = [None] * len(states)
    device = model_device(model)
    order = sorted(range(len(states)), key=lambda i: len(states[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        T = max(len(states[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, T - len(states[i]):] = torch.tensor(list(states[i]), dtype=torch.long)
            att[r, T - len(states[i]):] = 1
        stop = _Stop(chunk, T)
        kw = {"eos_token_id": sorted(stop_ids)} if stop_ids else {}
        gen = model.generate(input_ids=x.to(device), attention_mask=att.to(device), do_sample=False,
                             max_new_tokens=max(budgets[i] for i in chunk), pad_token_id=pad, use_cache=True,
                             temperature=None, top_p=None, top_k=None,
                             stopping_criteria=StoppingCriteriaList([stop]), **kw)
        for r, i in enumerate(chunk):
            new = gen[r, T: T + stop.at.get(i, budgets[i])].tolist()
            out[i] = (new, bool(new) and (new[-1] in stop_ids or len(new) >= budgets[i]))
    return out  # type: ignore[return-value]


def guess_ids(tokenizer, ctx_text: str, ctx_ids: Sequence[int], rest: str, add_special: bool) -> List[int]:
    """Tokens that would follow ``ctx_ids`` if the model wrote ``rest``: a guess to teacher-force
    (any guess is exact; a good one lets one pass read more tokens)."""
    ids = tokenizer(ctx_text + rest, add_special_tokens=add_special)["input_ids"]
    if ids[:len(ctx_ids)] == list(ctx_ids):
        return ids[len(ctx_ids):]
    return tokenizer(rest, add_special_tokens=False)["input_ids"]


def read_own(model, seqs_ctx: Sequence[Tuple[List[int], List[int]]], pad: int, *, margin: float,
             stop_ids: frozenset, budgets: Sequence[int]) -> List[Tuple[List[int], bool]]:
    """:func:`read_greedy` for contexts that are no prefix of a row's teacher-forced text: one pass
    over each ``context + guess``."""
    seqs = [list(c) + list(g) for c, g in seqs_ctx]
    tables = greedy_table(model, seqs, pad, [len(c) - 1 for c, _ in seqs_ctx])
    return [read_greedy(s, t, len(c), margin=margin, stop_ids=stop_ids, budget=b)
            for s, t, (c, _), b in zip(seqs, tables, seqs_ctx, budgets)]
