"""PS-exact / PS-perturb ("Unlearning with Control", UWC) and teacher-forced extraction strength.

PS comes under three protocols (``ps_scores(protocol=...)``, docs/design.md "PS protocols"):
``paper`` and ``uwc-linear`` reproduce the public code behind the paper's Table 1 and UWC's
scripts (eval/ps_protocols.py: their prompt, budget, matching and search; eval/ps_samples.py:
their rows); ``clean`` is fastgeffect's own, below: the model's training template, whitespace-
normalised words, and a reproduction check that cannot be satisfied by stopping early.

``clean`` PS of a sample: the answer is split into words w_1..w_n; m is the smallest number of leading
words such that greedy decoding from ``prompt + answer_start + w_1..w_m`` reproduces the rest of
the answer exactly (the continuation's first line, compared word by word, must equal
w_{m+1}..w_n), with m = n when no prefix works; PS = 1 − m/n (1: the question alone suffices,
0: never). This is UWC's definition (``phi_exact.py``: word prefixes, continuation cut at the
first newline, ``(k+1)/n`` summed and subtracted from 1) with m found by binary search
(docs/design.md §5), batched so that the whole set advances one search step per generation call.
``search="linear"`` scans m = 0, 1, ... as UWC's script does (identical when reproduction is
monotone in m). PS-exact uses ``question``, PS-perturb ``paraphrased_question``.

Notes: the context keeps or drops its trailing space so that it tokenises as a prefix of the full
teacher-forced text (UWC drops it: its prompts end with "Answer:", right for GPT-2-style
tokenizers; tokenizers that attach the following space need it kept);
words are compared whitespace-normalised since a decoded continuation's leading space depends
on the tokenizer; a row stops generating as soon as its text leaves the target, at EOS, at a
newline, or after 2·(target tokens) + 8 new tokens (a continuation that equals the target when
this budget runs out counts as reproduced, as with UWC's ``max_length``).

Extraction strength (open-unlearning's ``extraction_strength``): one teacher-forced pass;
with L answer tokens (EOS included), k the first position from which every argmax prediction
is correct, ES = 1 − k/L; when even the last token is wrong k = L − 1 (open-unlearning's loop),
so ES = 1/L.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..data.templates import IGNORE_INDEX, Template
from ..losses import valid_mask
from ._common import check_records, model_device, pad_id
from .answer_losses import encode_pairs
from .generate import greedy_generate
from .ps_protocols import PS_PROTOCOLS, paper_ps_scores, uwc_linear_ps_scores

_TAIL = 4  # context tokens decoded together with the continuation, to see its leading space


def _words_state(text: str, target: Sequence[str]):
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


class _Job:
    """One (sample, m) check: context text and ids, words already given, target words."""

    def __init__(self, tokenizer, base: str, words: List[str], m: int, add_special: bool):
        self.prefix = " ".join(words[:m])
        self.context, self.ids = _context(tokenizer, base, words, m, add_special)
        self.sep = " " if self.context.endswith(" ") else ""
        self.tail = self.ids[-_TAIL:]
        self.words = words
        self.tail_text = tokenizer.decode(self.tail, skip_special_tokens=True)
        target = " ".join(words[m:])
        self.budget = 2 * len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 8

    def reconstructed(self, tokenizer, new_ids: Sequence[int]) -> str:
        full = tokenizer.decode(list(self.tail) + list(new_ids), skip_special_tokens=True)
        cont = full[len(self.tail_text):] if full.startswith(self.tail_text) else \
            " " + tokenizer.decode(list(new_ids), skip_special_tokens=True)
        return self.prefix + self.sep + cont


def _context(tokenizer, base: str, words: List[str], m: int, add_special: bool):
    """The generation context for ``m`` given words, and its ids.

    It must tokenise as a prefix of the full teacher-forced text, or greedy decoding starts from a
    token sequence the model never saw. Tokenizers that attach a word's *preceding* space (GPT-2,
    Llama, Phi) need the trailing space dropped (UWC's prompts end with "Answer:"); those that
    attach the *following* space need it kept. Both are tried; the stripped form is the fallback.
    """
    full = tokenizer(base + " ".join(words), add_special_tokens=add_special)["input_ids"]
    text = base + " ".join(words[:m]) + (" " if m else "")
    stripped = text.rstrip(" ")
    for cand in (stripped, stripped + " "):
        ids = tokenizer(cand, add_special_tokens=add_special)["input_ids"]
        if full[:len(ids)] == ids:
            return cand, ids
    return stripped, tokenizer(stripped, add_special_tokens=add_special)["input_ids"]


def _make_stopper(tokenizer, jobs: List[_Job], eos: Optional[int]):
    from transformers import StoppingCriteria, StoppingCriteriaList  # heavy: keeps `import fastgeffect.eval` light

    class _Leave(StoppingCriteria):
        def __init__(self, rows, T):
            self.rows, self.T = rows, T

        def __call__(self, input_ids, scores=None, **kw):
            done = []
            for r, i in enumerate(self.rows):
                new = input_ids[r, self.T:].tolist()
                if (eos is not None and eos in new) or len(new) >= jobs[i].budget:
                    done.append(True)  # finished, or out of this row's own budget
                    continue
                ok, complete = _words_state(jobs[i].reconstructed(tokenizer, new), jobs[i].words)
                done.append((not ok) or complete)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return lambda rows, T: StoppingCriteriaList([_Leave(rows, T)])


def _run_jobs(model, tokenizer, jobs: List[_Job], batch_size: int, add_special: bool) -> List[bool]:
    """Whether greedy decoding reproduces the rest of the answer, for every job (batched)."""
    prompts = [j.context for j in jobs]
    # one budget for the call: rows stop on their own as soon as they leave their target
    new_ids = greedy_generate(model, tokenizer, prompts, max_new_tokens=max(j.budget for j in jobs),
                              batch_size=batch_size, add_special_tokens=add_special, return_ids=True,
                              stopping_criteria_fn=_make_stopper(tokenizer, jobs, tokenizer.eos_token_id))
    return [job.reconstructed(tokenizer, ids).partition("\n")[0].split() == job.words
            for job, ids in zip(jobs, new_ids)]


@torch.no_grad()
def ps_scores(model, tokenizer, template: Template, records: Sequence[dict], *, protocol: str = "clean",
              family: str = "phi", question_key: str = "question", answer_key: str = "answer",
              search: str = "binary", batch_size: int = 32) -> Dict[str, object]:
    """PS of every record under ``protocol``: ``{"ps": mean, "scores": per sample, ...}``.

    ``clean`` also gives ``"prefix_words": m, "num_words": n, "generate_calls"`` (batched search
    steps); ``template``, ``search`` and ``batch_size`` serve it only: ``paper`` and ``uwc-linear``
    fix their own prompt and batching (padding changes outputs), ``family`` (phi, llama2) picks
    uwc-linear's string rules."""
    if protocol not in PS_PROTOCOLS:
        raise ValueError(f"unknown PS protocol {protocol!r}; valid: {', '.join(PS_PROTOCOLS)}")
    if search not in ("binary", "linear"):
        raise ValueError(f"search must be 'binary' or 'linear', got {search!r}")
    was_training = model.training
    model.eval()
    try:
        if protocol == "paper":
            return paper_ps_scores(model, tokenizer, records, question_key=question_key, answer_key=answer_key)
        if protocol == "uwc-linear":
            return uwc_linear_ps_scores(model, tokenizer, records, family=family, question_key=question_key,
                                        answer_key=answer_key)
        return _clean_ps_scores(model, tokenizer, template, records, question_key, answer_key, search, batch_size)
    finally:
        model.train(was_training)


def _clean_ps_scores(model, tokenizer, template: Template, records: Sequence[dict], question_key: str,
                     answer_key: str, search: str, batch_size: int) -> Dict[str, object]:
    check_records(records, (question_key, answer_key), f"PS ({question_key})")
    add_special = not template.chat
    bases = [template.prompt(r[question_key], tokenizer) + template.answer_start for r in records]
    words = [str(r[answer_key]).split() for r in records]
    empty = [i for i, w in enumerate(words) if not w]
    if empty:
        raise ValueError(f"records {empty[:5]} have an empty answer: PS is undefined")
    lo = [0] * len(records)
    hi = [len(w) for w in words]  # m = n always "works": PS 0
    calls = 0
    while True:
        todo = [i for i in range(len(records)) if lo[i] < hi[i]]
        if not todo:
            break
        ms = [(lo[i] + hi[i]) // 2 if search == "binary" else lo[i] for i in todo]
        jobs = [_Job(tokenizer, bases[i], words[i], m, add_special) for i, m in zip(todo, ms)]
        ok = _run_jobs(model, tokenizer, jobs, batch_size, add_special)
        calls += 1
        for i, m, good in zip(todo, ms, ok):
            if good:
                hi[i] = m
            else:
                lo[i] = m + 1
    scores = [1.0 - m / len(w) for m, w in zip(lo, words)]
    return {"ps": sum(scores) / len(scores), "scores": scores, "prefix_words": lo,
            "num_words": [len(w) for w in words], "generate_calls": calls}


def ps_report(model, tokenizer, template: Template, sets: Dict[str, Sequence[dict]], *,
              perturb_sets: Optional[Dict[str, Sequence[dict]]] = None, protocol: str = "clean",
              family: str = "phi", batch_size: int = 32, search: str = "binary") -> Dict[str, float]:
    """PS-exact of each named set and PS-perturb (when its records have ``paraphrased_question``)
    of the same set or of ``perturb_sets[name]`` (protocols that sample them apart, ps_samples.py),
    e.g. ``{"retain": [...], "forget": [...]}`` → ``{"PS-exact retain": ..., ...}``."""
    perturb_sets = sets if perturb_sets is None else perturb_sets
    kw = dict(protocol=protocol, family=family, batch_size=batch_size, search=search)
    out = {}
    for name, recs in sets.items():
        out[f"PS-exact {name}"] = ps_scores(model, tokenizer, template, recs, **kw)["ps"]
        perturb = perturb_sets.get(name)
        if perturb and all("paraphrased_question" in r for r in perturb):
            out[f"PS-perturb {name}"] = ps_scores(model, tokenizer, template, perturb,
                                                  question_key="paraphrased_question", **kw)["ps"]
    return out


@torch.no_grad()
def extraction_strength(model, tokenizer, template: Template, records: Sequence[dict], *,
                        question_key: str = "question", answer_key: str = "answer", max_length: int = 200,
                        batch_size: int = 32) -> Dict[str, object]:
    """Teacher-forced extraction strength per record (one forward pass per batch):
    ``{"es": mean, "scores": per sample}``."""
    check_records(records, (question_key, answer_key), "extraction strength")
    ids, labels, real, _ = encode_pairs(tokenizer, template, [r[question_key] for r in records],
                                        [r[answer_key] for r in records], max_length)
    device = model_device(model)
    pad = pad_id(tokenizer)
    scores: List[float] = [0.0] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        T = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)
        y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(ids[i])], y[r, : len(ids[i])] = torch.tensor(ids[i]), torch.tensor(labels[i])
            att[r, : real[i]] = 1
        logits = model(input_ids=x.to(device), attention_mask=att.to(device)).logits
        pred = torch.zeros_like(y)
        pred[:, 1:] = logits[:, :-1].argmax(-1).cpu()  # aligned with labels
        mask = valid_mask(y)
        for r, i in enumerate(chunk):
            correct = (pred[r] == y[r])[mask[r]]
            L = int(correct.numel())
            suffix_ok = correct.flip(0).cumprod(0).flip(0).bool()  # all correct from here on
            hits = suffix_ok.nonzero()
            k = int(hits[0]) if len(hits) else L - 1
            scores[i] = 1.0 - k / L
    return {"es": sum(scores) / len(scores), "scores": scores}
