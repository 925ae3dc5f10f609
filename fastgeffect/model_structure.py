"""What the package needs to know about a model's structure, in one place: the user's module
inside a DDP / DeepSpeed wrapper, the decoder blocks, the number of blocks, the decoder and LM head.

Imports torch only, so every layer (distributed helpers, G-effects, objectives, kernels) can use it.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

# Config attributes of models whose logits are not a plain linear map of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def is_deepspeed(model) -> bool:
    # by name: deepspeed is optional and never imported for this
    return type(model).__name__ == "DeepSpeedEngine"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP or DeepSpeed wrapper (FSDP2 shards in place: nothing to unwrap)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_deepspeed(model):
        return model.module
    return model


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (a ZeRO-3 parameter holds none locally between forwards)."""
    return int(getattr(p, "ds_numel", p.numel()))


def find_block_list(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The decoder block list: the ``nn.ModuleList`` of two or more same-class modules holding the
    most parameters (a one-block model's single-entry list is accepted when nothing else qualifies)."""
    best, best_size = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(full_numel(p) for p in mod.parameters())
        if size == 0:
            continue
        key = (len(mod) >= 2, size)
        if best is None or key > best_size:
            best, best_size = (name, mod), key
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
                         "same-class modules with parameters; use groups='params' or a custom grouping")
    return best


def num_blocks(model) -> int:
    """Number of decoder blocks, from the config of the (unwrapped) model."""
    model = unwrap(model)  # a DDP / DeepSpeed wrapper does not expose the config
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    if n is None:
        raise ValueError("cannot tell the model's number of decoder blocks for RMU's default layer")
    return int(n)


def resolve_layer(model, layer: float) -> int:
    """A block index for RMU / RR; layer < 0 means the default: the middle block."""
    n = num_blocks(model)
    k = n // 2 if layer < 0 else int(layer)
    if not 0 <= k < n:
        raise ValueError(f"RMU layer {k} out of range for a model with {n} blocks")
    return k


def decoder_and_head(model: nn.Module):
    """The inner decoder module and the LM head (an ``nn.Linear``) of a causal LM."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face causal LM "
                        "(no get_decoder/get_output_embeddings)")
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is model or decoder is None:
        raise TypeError(f"could not find the inner decoder of {type(model).__name__}")
    if not isinstance(head, nn.Linear) or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise NotImplementedError(f"the fused loss needs a plain nn.Linear LM head, got {type(head).__name__}; "
                                  "use the unfused loss")
    cfg = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(model).__name__} transforms its logits ({name}={value}); "
                                      "the fused loss covers plain linear LM heads only")
    return decoder, head


__all__ = ["is_deepspeed", "unwrap", "full_numel", "find_block_list", "num_blocks", "resolve_layer",
           "decoder_and_head"]
