"""Everything an unlearning run reads from a TOFU folder, encoded and paired."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..losses.po import load_refusals, sample_refusals
from .pairs import ForgetRetainDataset
from .qa import QADataset, retain_pool
from .templates import Template
from .tofu import RETAIN_OF, load_tofu_split


@dataclass
class UnlearningData:
    pairs: ForgetRetainDataset  # training items {"forget", "retain"[, refusal_key]}
    forget: QADataset           # the forget split (index = row in forgetXX)
    retain: QADataset           # the retain pool: retainXX minus held-out rows (index = row in retainXX)
    heldout: QADataset          # retain_perturbed: never trained on; retaining G-effects, retain eval
    refusals: Optional[List[str]] = None  # the refusal answer of each forget row, when asked


def load_unlearning_data(data_dir: Optional[Union[str, Path]], forget_split: str, tokenizer, template: Template,
                         max_length: int, *, seed: int = 0, rank: int = 0, idk: bool = False,
                         refusals: Optional[Sequence[str]] = None, refusal_key: str = "forget_idk") -> UnlearningData:
    """Encode ``forget_split`` (forget01/05/10), its retain pool and the held-out retain rows.

    ``idk=True`` adds a refusal version of every forget sample (PO, DPO, IdkDPO) under
    ``refusal_key`` of each pair: one refusal per forget row, drawn once for ``seed`` from
    ``refusals`` (default: the project's list), so it is the same every epoch and cached reference
    log-probs stay valid.
    """
    if forget_split not in RETAIN_OF:
        raise ValueError(f"unknown forget split {forget_split!r}; valid: {', '.join(sorted(RETAIN_OF))}")
    forget_rows = load_tofu_split(forget_split, data_dir)
    retain_rows = load_tofu_split(RETAIN_OF[forget_split], data_dir)
    heldout_rows = load_tofu_split("retain_perturbed", data_dir)
    pool = retain_pool(retain_rows, heldout_rows)
    forget = QADataset(forget_rows, tokenizer, template, max_length)
    retain = QADataset([retain_rows[i] for i in pool], tokenizer, template, max_length, indices=pool)
    heldout = QADataset(heldout_rows, tokenizer, template, max_length)
    idk_answers = forget_idk = None
    if idk:
        idk_answers = sample_refusals(len(forget_rows), refusals if refusals is not None else load_refusals(), seed)
        forget_idk = QADataset(forget_rows, tokenizer, template, max_length, answers=idk_answers)
    pairs = ForgetRetainDataset(forget, retain, forget_idk, seed=seed, rank=rank, refusal_key=refusal_key)
    return UnlearningData(pairs, forget, retain, heldout, idk_answers)
