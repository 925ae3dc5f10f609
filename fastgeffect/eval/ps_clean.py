"""The ``clean`` PS protocol's search and its reference check by generation (docs/design.md §5.2).

The answer is split into words; :func:`prefix_search` finds each row's m, the smallest number of
given words from which greedy decoding reproduces the rest, by binary search (or UWC's linear scan)
with the whole set advancing one step per call of ``answer``. The reference ``answer``
(:func:`generate_verdicts`) generates: each (row, m) check is a :class:`Job` whose row stops as soon
as its text leaves the target, at EOS, at a newline, or after 2·(target tokens) + 8 new tokens; its
verdict is whether the first line of the reconstructed text has exactly the remaining words. The
fast path (eval/ps_fast_clean.py) answers the same steps from teacher-forced passes.

The context keeps or drops its trailing space so that it tokenises as a prefix of the full
teacher-forced text (UWC drops it: its prompts end with "Answer:", right for GPT-2-style
tokenizers; tokenizers that attach the following space need it kept); words are compared
whitespace-normalised since a decoded continuation's leading space depends on the tokenizer.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..data.templates import Template
from ._common import check_records
from .generate import greedy_generate

_TAIL = 4  # context tokens decoded together with the continuation, to see its leading space
SEARCHES = ("binary", "linear")


def words_state(text: str, target: Sequence[str]):
    """(compatible, complete) of partial reconstructed text against the target words."""
    text = text.rstrip("\ufffd")  # an unfinished multi-byte character
    line, newline, _ = text.partition("\n")
    got = line.split()
    if len(got) > len(target):
        return False, True
    if not got:
        return True, bool(newline)
    open_word = not line[-1].isspace() and not newline
    full = got[:-1] if open_word else got
    if full != list(target[: len(full)]):
        return False, True
    if open_word and not target[len(got) - 1].startswith(got[-1]):
        return False, True
    return True, bool(newline)


class Job:
    """One (sample, m) check: context text and ids, words already given, target words, budget
    (:meth:`build` makes one; :func:`build_jobs` many with batched tokenizer calls)."""

    def __init__(self, tokenizer, words: List[str], m: int, context: str, ids: List[int], target_tokens: int):
        self.prefix = " ".join(words[:m])
        self.context, self.ids = context, ids
        self.sep = " " if self.context.endswith(" ") else ""
        self.tail = self.ids[-_TAIL:]
        self.words = words
        self.tail_text = tokenizer.decode(self.tail, skip_special_tokens=True)
        self.budget = 2 * target_tokens + 8

    @classmethod
    def build(cls, tokenizer, base: str, words: List[str], m: int, add_special: bool,
              full: Optional[List[int]] = None) -> "Job":
        context, ids = context_of(tokenizer, base, words, m, add_special, full)
        target = tokenizer(" " + " ".join(words[m:]), add_special_tokens=False)["input_ids"]
        return cls(tokenizer, words, m, context, ids, len(target))

    def reconstructed(self, tokenizer, new_ids: Sequence[int]) -> str:
        full = tokenizer.decode(list(self.tail) + list(new_ids), skip_special_tokens=True)
        return self.from_decoded(tokenizer, full, new_ids)

    def from_decoded(self, tokenizer, full: str, new_ids: Sequence[int]) -> str:
        """:meth:`reconstructed` given ``full = decode(tail + new_ids)``."""
        cont = full[len(self.tail_text):] if full.startswith(self.tail_text) else \
            " " + tokenizer.decode(list(new_ids), skip_special_tokens=True)
        return self.prefix + self.sep + cont

    def stops(self, tokenizer, new_ids: Sequence[int], eos: Optional[int], text: Optional[str] = None) -> bool:
        """Whether the reference's stopping rule ends this row after ``new_ids`` (``text``: their
        reconstructed text, when already known)."""
        if (eos is not None and eos in new_ids) or len(new_ids) >= self.budget:
            return True  # finished, or out of this row's own budget
        ok, complete = words_state(self.reconstructed(tokenizer, new_ids) if text is None else text, self.words)
        return (not ok) or complete

    def verdict(self, text: str) -> bool:
        return text.partition("\n")[0].split() == self.words


def context_of(tokenizer, base: str, words: List[str], m: int, add_special: bool,
               full: Optional[List[int]] = None):
    """The generation context for ``m`` given words, and its ids.

    It must tokenise as a prefix of the full teacher-forced text (``full``, computed when not
    given), or greedy decoding starts from a token sequence the model never saw. Tokenizers that
    attach a word's *preceding* space (GPT-2, Llama, Phi) need the trailing space dropped (UWC's
    prompts end with "Answer:"); those that attach the *following* space need it kept. Both are
    tried; the stripped form is the fallback.
    """
    if full is None:
        full = tokenizer(base + " ".join(words), add_special_tokens=add_special)["input_ids"]
    text = base + " ".join(words[:m]) + (" " if m else "")
    stripped = text.rstrip(" ")
    for cand in (stripped, stripped + " "):
        ids = tokenizer(cand, add_special_tokens=add_special)["input_ids"]
        if full[:len(ids)] == ids:
            return cand, ids
    return stripped, tokenizer(stripped, add_special_tokens=add_special)["input_ids"]


def build_jobs(tokenizer, bases: Sequence[str], words: Sequence[List[str]], rows: Sequence[int], ms: Sequence[int],
               add_special: bool, fulls: Sequence[List[int]]) -> List[Job]:
    """:meth:`Job.build` for every (row, m), its tokenizer calls batched (the same ids)."""
    stripped = [(bases[i] + " ".join(words[i][:m]) + (" " if m else "")).rstrip(" ") for i, m in zip(rows, ms)]
    bare = tokenizer(stripped, add_special_tokens=add_special)["input_ids"]
    spaced = tokenizer([t + " " for t in stripped], add_special_tokens=add_special)["input_ids"]
    targets = tokenizer([" " + " ".join(words[i][m:]) for i, m in zip(rows, ms)], add_special_tokens=False)["input_ids"]
    jobs = []
    for r, (i, m) in enumerate(zip(rows, ms)):
        full = fulls[i]
        if full[:len(bare[r])] != bare[r] and full[:len(spaced[r])] == spaced[r]:
            context, ids = stripped[r] + " ", spaced[r]
        else:  # the stripped form: a prefix, or the fallback (context_of's order)
            context, ids = stripped[r], bare[r]
        jobs.append(Job(tokenizer, words[i], m, context, ids, len(targets[r])))
    return jobs


def _make_stopper(tokenizer, jobs: List[Job], eos: Optional[int]):
    from transformers import StoppingCriteria, StoppingCriteriaList  # heavy: keeps `import fastgeffect.eval` light

    class _Leave(StoppingCriteria):
        def __init__(self, rows, T):
            self.rows, self.T = rows, T

        def __call__(self, input_ids, scores=None, **kw):
            done = []
            for r, i in enumerate(self.rows):
                done.append(jobs[i].stops(tokenizer, input_ids[r, self.T:].tolist(), eos))
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return lambda rows, T: StoppingCriteriaList([_Leave(rows, T)])


def generate_verdicts(model, tokenizer, jobs: List[Job], batch_size: int, add_special: bool) -> List[bool]:
    """Whether greedy decoding reproduces the rest of the answer, for every job (one batched call)."""
    prompts = [j.context for j in jobs]
    # one budget for the call: rows stop on their own as soon as they leave their target
    new_ids = greedy_generate(model, tokenizer, prompts, max_new_tokens=max(j.budget for j in jobs),
                              batch_size=batch_size, add_special_tokens=add_special, return_ids=True,
                              stopping_criteria_fn=_make_stopper(tokenizer, jobs, tokenizer.eos_token_id))
    return [job.verdict(job.reconstructed(tokenizer, ids)) for job, ids in zip(jobs, new_ids)]


def clean_rows(tokenizer, template: Template, records: Sequence[dict], question_key: str,
               answer_key: str) -> Tuple[List[str], List[List[str]], bool]:
    """(prompt + answer start, answer words, add special tokens) of every record, checked."""
    check_records(records, (question_key, answer_key), f"PS ({question_key})")
    bases = [template.prompt(r[question_key], tokenizer) + template.answer_start for r in records]
    words = [str(r[answer_key]).split() for r in records]
    empty = [i for i, w in enumerate(words) if not w]
    if empty:
        raise ValueError(f"records {empty[:5]} have an empty answer: PS is undefined")
    return bases, words, not template.chat


def prefix_search(n_words: Sequence[int], search: str,
                  answer: Callable[[List[int], List[int]], List[bool]]) -> Tuple[List[int], int]:
    """Each row's m and the number of steps: ``answer(rows, ms)`` says for every row whether m
    given words suffice. Binary search: m = n always works (PS 0); linear: m = 0, 1, ..."""
    lo = [0] * len(n_words)
    hi = list(n_words)
    steps = 0
    while True:
        todo = [i for i in range(len(n_words)) if lo[i] < hi[i]]
        if not todo:
            return lo, steps
        ms = [(lo[i] + hi[i]) // 2 if search == "binary" else lo[i] for i in todo]
        ok = answer(todo, ms)
        steps += 1
        for i, m, good in zip(todo, ms, ok):
            if good:
                hi[i] = m
            else:
                lo[i] = m + 1


def clean_result(prefix_words: List[int], words: List[List[str]], **extra) -> Dict[str, object]:
    scores = [1.0 - m / len(w) for m, w in zip(prefix_words, words)]
    return {"ps": sum(scores) / len(scores), "scores": scores, "prefix_words": prefix_words,
            "num_words": [len(w) for w in words], **extra}


def clean_ps_search(model, tokenizer, template: Template, records: Sequence[dict], question_key: str,
                    answer_key: str, search: str, batch_size: int) -> Dict[str, object]:
    """The reference: every search step is one batched generation call."""
    bases, words, add_special = clean_rows(tokenizer, template, records, question_key, answer_key)

    def answer(rows, ms):
        jobs = [Job.build(tokenizer, bases[i], words[i], m, add_special) for i, m in zip(rows, ms)]
        return generate_verdicts(model, tokenizer, jobs, batch_size, add_special)

    prefix_words, steps = prefix_search([len(w) for w in words], search, answer)
    return clean_result(prefix_words, words, generate_calls=steps)
