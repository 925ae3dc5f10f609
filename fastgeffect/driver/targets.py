"""The target model a run unlearns: the embedded offline target, or a Hugging Face model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data.templates import Template, get_template
from ..embedded import build_embedded
from .presets import Preset


@dataclass
class Target:
    """The target model and everything the run reads."""
    model: torch.nn.Module
    tokenizer: object
    template: Template
    data_dir: Optional[str]
    max_length: int
    load_original: Callable[[], torch.nn.Module]  # a fresh θ_o (for UWC mixing and gathers), on CPU
    retain_model_path: Optional[Path] = None  # embedded retain twin, for Forget Quality
    info: Optional[dict] = None


def embedded_target(args, device: torch.device) -> Target:
    """The tiny offline target (built and cached on first use), on generated or real TOFU text
    (``--data-dir`` and ``--authors`` were checked by :func:`.inputs.check_inputs`)."""
    emb = build_embedded(args.cache_dir, size=args.size, seed=args.seed, forget_split=args.split,
                         tofu_dir=args.data_dir, n_authors=args.authors)
    model = emb.load_target().to(device)
    return Target(model, emb.tokenizer, emb.template, str(emb.data_dir), args.max_length or emb.max_length,
                  emb.load_target, emb.retain_path,
                  {"target": str(emb.target_path), "retain": str(emb.retain_path),
                   "target_report": {k: v for k, v in emb.reports["target"].items() if k != "epoch_loss"}})


def hub_target(args, preset: Preset, device: torch.device) -> Target:
    """A Hugging Face causal LM (hub name or local folder); bf16 and gradient checkpointing by
    default on CUDA."""
    on_cuda = device.type == "cuda"
    bf16 = on_cuda if args.bf16 is None else args.bf16
    checkpointing = on_cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # TOFU pads with EOS
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return Target(model, tokenizer, get_template(preset.template), args.data_dir,
                  args.max_length or preset.max_length,
                  lambda: AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype), None,
                  {"model": args.model, "dtype": str(dtype)})


def build_target(args, preset: Preset, device: torch.device) -> Target:
    return hub_target(args, preset, device) if args.model else embedded_target(args, device)
