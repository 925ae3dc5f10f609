"""The ``paper`` and ``uwc-linear`` PS protocols from teacher-forced passes (docs/design.md §5.2).

Same searches as the reference (eval/ps_protocols.py): ``paper`` replays :func:`paper_search`
batch by batch (its budget from the batch's longest context at every step, its stop rule), and
``uwc-linear``'s answer is the first k whose continuation matches, so its probes may be asked in
any order: a window of k per row at a time, later windows only for rows without a match yet.

Each probe's generation is known in part (eval/ps_teacher_forced.py). Its verdict is decided
without generating when the known tokens end the generation (a stop token, the budget: the
reference's own match is computed on them) or when no continuation can change it:

* ``uwc-linear`` matches the decoded continuation's first line as a string: once the settled
  decoded text holds a newline the line is final; before, a settled text that is no prefix of
  the line required already fails it.
* ``paper`` re-encodes the decoded output and compares its tokens ``[mid:len(full)]`` with the
  full text's: the re-encoding's settled leading tokens (those before the last word, which no
  appended text changes) decide when they already differ from the full text's in that range, or
  cover it all.

Everything else is generated, continuing from the known tokens, each row stopping as soon as
those rules decide it (or as the reference's generation ends).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ._common import check_records
from .ps_protocols import (
    FAMILIES,
    PAPER_BATCH,
    PAPER_MAX_LENGTH,
    PS_PROMPT,
    UWC_LINEAR_MAX_LENGTH,
    paper_match,
    paper_rows,
    paper_search,
    uwc_match,
    uwc_prompt,
)
from .ps_teacher_forced import (
    Encoder,
    continue_greedy,
    decode_settle,
    greedy_table,
    guess_ids,
    read_greedy,
    read_own,
    settled_text,
    settled_tokens,
    stop_ids_of,
)

UWC_WINDOW = 4  # uwc-linear: k per row in a row's first round of probes; doubled every round


def paper_decide(tokenizer, ctx: List[int], gen: List[int], complete: bool, full: Sequence[int], mid: int,
                 settle: int, encoder: Encoder) -> Optional[bool]:
    """Table 1's match of a row whose generation starts with ``gen`` (all of it when ``complete``),
    or None while appended tokens could still change it."""
    if complete:
        return paper_match(tokenizer, ctx + gen, full, mid, encoder.ids)
    text = settled_text(tokenizer, ctx + gen, settle)
    stable = settled_tokens(tokenizer, text, encoder)
    if stable is None:
        return None
    s = len(stable)
    hi = min(s, len(full))
    if stable[mid:hi] != list(full[mid:hi]):
        return False
    if s >= len(full):
        return True
    if s >= mid and _next_token_differs(tokenizer, stable, full[s], text, settle, encoder):
        return False
    return None


def _next_token_differs(tokenizer, stable: List[int], token: int, text: str, settle: int, encoder: Encoder) -> bool:
    """Whether the re-encoded output's token after its settled tokens ``stable`` cannot be ``token``:
    the text it would decode to disagrees with the known text. Decoding the re-encoding gives the
    decoded output back (checked on the known text), so both are prefixes of the same string."""
    with_token = settled_text(tokenizer, stable + [token], settle)
    n = min(len(with_token), len(text))
    if with_token[:n] == text[:n]:
        return False
    return tokenizer.decode(encoder.ids(text), skip_special_tokens=True) == text


def uwc_decide(tokenizer, gen: List[int], complete: bool, answer: str, words: Sequence[str], k: int, phi: bool,
               settle: int) -> Optional[bool]:
    """uwc-linear's match of a continuation that starts with ``gen`` (all of it when ``complete``),
    or None while appended tokens could still change it."""
    if complete:
        return uwc_match(tokenizer.decode(gen, skip_special_tokens=True), answer, words, k, phi)
    if k == 0:
        need: Optional[str] = answer
    else:
        head = " ".join(words[:k]) + ("" if phi else " ")
        need = answer[len(head):] if answer.startswith(head) else None
    if need is None:
        return False  # given + glue is already no prefix of the answer
    text = settled_text(tokenizer, gen, settle)
    view = text[1:] if (k == 0 and phi) else text  # Phi's bare-prompt rule drops the first character
    if "\n" in view:
        return view.split("\n")[0] == need
    return False if not need.startswith(view) else None


def _counts() -> Dict[str, int]:
    return {"generate_calls": 0, "probes": 0, "generated_probes": 0}


def _settle_open(model, probes, verdicts, known, count, decide, *, stop_ids, pad, batch_size):
    """Generates the probes whose verdict is open (None), each from its context plus its known
    tokens; ``probes[r] = (ctx, budget, ctx_text)``, ``decide(r, gen, complete)``. Fills ``verdicts``."""
    open_ = [r for r, v in enumerate(verdicts) if v is None]
    if not open_:
        return
    count["generate_calls"] += 1
    count["generated_probes"] += len(open_)
    gens = continue_greedy(model, [probes[r][0] + known[r] for r in open_],
                           [probes[r][1] - len(known[r]) for r in open_], stop_ids=stop_ids, pad=pad,
                           batch_size=batch_size,
                           decided=lambda j, new: decide(open_[j], known[open_[j]] + new, False) is not None)
    for r, (new, complete) in zip(open_, gens):
        verdicts[r] = decide(r, known[r] + new, complete)


def _known(model, tokenizer, probes, row_of, fulls, full_texts, tables, *, margin, stop_ids, pad):
    """Known generated tokens (and whether they end the generation) of each probe ``(ctx, budget,
    ctx_text)``: read off its row's pass when the context is a token prefix of the row's full
    text, else off a pass over the context and a guess."""
    out: List = [None] * len(probes)
    own = []
    for r, (ctx, budget, _) in enumerate(probes):
        f = fulls[row_of[r]]
        if f[:len(ctx)] == ctx:
            out[r] = read_greedy(f, tables[row_of[r]], len(ctx), margin=margin, stop_ids=stop_ids, budget=budget)
        else:
            own.append(r)
    if own:
        pairs = []
        for r in own:
            ctx, _, text = probes[r]
            full_text = full_texts[row_of[r]]
            rest = full_text[len(text):] if full_text.startswith(text) else ""
            pairs.append((ctx, guess_ids(tokenizer, text, ctx, rest, True)))
        for r, got in zip(own, read_own(model, pairs, pad, margin=margin, stop_ids=stop_ids,
                                        budgets=[probes[r][1] for r in own])):
            out[r] = got
    return out


def _mark_moot(pending, verdicts) -> None:
    """Open probes after a row's first decided match are never read (the row's answer is an
    earlier k): marked False so that only the open probes before it are generated."""
    matched = set()
    for r, (i, _) in enumerate(pending):
        if verdicts[r] is None and i in matched:
            verdicts[r] = False
        elif verdicts[r] is True:
            matched.add(i)


def paper_ps_fast(model, tokenizer, records: Sequence[dict], *, margin: float, question_key: str = "question",
                  answer_key: str = "answer", batch_size: int = PAPER_BATCH,
                  max_length: int = PAPER_MAX_LENGTH) -> Dict[str, object]:
    """:func:`paper_ps_scores` (same keys, same numbers) with ``generate_calls`` the generation
    calls made, plus ``search_steps``, ``probes`` and ``generated_probes``."""
    check_records(records, (question_key, answer_key), f"PS ({question_key})")
    pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the paper's PS protocol pads with EOS: the tokenizer has no EOS token")
    stop_ids, settle = stop_ids_of(model), decode_settle(tokenizer)  # generate() stops at the config's EOS only
    right, starts, lengths, steps, count = [], [], [], 0, _counts()
    for s in range(0, len(records), batch_size):
        pairs = [(str(r[question_key]), str(r[answer_key])) for r in records[s: s + batch_size]]
        fulls, qs = paper_rows(tokenizer, pairs)
        full_texts = [PS_PROMPT.full(q, a) for q, a in pairs]
        encoder = Encoder(tokenizer, full_texts)
        tables = greedy_table(model, fulls, pad, [q - 1 for q in qs])  # mid never goes below the question's length
        cache: Dict[tuple, bool] = {}

        def step(mid: List[int]) -> List[bool]:
            texts = tokenizer.batch_decode([f[:m] for f, m in zip(fulls, mid)], skip_special_tokens=True)
            ctxs = tokenizer(texts, add_special_tokens=True)["input_ids"]  # batched: the same ids as _encode
            budget = max(1, max_length - max(len(c) for c in ctxs))  # the padded batch's, as generate() counts
            keys = [(i, m, tuple(c), budget) for i, (m, c) in enumerate(zip(mid, ctxs))]
            rows = [i for i, key in enumerate(keys) if key not in cache]
            probes = [(ctxs[i], budget, texts[i]) for i in rows]
            known = _known(model, tokenizer, probes, rows, fulls, full_texts, tables, margin=margin,
                           stop_ids=stop_ids, pad=pad)

            def decide(r, gen, complete):
                i = rows[r]
                return paper_decide(tokenizer, ctxs[i], gen, complete, fulls[i], mid[i], settle, encoder)
            verdicts = [decide(r, g, c) for r, (g, c) in enumerate(known)]
            count["probes"] += len(rows)
            _settle_open(model, probes, verdicts, [g for g, _ in known], count, decide, stop_ids=stop_ids, pad=pad,
                         batch_size=batch_size)
            cache.update((keys[i], v) for i, v in zip(rows, verdicts))
            return [cache[key] for key in keys]

        r, c = paper_search(fulls, qs, step)
        right, starts, lengths, steps = right + r, starts + qs, lengths + [len(f) for f in fulls], steps + c
    scores = [1.0 - (r - q) / (f - q) for r, q, f in zip(right, starts, lengths)]
    return {"ps": sum(scores) / len(scores), "scores": scores, "right": right, "question_tokens": starts,
            "full_tokens": lengths, "search_steps": steps, **count}


def uwc_linear_ps_fast(model, tokenizer, records: Sequence[dict], *, family: str, margin: float,
                       question_key: str = "question", answer_key: str = "answer", batch_size: int = 32,
                       max_length: int = UWC_LINEAR_MAX_LENGTH) -> Dict[str, object]:
    """:func:`uwc_linear_ps_scores` (same keys, same numbers), plus ``generate_calls``, ``probes``
    and ``generated_probes``; ``batch_size`` batches the generations of probes left open."""
    if family not in FAMILIES:
        raise ValueError(f"uwc-linear PS: unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    check_records(records, (question_key, answer_key), f"PS ({question_key})")
    pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the uwc-linear PS protocol pads with EOS: the tokenizer has no EOS token")
    phi = family == "phi"
    stop_ids, settle = stop_ids_of(model), decode_settle(tokenizer)
    questions = [str(r[question_key]) for r in records]
    answers = [str(r[answer_key]) for r in records]
    words = [a.split(" ") for a in answers]
    full_texts = [PS_PROMPT.full(q, a) for q, a in zip(questions, answers)]
    fulls = tokenizer(full_texts, add_special_tokens=True)["input_ids"]  # batched: the same ids as _encode
    prompts = tokenizer([PS_PROMPT.prompt(q) for q in questions], add_special_tokens=True)["input_ids"]
    tables = greedy_table(model, fulls, pad, [len(p) - 1 for p in prompts])
    given: List[Optional[int]] = [None] * len(records)
    start, window, count = [0] * len(records), [UWC_WINDOW] * len(records), _counts()
    while any(g is None for g in given):
        pending = [(i, k) for i in range(len(records)) if given[i] is None
                   for k in range(start[i], min(start[i] + window[i], len(words[i]) + 1))]
        texts = [uwc_prompt(questions[i], words[i], k) for i, k in pending]
        ctxs = tokenizer(texts, add_special_tokens=True)["input_ids"]
        probes = [(c, max(1, max_length - len(c)), t) for c, t in zip(ctxs, texts)]  # one row per call: no padding
        known = _known(model, tokenizer, probes, [i for i, _ in pending], fulls, full_texts, tables, margin=margin,
                       stop_ids=stop_ids, pad=pad)

        def decide(r, gen, complete):
            i, k = pending[r]
            return uwc_decide(tokenizer, gen, complete, answers[i], words[i], k, phi, settle)
        verdicts = [decide(r, g, c) for r, (g, c) in enumerate(known)]
        count["probes"] += len(pending)
        _mark_moot(pending, verdicts)
        _settle_open(model, probes, verdicts, [g for g, _ in known], count, decide, stop_ids=stop_ids, pad=pad,
                     batch_size=batch_size)
        for r, (i, k) in enumerate(pending):
            if given[i] is None and verdicts[r]:
                given[i] = k
        for i in {i for i, _ in pending}:
            if given[i] is None:
                start[i] += window[i]
                window[i] *= 2
                if start[i] > len(words[i]):
                    given[i] = len(words[i])
    sizes = [len(w) for w in words]
    scores = [1.0 - k / n for k, n in zip(given, sizes)]
    return {"ps": sum(scores) / len(scores), "scores": scores, "given_words": given, "num_words": sizes, **count}
