"""The tiny target model and its retain-only twin: a ``LlamaForCausalLM`` built from a config and
fine-tuned (nanoGPT-style AdamW loop) with the phi template until it memorises its data.

The target learns ``full``; the retain twin learns the retain split only (the reference for
Forget Quality). Both also learn the real-authors and world-facts sets, which play the part of
the knowledge a real model brings from pre-training (Model Utility measures its loss).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from ..data.collate import collate_qa
from ..data.qa import QADataset
from ..losses import token_logprobs, valid_mask


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    tie_word_embeddings: bool = False  # separate lm_head: its G-effect group is then its own

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def make_model(config: ModelConfig, tokenizer, max_positions: int, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama sized for ``tokenizer`` and sequences of ``max_positions``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                      num_attention_heads=config.num_attention_heads,
                      num_key_value_heads=config.num_attention_heads,
                      max_position_embeddings=max_positions,
                      tie_word_embeddings=config.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(model: torch.nn.Module, dataset: QADataset, cfg: TrainConfig) -> list:
    """Fine-tune ``model`` on ``dataset`` (answer tokens only); returns the mean loss of each epoch."""
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=g, collate_fn=collate_qa)
    total = cfg.epochs * len(loader)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    history, step = [], 0
    for _ in range(cfg.epochs):
        running = 0.0
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            running += out.loss.item()
            step += 1
        history.append(running / len(loader))
    model.eval()
    return history


@torch.no_grad()
def answer_stats(model: torch.nn.Module, dataset: QADataset, batch_size: int = 64) -> Dict[str, float]:
    """Teacher-forced answer-token ``accuracy`` (greedy next token = label) and token-mean ``loss``."""
    model.eval()
    correct = count = 0
    nll = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_qa):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        mask = valid_mask(labels)
        pred = torch.zeros_like(labels)
        pred[:, 1:] = logits[:, :-1].argmax(-1)
        correct += int(((pred == labels) & mask).sum())
        count += int(mask.sum())
        nll -= float(token_logprobs(logits, labels)[mask].double().sum())
    return {"accuracy": correct / count, "loss": nll / count, "tokens": count}


def train_and_save(out_dir: Path, tokenizer, train_set: QADataset, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   eval_sets: Dict[str, QADataset], meta: Optional[dict] = None) -> dict:
    """Train a fresh model on ``train_set``; save it, the tokenizer and ``train_report.json``."""
    t0 = time.perf_counter()
    model = make_model(model_cfg, tokenizer, 2 * train_set.max_length, seed=train_cfg.seed)  # room to generate
    history = train_lm(model, train_set, train_cfg)
    report = {"train_seconds": round(time.perf_counter() - t0, 2), "epoch_loss": history,
              "n_parameters": sum(p.numel() for p in model.parameters()), "n_train": len(train_set),
              "model": model_cfg.to_dict(), "train": train_cfg.to_dict(), **(meta or {}),
              "answer_stats": {name: answer_stats(model, ds) for name, ds in eval_sets.items()}}
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "train_report.json").write_text(json.dumps(report, indent=1))
    return report
