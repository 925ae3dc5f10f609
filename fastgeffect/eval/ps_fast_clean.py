"""The ``clean`` PS protocol from teacher-forced passes (docs/design.md §5.2, "fast path").

The reference (eval/ps_clean.py) runs :func:`prefix_search` and answers every step by generating.
Here the same search asks the same (row, m) checks in the same order; each is answered from the
tokens greedy decoding is known to write (eval/ps_teacher_forced.py): one pass over each row's
prompt + answer serves every m whose context is a token prefix of it, a pass over the context
plus a guess serves the others. The reference's own stopping rule (:meth:`Job.stops`) is replayed
on those tokens: where it ends the row within them, the reference's verdict on them is the verdict
(the tokens after a stop never count). Only the checks it does not end are generated, in one
batched call per step, continuing from the known tokens with the same rule.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ..data.templates import Template
from ._common import pad_id
from .ps_clean import Job, build_jobs, clean_result, clean_rows, prefix_search
from .ps_teacher_forced import continue_greedy, greedy_table, guess_ids, read_greedy, read_own, stop_ids_of


def scan_verdict(tokenizer, job: Job, gen: Sequence[int], stop_ids: frozenset) -> Optional[bool]:
    """The reference's verdict on ``job`` if greedy decoding writes ``gen`` (a known prefix of its
    tokens), or None when the reference would not have stopped the row within ``gen``."""
    if not gen:
        return None
    eos = tokenizer.eos_token_id
    decoded = tokenizer.batch_decode([list(job.tail) + list(gen[:i]) for i in range(1, len(gen) + 1)],
                                     skip_special_tokens=True)
    for i, full in enumerate(decoded, start=1):
        new = gen[:i]
        text = job.from_decoded(tokenizer, full, new)
        if new[-1] in stop_ids or job.stops(tokenizer, new, eos, text):
            return job.verdict(text)
    return None


def clean_ps_fast(model, tokenizer, template: Template, records: Sequence[dict], question_key: str,
                  answer_key: str, search: str, batch_size: int, margin: float) -> Dict[str, object]:
    """``clean`` PS with the reference's m and score on every row; also ``"search_steps"``,
    ``"probes"`` (checks asked) and ``"generated_probes"`` (checks that needed a generation)."""
    bases, words, add_special = clean_rows(tokenizer, template, records, question_key, answer_key)
    fulls = [tokenizer(b + " ".join(w), add_special_tokens=add_special)["input_ids"] for b, w in zip(bases, words)]
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    # generate() ends a row at the config's EOS (greedy_generate adds the tokenizer's when it has
    # none) and the reference's stopper at the tokenizer's
    stop_ids = stop_ids_of(model, [eos])
    shortest = [len(j.ids) for j in build_jobs(tokenizer, bases, words, range(len(words)), [0] * len(words),
                                                add_special, fulls)]
    tables = greedy_table(model, fulls, pad, [n - 1 for n in shortest])  # m = 0: the shortest context
    count = {"generate_calls": 0, "probes": 0, "generated_probes": 0}

    def known_tokens(rows: List[int], jobs: List[Job]):
        known: List = [None] * len(jobs)
        own = []
        for r, (i, job) in enumerate(zip(rows, jobs)):
            if fulls[i][:len(job.ids)] == job.ids:
                known[r] = read_greedy(fulls[i], tables[i], len(job.ids), margin=margin, stop_ids=stop_ids,
                                       budget=job.budget)
            else:
                own.append(r)
        if own:
            pairs = []
            for r in own:
                job, full_text = jobs[r], bases[rows[r]] + " ".join(words[rows[r]])
                rest = full_text[len(job.context):] if full_text.startswith(job.context) else \
                    " " + " ".join(job.words[len(job.prefix.split()):])
                pairs.append((job.ids, guess_ids(tokenizer, job.context, job.ids, rest, add_special)))
            for r, got in zip(own, read_own(model, pairs, pad, margin=margin, stop_ids=stop_ids,
                                            budgets=[jobs[r].budget for r in own])):
                known[r] = got
        return [k for k, _ in known]

    def answer(rows: List[int], ms: List[int]) -> List[bool]:
        jobs = build_jobs(tokenizer, bases, words, rows, ms, add_special, fulls)
        known = known_tokens(rows, jobs)
        verdicts = [scan_verdict(tokenizer, job, k, stop_ids) for job, k in zip(jobs, known)]
        open_ = [r for r, v in enumerate(verdicts) if v is None]
        count["probes"] += len(jobs)
        if open_:
            count["generate_calls"] += 1
            count["generated_probes"] += len(open_)
            gens = continue_greedy(
                model, [jobs[r].ids + known[r] for r in open_], [jobs[r].budget - len(known[r]) for r in open_],
                stop_ids=stop_ids, pad=pad, batch_size=batch_size,
                decided=lambda j, new: jobs[open_[j]].stops(tokenizer, known[open_[j]] + new, eos))
            for r, (new, _) in zip(open_, gens):
                verdicts[r] = jobs[r].verdict(jobs[r].reconstructed(tokenizer, known[r] + new))
        return verdicts

    prefix_words, steps = prefix_search([len(w) for w in words], search, answer)
    return clean_result(prefix_words, words, search_steps=steps, **count)
