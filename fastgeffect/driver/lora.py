"""Unlearning through LoRA adapters (``--lora R``): the target's weights stay frozen, only the
adapters train, and the original model θ_o is the same model with its adapters disabled (no second
copy in memory). G-effects are then over the adapter parameters, each in the group of the decoder
block it adapts (peft injects the adapters into the blocks, so the block list is found as before).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..reference import ReferenceModel

# the adapted projections of the decoder blocks (peft's default for Llama-style models is q/v only);
# attention and MLP, so every block's G-effect has both kinds of weight in it
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_alpha(rank: int) -> int:
    """LoRA's scale α: 2·rank, so the adapter update is scaled by α/r = 2 whatever the rank."""
    return 2 * rank


def add_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """``model`` wrapped in rank-``rank`` LoRA adapters on the projections of its blocks; only the
    adapters are trainable. Freshly initialised adapters (B = 0) leave the outputs unchanged."""
    from peft import LoraConfig, get_peft_model  # optional dependency (the "peft" extra): only with --lora

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in TARGET_MODULES if m in present]
    if not targets:
        raise SystemExit(f"--lora: {type(model).__name__} has none of the projections LoRA adapts here "
                         f"({', '.join(TARGET_MODULES)}); unlearn it without --lora")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        model.enable_input_require_grads()  # frozen embeddings: recomputed blocks still need a graph to the adapters
    config = LoraConfig(r=rank, lora_alpha=lora_alpha(rank), lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def reference_of(model: torch.nn.Module) -> Optional[ReferenceModel]:
    """θ_o for a LoRA model: the model itself with its adapters disabled (None for a plain model)."""
    return ReferenceModel.from_peft(model) if is_lora(model) else None


def merged(model: torch.nn.Module, *, in_place: bool) -> torch.nn.Module:
    """A plain model with the adapters folded into the weights (for evaluation, UWC mixing and saving).
    ``in_place``: consume ``model`` (after training); else merge a copy (epoch checkpoints)."""
    if not is_lora(model):
        return model
    return (model if in_place else copy.deepcopy(model)).merge_and_unload()


def adapter_note(model: torch.nn.Module, rank: int) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA unlearning (rank {rank}, α {lora_alpha(rank)}): G-effects are over the adapter parameters "
            f"({trainable:,} of {total:,}), grouped by the decoder block they adapt; the reference θ_o is the "
            "model with its adapters disabled")
