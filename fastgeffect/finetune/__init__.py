"""TOFU's fine-tuning recipe for any causal LM, with its retain-only twin (``python -m
fastgeffect.finetune``; :mod:`.cli` documents the output layout)."""
from .config import FinetuneConfig
from .loop import Stopped, train
from .recipe import DEFAULT_LR, FAMILY_LR, LORA_LR, Recipe, default_lr

__all__ = ["FinetuneConfig", "Stopped", "train", "DEFAULT_LR", "FAMILY_LR", "LORA_LR", "Recipe", "default_lr"]
