"""The target model a run unlearns: the embedded offline target, or a Hugging Face model, and
the retain-only twin behind Forget Quality."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.splits import add_subset_holdout, subset_tofu
from ..data.templates import Template, choose_template, get_template
from ..embedded import build_embedded
from ..embedded.build import folder_digest  # the key the embedded subset uses too
from ..embedded.cache import cached_dir, config_hash, default_cache_dir
from ..embedded.news_build import build_embedded_news
from ..model_loading import ModelLoadError, load_causal_lm, load_tokenizer
from .config import RunConfig
from .lora import add_lora
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
    retain_model_path: Optional[Path] = None  # the retain-only twin (embedded, or --retain-model), for Forget Quality
    load_retain: Optional[Callable[[], torch.nn.Module]] = None  # that twin, on CPU
    info: Optional[dict] = None
    stride: Optional[int] = None  # --benchmark muse: raw-text windows start this many tokens apart


def embedded_target(cfg: RunConfig, device: torch.device) -> Target:
    """The tiny offline target (built and cached on first use), on generated or real TOFU text
    (``--data-dir`` and ``--authors`` were checked by :func:`.inputs.check_inputs`)."""
    seed = cfg.seed if cfg.target_seed is None else cfg.target_seed
    emb = build_embedded(cfg.cache_dir, size=cfg.size, seed=seed, forget_split=cfg.split,
                         tofu_dir=cfg.data_dir, n_authors=cfg.authors)
    model = emb.load_target().to(device)
    return Target(model, emb.tokenizer, emb.template, str(emb.data_dir), cfg.max_length or emb.max_length,
                  emb.load_target, emb.retain_path, emb.load_retain,
                  {"target": str(emb.target_path), "retain": str(emb.retain_path),
                   "target_report": {k: v for k, v in emb.reports["target"].items() if k != "epoch_loss"}})


def muse_embedded_target(cfg, device: torch.device) -> Target:
    """The offline MUSE-style target (built and cached on first use) and its retrained twin."""
    seed = cfg.seed if cfg.target_seed is None else cfg.target_seed
    news = build_embedded_news(cfg.cache_dir, size=cfg.size, seed=seed)
    model = news.load_target().to(device)
    # raw text has no prompt: the template is the embedded default's, unused (MUSE's probes write their own)
    return Target(model, news.tokenizer, get_template("phi"), str(news.data_dir),
                  cfg.max_length or news.max_length, news.load_target, news.retain_path, news.load_retain,
                  {"target": str(news.target_path), "retain": str(news.retain_path),
                   "target_report": {k: v for k, v in news.reports["target"].items() if k != "epoch_loss"}},
                  stride=cfg.stride or news.stride)


def load_model(spec: str, dtype: torch.dtype):
    """``(model, tokenizer)`` of a ``--model`` / ``--retain-model`` spec (hub name, local folder,
    ``.gguf`` file or alias, :func:`~fastgeffect.model_loading.load_causal_lm`), on CPU: the driver's
    one model-loading call. The tokenizer pads with EOS when it has no pad token, as TOFU does."""
    try:
        return load_causal_lm(spec, dtype=dtype)
    except ModelLoadError as e:
        raise SystemExit(f"--model / --retain-model: {e}") from None


def default_ps_protocol(cfg: RunConfig, preset: Preset) -> str:
    """``--ps-protocol`` when given; else ``clean`` for a ``--model`` in the chat format (the paper's
    protocol prompts with ``### Question: …  ### Answer:``, a format a chat model was never
    fine-tuned on, so its PS would measure the prompt mismatch), else the preset's."""
    if cfg.ps_protocol:
        return cfg.ps_protocol
    if cfg.model is None:
        return preset.ps_protocol
    try:
        tokenizer = load_tokenizer(cfg.model)
    except ModelLoadError as e:
        raise SystemExit(f"--model: {e}") from None
    # the rule hub_target applies when it builds the target
    return "clean" if choose_template(tokenizer, cfg.template, default=preset.template).chat else preset.ps_protocol


def load_twin(spec: str, dtype: torch.dtype, tokenizer) -> torch.nn.Module:
    """The ``--retain-model`` twin; refused when its tokenizer differs from the target's (its log
    would score other token sequences than the target's)."""
    model, twin_tokenizer = load_model(spec, dtype)
    if twin_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"--retain-model {spec} has another tokenizer than --model (vocabularies of "
                         f"{len(twin_tokenizer)} and {len(tokenizer)} tokens differ): pass the retain-only twin "
                         "fine-tuned from the same base model")
    return model


def tofu_subset(tofu_dir: str, n_authors: int, cache_dir: Optional[str]) -> Path:
    """Real TOFU restricted to ``n_authors`` authors (:func:`~fastgeffect.data.splits.subset_tofu`),
    written once into the cache, keyed by the source files' bytes and ``n_authors``."""
    key = config_hash({"tofu": folder_digest(tofu_dir), "n_authors": n_authors})
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cached_dir(root / "tofu-subsets" / f"authors{n_authors}-{key}",
                      lambda tmp: subset_tofu(tofu_dir, tmp, n_authors))
    add_subset_holdout(path, tofu_dir, n_authors)  # a subset cached before it had holdout files
    return path


def hub_target(cfg: RunConfig, preset: Preset, device: torch.device) -> Target:
    """A Hugging Face causal LM (hub name or local folder), on TOFU (``--data-dir``, restricted to
    ``--authors`` N when given); bf16 and gradient checkpointing by default on CUDA."""
    on_cuda = device.type == "cuda"
    bf16 = on_cuda if cfg.bf16 is None else cfg.bf16
    checkpointing = on_cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, tokenizer = load_model(cfg.model, dtype)
    model = model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    data_dir = str(tofu_subset(cfg.data_dir, cfg.authors, cfg.cache_dir)) if cfg.authors else cfg.data_dir
    twin = cfg.retain_model
    template = choose_template(tokenizer, cfg.template, default=preset.template)
    return Target(model, tokenizer, template, data_dir, cfg.max_length or preset.max_length,
                  lambda: load_model(cfg.model, dtype)[0], None if twin is None else Path(twin),
                  None if twin is None else lambda: load_twin(twin, dtype, tokenizer),
                  {"model": cfg.model, "dtype": str(dtype), "retain_model": twin, "data_dir": data_dir})


def build_target(cfg: RunConfig, preset: Preset, device: torch.device) -> Target:
    """The target, wrapped in LoRA adapters with ``--lora``."""
    if cfg.model:
        target = hub_target(cfg, preset, device)
        if cfg.benchmark != "tofu":  # raw text: windows half-overlapping unless --stride says otherwise
            target.stride = cfg.stride or max(1, target.max_length // 2)
    else:
        target = muse_embedded_target(cfg, device) if cfg.benchmark == "muse" else embedded_target(cfg, device)
    if cfg.lora:
        target.model = add_lora(target.model, cfg.lora)
    return target
