"""TOFU's fine-tuning recipe as data: answer-only loss, 5 epochs, AdamW with weight decay 0.01,
effective batch 32, linear warm-up over the first epoch then linear decay, the learning rate by
model family (TOFU: 1e-5 for Llama-2, 2e-5 for Phi-1.5)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

# TOFU's learning rates by transformers ``model_type``; any other family gets DEFAULT_LR, the
# Llama-2 value (the more conservative of TOFU's two). LoRA adapters start at zero and need a
# larger step: LORA_LR, the usual LoRA default.
FAMILY_LR = {"llama": 1e-5, "phi": 2e-5, "mixformer-sequential": 2e-5}
DEFAULT_LR = 1e-5
LORA_LR = 1e-4


def default_lr(model_type: str, lora: int = 0) -> float:
    if lora:
        return LORA_LR
    return FAMILY_LR.get(model_type, DEFAULT_LR)


@dataclass(frozen=True)
class Recipe:
    lr: float
    epochs: int = 5
    batch_size: int = 32  # effective: samples per optimiser step
    grad_accum: int = 4  # micro-batches per step (memory), exact: the loss divides by the step's tokens
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_grad_norm: float = 1.0  # Hugging Face Trainer's default, which TOFU used; 0: no clipping
    max_length: int = 500  # TOFU's
    lora: int = 0  # LoRA rank; 0: full fine-tuning
    save_every: int = 0  # steps between resumable states (0: epoch ends only)
    seed: int = 0
    max_steps: Optional[int] = None  # stop the phase after this many steps (a short run)

    def check(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lora", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")

    def to_dict(self) -> dict:
        return asdict(self)
