"""Which parameters the unlearning AdamW decays: as Hugging Face's Trainer does (TOFU's and the
paper's code train with it), every trainable parameter but biases and norm weights
(``Trainer.get_decay_parameter_names``: parameters of ``nn.LayerNorm`` modules, and names matching
bias / layernorm / rmsnorm / norm, lower-cased); ``decay_all=True`` keeps the loop's behaviour
before issue 28, weight decay on every parameter (docs/design.md §9)."""
from __future__ import annotations

import re
from typing import Dict, List, Set

from torch import nn

# transformers' Trainer.get_decay_parameter_names, searched in the lower-cased full name
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                 r"_norm(?:$|\.)"))


def no_decay_names(model: nn.Module) -> Set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters Hugging Face's Trainer
    does not decay: those of ``nn.LayerNorm`` modules and those whose name says bias or norm."""
    in_layernorm = {f"{m}.{n}" if m else n for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                    for n, _ in module.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters()
            if n in in_layernorm or any(p.search(n.lower()) for p in NO_DECAY_PATTERNS)}


def decay_param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> List[Dict]:
    """AdamW's param groups over the trainable parameters of ``model``: decayed by ``weight_decay``,
    then (unless ``decay_all``) biases and norm weights without decay; an empty group is left out."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skip = set() if decay_all else no_decay_names(model)
    groups = [{"params": [p for n, p in trainable if n not in skip], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if n in skip], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


__all__ = ["NO_DECAY_PATTERNS", "decay_param_groups", "no_decay_names"]
