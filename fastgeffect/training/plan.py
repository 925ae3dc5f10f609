"""Which forget samples each optimiser step takes, and the learning-rate schedule: pure functions.

A step takes ``batch_size`` forget indices of the epoch's seeded order and cuts them into
``world * grad_accum`` global micro-batches (``idx[i::n]``), rank r taking ``grad_accum`` of them
in order. With one process a short last batch makes fewer micro-batches (one per sample); under
data parallel every rank keeps ``grad_accum`` of them, so that all ranks run the same collectives,
and a rank whose micro-batch is empty runs it on a copy of the step's first sample with weight 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

Chunks = Tuple[Tuple[int, ...], ...]


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return math.ceil(n_samples / batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def warmup_linear(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak lr, then linear decay to 0 (the HF default TOFU uses)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


@dataclass(frozen=True)
class StepPlan:
    epoch: int
    batch: int                # the step's batch number within the epoch
    global_chunks: Chunks     # the step's forget indices, one tuple per global micro-batch
    chunks: Chunks            # this rank's micro-batches (``grad_accum`` of them under data parallel)
    weights: Tuple[float, ...]  # per chunk: 1.0, or 0.0 for an empty one

    @property
    def loaded(self) -> Chunks:
        """The indices each of this rank's micro-batches loads: an empty chunk loads the step's first sample."""
        return tuple(c or self.global_chunks[0][:1] for c in self.chunks)


def plan_step(n_samples: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int,
              epoch: int, batch: int) -> StepPlan:
    order = epoch_order(n_samples, seed, epoch)
    idx = order[batch * batch_size:(batch + 1) * batch_size].tolist()
    n = world * grad_accum
    n_micro = min(n, len(idx)) if world == 1 else n
    global_chunks = tuple(tuple(idx[i::n_micro]) for i in range(n_micro))
    per_rank = n_micro // world
    chunks = global_chunks[rank * per_rank:(rank + 1) * per_rank]
    return StepPlan(epoch, batch, global_chunks, chunks, tuple(1.0 if c else 0.0 for c in chunks))
