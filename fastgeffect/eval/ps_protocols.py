"""PS as the public code released with the paper and with UWC computes it (docs/design.md, "PS protocols").

Both protocols prompt with ``### Question: {q}\\n ### Answer:`` whatever the model was fine-tuned
with (``PS_PROMPT``), call ``model.generate`` greedily with a *total* ``max_length`` (prompt
included) and EOS as padding, and ignore the caller's template.

``paper`` (Table 1): ``evaluation_everything.py`` of tmlr-group/G-effect (identical in
tmlr-group/Unlearning-with-Control; both READMEs give it as the PS command). Token-level binary
search per batch of 50 rows: ``full = "### Question: {q}\\n ### Answer: {a}"`` tokenised with
special tokens (``f`` tokens), bounds ``[len(tokens(q)), f]`` with ``q`` the *bare* question; each
step decodes ``full[:mid]``, re-encodes it, generates (left-padded batch, ``max_length=200``),
decodes the whole output, re-encodes it, and calls ``mid`` a match when its tokens
``[mid:f]`` are a prefix of ``full[mid:]`` (a generation that stops early matches); match → right
bound = mid, else left bound = mid; stop when no row's mid moves (or after ``max(f − q)`` steps).
PS = 1 − (right − q)/(f − q). Since the left bound is the bare question's length, the template's
own tokens count as "given": a perfectly memorised sample scores ~0.8, not 1.

``uwc-linear``: ``phi_exact.py`` / ``llama_exact.py`` (``*_perturb.py`` with the paraphrased
question) of tmlr-group/Unlearning-with-Control. One row at a time, ``max_length=150``; the new
tokens are decoded and cut at the first newline. First the bare prompt: if its continuation (Phi:
minus its first character) equals the answer exactly, PS = 1. Else with ``w = answer.split(" ")``,
for k = 1..n the prompt plus ``" " + " ".join(w[:k])``: the first k whose continuation completes
the answer *as a string* (Phi: ``given + cont``; Llama: ``given + " " + cont``) gives PS = 1 − k/n;
none: PS = 0. The scripts divide by a hard-coded 40 = their sample count; we average.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.templates import Template
from ._common import check_records, model_device

PS_PROTOCOLS = ("paper", "uwc-linear", "clean")  # "clean": fastgeffect's own (eval/ps.py)
PS_PROMPT = Template("ps-public-code", "### Question: ", "\n ### Answer:", " ")
PAPER_BATCH, PAPER_MAX_LENGTH = 50, 200
UWC_LINEAR_MAX_LENGTH = 150
FAMILIES = ("phi", "llama2")  # uwc-linear's string rules differ per model family


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _generate(model, rows: Sequence[Sequence[int]], pad: int, max_length: int) -> List[List[int]]:
    """Greedy ``generate`` on a left-padded batch (pad = EOS) as the public code calls it; the
    rows come back whole (padding, prompt and new tokens).

    ``max_length`` counts the padded prompt. When the prompt already fills it, transformers before
    4.41 warned and generated one token (later versions raise): one token, as the code then ran."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        att[i, T - len(r):] = 1
    device = model_device(model)
    out = model.generate(ids.to(device), attention_mask=att.to(device), max_new_tokens=max(1, max_length - T),
                         do_sample=False, use_cache=True, pad_token_id=pad)
    return out.tolist()


def paper_match(tokenizer, out: Sequence[int], full: Sequence[int], mid: int,
                encode: Optional[Callable[[str], List[int]]] = None) -> bool:
    """Table 1's match of one row: the whole output (padding, prompt, new tokens) decoded and
    re-encoded (``encode``: any function giving ``_encode``'s ids); its tokens ``[mid:len(full)]``
    must be a prefix of ``full[mid:]``."""
    text = tokenizer.decode(list(out), skip_special_tokens=True)
    pred = encode(text) if encode is not None else _encode(tokenizer, text)
    got = pred[mid:len(full)]
    return got == list(full[mid:mid + len(got)])


def paper_search(fulls: Sequence[Sequence[int]], starts: Sequence[int],
                 step: Callable[[List[int]], List[bool]]) -> Tuple[List[int], int]:
    """Table 1's search over one batch: ``step(mid)`` matches every row at its ``mid``; returns the
    right bounds and the number of steps."""
    left, right = list(starts), [len(f) for f in fulls]
    old, calls = None, 0
    for _ in range(max(r - s for s, r in zip(starts, right))):
        mid = [(a + b) // 2 for a, b in zip(left, right)]
        if mid == old:
            break
        match = step(mid)
        calls += 1
        for i, (m, ok) in enumerate(zip(mid, match)):
            if ok:
                right[i] = m
            else:
                left[i] = m
        old = mid
    return right, calls


def paper_rows(tokenizer, pairs) -> Tuple[List[List[int]], List[int]]:
    """The full prompt + answer tokens of each (question, answer) pair and the bare question's length."""
    return [_encode(tokenizer, PS_PROMPT.full(q, a)) for q, a in pairs], [len(_encode(tokenizer, q)) for q, _ in pairs]


def _paper_batch(model, tokenizer, pairs, pad: int, max_length: int):
    """Right bounds of one batch of (question, answer) pairs, and the generate calls made."""
    fulls, starts = paper_rows(tokenizer, pairs)  # the bare question, not the prompt

    def step(mid):
        texts = tokenizer.batch_decode([f[:m] for f, m in zip(fulls, mid)], skip_special_tokens=True)
        out = _generate(model, [_encode(tokenizer, t) for t in texts], pad, max_length)
        return [paper_match(tokenizer, o, f, m) for o, f, m in zip(out, fulls, mid)]

    right, calls = paper_search(fulls, starts, step)
    return right, starts, [len(f) for f in fulls], calls


def paper_ps_scores(model, tokenizer, records: Sequence[dict], *, question_key: str = "question",
                    answer_key: str = "answer", batch_size: int = PAPER_BATCH,
                    max_length: int = PAPER_MAX_LENGTH) -> Dict[str, object]:
    """PS under the ``paper`` protocol: ``{"ps", "scores", "right", "question_tokens", "full_tokens",
    "generate_calls"}`` (``right``: the search's final right bound per record, in tokens)."""
    check_records(records, (question_key, answer_key), f"PS ({question_key})")
    pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the paper's PS protocol pads with EOS: the tokenizer has no EOS token")
    right, starts, lengths, calls = [], [], [], 0
    for s in range(0, len(records), batch_size):
        pairs = [(str(r[question_key]), str(r[answer_key])) for r in records[s: s + batch_size]]
        r, q, f, c = _paper_batch(model, tokenizer, pairs, pad, max_length)
        right, starts, lengths, calls = right + r, starts + q, lengths + f, calls + c
    scores = [1.0 - (r - q) / (f - q) for r, q, f in zip(right, starts, lengths)]
    return {"ps": sum(scores) / len(scores), "scores": scores, "right": right, "question_tokens": starts,
            "full_tokens": lengths, "generate_calls": calls}


def uwc_prompt(question: str, words: Sequence[str], k: int) -> str:
    """uwc-linear's context with ``k`` answer words given (0: the bare prompt)."""
    return PS_PROMPT.prompt(question) if k == 0 else PS_PROMPT.full(question, " ".join(words[:k]))


def uwc_match(cont: str, answer: str, words: Sequence[str], k: int, phi: bool) -> bool:
    """Whether the continuation ``cont`` (decoded new tokens) completes the answer under uwc-linear's
    string rules: the bare prompt's (Phi: minus its first character) must be the answer; with k
    words given, given + continuation (Llama: joined by a space) must be, both cut at a newline."""
    if k == 0:
        return (cont[1:] if phi else cont).split("\n")[0] == answer
    return " ".join(words[:k]) + ("" if phi else " ") + cont.split("\n")[0] == answer


def uwc_linear_ps_scores(model, tokenizer, records: Sequence[dict], *, family: str, question_key: str = "question",
                         answer_key: str = "answer", max_length: int = UWC_LINEAR_MAX_LENGTH) -> Dict[str, object]:
    """PS under the ``uwc-linear`` protocol: ``{"ps", "scores", "given_words", "num_words"}``
    (``given_words``: k, 0 when the bare prompt suffices, n when nothing does)."""
    if family not in FAMILIES:
        raise ValueError(f"uwc-linear PS: unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    check_records(records, (question_key, answer_key), f"PS ({question_key})")
    pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the uwc-linear PS protocol pads with EOS: the tokenizer has no EOS token")
    phi = family == "phi"  # Phi decodes the continuation's leading space, Llama's decoder drops it

    def continuation(text: str) -> str:
        ids = _encode(tokenizer, text)
        new = _generate(model, [ids], pad, max_length)[0][len(ids):]
        return tokenizer.decode(new, skip_special_tokens=True)

    given, sizes = [], []
    for r in records:
        question, answer = str(r[question_key]), str(r[answer_key])
        words = answer.split(" ")
        k = next((k for k in range(len(words) + 1)
                  if uwc_match(continuation(uwc_prompt(question, words, k)), answer, words, k, phi)), len(words))
        given.append(k)
        sizes.append(len(words))
    scores = [1.0 - k / n for k, n in zip(given, sizes)]
    return {"ps": sum(scores) / len(scores), "scores": scores, "given_words": given, "num_words": sizes}
