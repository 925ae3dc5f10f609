"""TOFU's fine-tuning recipe as data: answer-only loss, 5 epochs, AdamW with weight decay 0.01,
effective batch 32, linear warm-up over the first epoch then linear decay, the learning rate by
model family (TOFU: 1e-5 for Llama-2, 2e-5 for Phi-1.5).

Each field states its default, help and bounds once; ``python -m fastgeffect.finetune``'s recipe
flags take theirs from here (:class:`.config.FinetuneConfig`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..dataclass_cli import first_error, setting

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
    lr: float = setting(help="peak learning rate", low=0, strict=True)
    epochs: int = setting(5, "passes over the training split", low=1)
    batch_size: int = setting(32, "effective batch (samples per optimiser step)", low=1)
    # exact: the loss divides by the step's tokens
    grad_accum: int = setting(4, "micro-batches per step (memory only)", low=1)
    # as Hugging Face's Trainer (TOFU's): not on biases and norm weights
    weight_decay: float = setting(0.01, "AdamW's weight decay", low=0)
    warmup_epochs: float = setting(1.0, "linear warm-up, then linear decay", low=0)
    # Hugging Face Trainer's default, which TOFU used
    max_grad_norm: float = setting(1.0, "gradient clipping threshold (0: no clipping)", low=0)
    max_length: int = setting(500, "tokens per QA pair", low=1)  # TOFU's
    lora: int = setting(0, "train LoRA adapters of rank R (0: full)", low=0, metavar="R")
    save_every: int = setting(0, "steps between resumable states (0: epoch ends)", low=0)
    seed: int = setting(0, "seed of the data order", low=0, high=2 ** 32, high_text="2^32")
    max_steps: Optional[int] = setting(None, "stop each model after N steps (a short run)", low=1)

    def check(self) -> None:
        error = first_error(self)
        if error:
            raise ValueError(error)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")

    def to_dict(self) -> dict:
        return asdict(self)
