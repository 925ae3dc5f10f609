"""A torch Dataset of TOFU-style question/answer records, encoded once with ``encode_qa``.

Every item carries ``index``: the row number of the record in its source split file, so that
per-sample caches (reference log-probs, evaluation logs) can be looked up by it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .templates import Template, encode_qa


class QADataset(Dataset):
    """Encoded ``(question, answer)`` pairs of ``rows``.

    ``answers`` overrides the answers (e.g. refusals for PO/IdkDPO: same questions, other answers);
    ``indices`` gives each row's number in its split (default ``0..len(rows)-1``).
    Items: ``input_ids``, ``attention_mask``, ``labels`` (LongTensors of ``max_length``) and
    ``index`` (int).
    """

    def __init__(self, rows: Sequence[dict], tokenizer, template: Template, max_length: int, *,
                 question_key: str = "question", answer_key: str = "answer",
                 answers: Optional[Sequence[str]] = None, indices: Optional[Sequence[int]] = None):
        if len(rows) == 0:
            raise ValueError("QADataset needs at least one row")
        if answers is not None and len(answers) != len(rows):
            raise ValueError(f"{len(answers)} answers given for {len(rows)} rows")
        if indices is not None and len(indices) != len(rows):
            raise ValueError(f"{len(indices)} indices given for {len(rows)} rows")
        for key in (question_key,) + (() if answers is not None else (answer_key,)):
            missing = [i for i, r in enumerate(rows) if key not in r]
            if missing:
                raise ValueError(f"rows {missing[:5]} have no {key!r} field")
            _check_text([r[key] for r in rows], f"the {key!r} field")
        if answers is not None:
            _check_text(answers, "the answers given")
        self.rows = list(rows)
        self.max_length = max_length
        self.indices = list(range(len(rows))) if indices is None else [int(i) for i in indices]
        self.answers = [r[answer_key] for r in rows] if answers is None else list(answers)
        enc = [encode_qa(tokenizer, template, r[question_key], a, max_length)
               for r, a in zip(self.rows, self.answers)]
        # one (N, max_length) tensor per field: cheap indexing, no per-item tensor construction
        self.tensors: Dict[str, torch.Tensor] = {
            k: torch.tensor([e[k] for e in enc], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")
        }

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.tensors.items()}
        item["index"] = self.indices[i]
        return item


def _check_text(values: Sequence, what: str) -> None:
    """A null or a number would be encoded as the text "None" or fail deep in the tokenizer."""
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{what} of rows {bad[:5]} is not a string (row {bad[0]}: {values[bad[0]]!r})")


def retain_pool(retain_rows: Sequence[dict], heldout_rows: Sequence[dict]) -> List[int]:
    """Row numbers of ``retain_rows`` that are not held-out rows (matched by question and answer).

    TOFU's retainXX splits contain the 400 ``retain_perturbed`` rows that are held out for
    retain evaluation and retaining G-effects; the optimiser must never train on them. The
    answer takes part in the match because TOFU's ``full`` repeats one question ("What is the
    full name of the author?") for two authors, one held out and one not.
    """
    held = {(r["question"], r["answer"]) for r in heldout_rows}
    pool = [i for i, r in enumerate(retain_rows) if (r["question"], r["answer"]) not in held]
    if not pool:
        raise ValueError("the retain pool is empty: every retain row is held out")
    return pool
