"""The unlearning loop's settings (:class:`UnlearnConfig`), apart from the loop so that the
driver's run configuration and the loop share one definition without importing the loop."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence


@dataclass
class UnlearnConfig:
    epochs: int = 5
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_grad_norm: float = 1.0  # 0: no clipping
    geffect_every: int = 1  # 0: never
    geffect_batch: int = 16  # samples in each risk batch
    geffect_groups: str = "paper"
    update_effects: bool = True  # with the G-effects: the AdamW step's predicted and realised risk changes
    pg_steps: Sequence[int] = field(default_factory=tuple)  # steps with per-sample PG-effects (-1: last)
    save_every: int = 0  # steps between resumable states (0: epoch ends only)
    seed: int = 0
    stop_at_step: Optional[int] = None  # stop (state saved) after this many steps, as if interrupted

    def check(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "geffect_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm}")


def config_dict(cfg: UnlearnConfig) -> dict:
    d = asdict(cfg)
    d["pg_steps"] = list(cfg.pg_steps)
    return d
