"""The relearning attack: fine-tune a copy of the model for k steps on a fixed, seeded half of the
forget rows and measure the other half after each k (how fast the "forgotten" rows come back);
on the retain twin, the same attack is the control (how fast a model that never saw them learns them).

Training is the package's fine-tuning step (:mod:`fastgeffect.finetune.loop`) without its
schedule: TOFU's encoding (:class:`fastgeffect.data.qa.QADataset`), the answer-only token-mean
NLL (:func:`fastgeffect.losses.nll`), AdamW at a constant learning rate, no weight decay, no
clipping. Step ``s`` takes batch ``s mod steps-per-epoch`` of the seeded epoch order
(:func:`fastgeffect.training.plan.epoch_order`) of the training rows. Everything random is drawn
from ``seed`` (the global RNG is restored afterwards), so one seed gives one curve.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..data.collate import collate_qa
from ..data.qa import QADataset
from ..data.templates import Template
from ..losses import nll
from ..training.plan import epoch_order, steps_per_epoch

STEPS = (0, 1, 2, 4, 8, 16)  # the step counts k measured
LR = 1e-5  # AdamW's learning rate (TOFU's fine-tuning rate)
BATCH_SIZE = 4  # training rows per step
SEED = 0
MAX_LENGTH = 200  # tokens of prompt + answer (TOFU's)


def check_steps(steps) -> Tuple[int, ...]:
    """Non-negative integers in increasing order (each k is measured once, on the way up)."""
    ks = tuple(steps) if isinstance(steps, (list, tuple)) else None
    if not ks or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 for k in ks):
        raise ValueError(f"relearning steps must be a non-empty list of non-negative integers, got {steps!r}")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"relearning steps must be strictly increasing, got {list(ks)}")
    return tuple(int(k) for k in ks)


def check_train_args(lr, batch_size) -> None:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"the relearning learning rate must be a positive number, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"the relearning batch size must be a positive integer, got {batch_size!r}")


def split_forget(n_rows: int, seed: int) -> Tuple[List[int], List[int]]:
    """(training rows, evaluated rows): the first ⌊n/2⌋ rows of a seeded permutation train, the
    others are measured; each list in increasing order."""
    if n_rows < 2:
        raise ValueError(f"the relearning attack splits the forget rows into a trained and an evaluated part: "
                         f"it needs at least 2 rows, got {n_rows}")
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(int(seed))).tolist()
    half = n_rows // 2
    return sorted(perm[:half]), sorted(perm[half:])


def _rng_scope(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def relearn_curve(model: torch.nn.Module, tokenizer, template: Template, train_records: Sequence[dict],
                  measure: Callable[[torch.nn.Module], Dict[str, float]], *, steps=STEPS, lr: float = LR,
                  batch_size: int = BATCH_SIZE, seed: int = SEED, max_length: int = MAX_LENGTH) -> List[dict]:
    """Fine-tune a deep copy of ``model`` on ``train_records`` and call ``measure(copy)`` after each
    step count k of ``steps`` (k = 0: before any step). Returns ``[{"step": k, "train_loss": loss
    of the k-th step (None at k = 0), **measure(copy)}, ...]``; ``model`` is untouched."""
    ks = check_steps(steps)
    check_train_args(lr, batch_size)
    data = QADataset(train_records, tokenizer, template, max_length)
    n, bs = len(data), min(int(batch_size), len(data))
    per_epoch = steps_per_epoch(n, bs)
    work = copy.deepcopy(model)
    device = next(work.parameters()).device
    for p in work.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(work.parameters(), lr=lr, weight_decay=0.0)
    curve, done, loss_value = [], 0, None
    with _rng_scope(device):
        torch.manual_seed(int(seed))  # dropout, if the model has any
        for k in ks:
            work.train()
            while done < k:
                epoch, b = divmod(done, per_epoch)
                chunk = epoch_order(n, int(seed), epoch)[b * bs: (b + 1) * bs].tolist()
                batch = {key: v.to(device) for key, v in collate_qa([data[i] for i in chunk]).items()}
                logits = work(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = nll(logits, batch["labels"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"relearning step {done}: the loss is {loss_value}; lower the "
                                             "learning rate")
                done += 1
            work.eval()
            curve.append({"step": k, "train_loss": loss_value if k else None, **measure(work)})
    return curve
