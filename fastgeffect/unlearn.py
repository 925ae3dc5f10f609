"""The unlearning loop: objective steps with G-effects measured every k steps, resumable.

One optimiser step = ``batch_size`` forget samples (with their retain partners), split into
``grad_accum`` micro-batches whose reductions share the whole step's counts (exact accumulation).
After the backward, while the objective gradient sits in ``p.grad``, :class:`~fastgeffect.GEffect`
measures the unlearning G-effect (NLL on the step's forget samples) and the retaining G-effect
(NLL on held-out retain rows the optimiser never sees). The raw objective gradient is measured,
before clipping. Everything needed to continue (model, optimiser, scheduler, step) is saved
atomically at epoch ends and every ``save_every`` steps; an interrupted run resumes from the
last saved state and re-does (without duplicating log lines) the steps after it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data.collate import collate_pairs, collate_qa
from .data.unlearning import UnlearningData
from .geffect import GEffect, GEffectLogger
from .losses import nll
from .objectives import Objective
from .objectives.base import count_items

STATE_FILE = "state.pt"


@dataclass
class UnlearnConfig:
    epochs: int = 5
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_grad_norm: float = 1.0
    geffect_every: int = 1  # 0: never
    geffect_batch: int = 16  # samples in each risk batch
    geffect_groups: str = "paper"
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
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


class NonFiniteLoss(FloatingPointError):
    """The objective became NaN/inf; the state before the step is saved."""


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return math.ceil(n_samples / batch_size)


def warmup_linear(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak lr, then linear decay to 0 (the HF default TOFU uses)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def nll_risk(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The default risk R: token-mean NLL over the batch's answer tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return nll(out.logits, batch["labels"])


def truncate_jsonl(path: Path, from_step: int) -> None:
    """Drop the records with ``step >= from_step`` (and a torn last line) from a JSON-lines log."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    kept = [ln for ln in lines[:-1] if ln.strip() and json.loads(ln).get("step", -1) < from_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    os.replace(tmp, path)


def save_state(path: Path, model, optimizer, scheduler, step: int, epoch: int, batch_in_epoch: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch}, tmp)
    os.replace(tmp, path)  # atomic: an interruption never leaves a half-written state


class Unlearner:
    """Runs ``objective`` on ``data`` with ``model``, writing ``geffect.jsonl`` and ``train_log.jsonl``
    in ``out_dir``."""

    def __init__(self, model: torch.nn.Module, objective: Objective, data: UnlearningData, cfg: UnlearnConfig,
                 out_dir: Path, *, device: Optional[torch.device] = None, progress: bool = True,
                 on_epoch_end: Optional[Callable[[int, "Unlearner"], None]] = None):
        cfg.check()
        self.model, self.objective, self.data, self.cfg = model, objective, data, cfg
        self.out_dir = Path(out_dir)
        self.device = device or next(model.parameters()).device
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        self.n_steps_epoch = steps_per_epoch(len(data.pairs), cfg.batch_size)
        self.total_steps = self.n_steps_epoch * cfg.epochs
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, round(cfg.warmup_epochs * self.n_steps_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_linear(self.total_steps, warmup))
        self.geffect = GEffect(model, groups=cfg.geffect_groups) if cfg.geffect_every > 0 else None
        self.pg_steps = {self.total_steps - 1 if s < 0 else int(s) for s in cfg.pg_steps}
        self.step = 0
        self.start_epoch, self.start_batch = 0, 0

    # ---- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def resume(self) -> bool:
        """Load the saved state if there is one; True when training continues from it."""
        if not self.state_path.exists():
            return False
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.start_epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        return True

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        save_state(self.state_path, self.model, self.optimizer, self.scheduler, self.step, epoch, batch_in_epoch)

    # ---- one step ---------------------------------------------------------------------------
    def step_batches(self, epoch: int, b: int) -> List[dict]:
        order = epoch_order(len(self.data.pairs), self.cfg.seed, epoch)
        idx = order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size].tolist()
        self.data.pairs.set_epoch(epoch)
        n_micro = min(self.cfg.grad_accum, len(idx))
        chunks = [idx[i::n_micro] for i in range(n_micro)]
        return [to_device(collate_pairs([self.data.pairs[i] for i in c]), self.device) for c in chunks]

    def retain_risk_batch(self) -> dict:
        """Held-out retain rows for the retaining risk: a fresh, seeded draw at every step."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        n = min(self.cfg.geffect_batch, len(self.data.heldout))
        idx = torch.randperm(len(self.data.heldout), generator=g)[:n].tolist()
        return to_device(collate_qa([self.data.heldout[i] for i in idx]), self.device)

    def forget_risk_batch(self, micro: List[dict]) -> dict:
        items = [dict(input_ids=m["forget"]["input_ids"][i], attention_mask=m["forget"]["attention_mask"][i],
                      labels=m["forget"]["labels"][i], index=m["forget"]["index"][i])
                 for m in micro for i in range(m["forget"]["labels"].shape[0])]
        return to_device(collate_qa(items[:self.cfg.geffect_batch]), self.device)

    def train_step(self, micro: List[dict]) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        counts: Dict[str, torch.Tensor] = {}
        for m in micro:
            for k, v in count_items(m).items():
                counts[k] = counts.get(k, 0) + v
        logs: Dict[str, float] = {}
        weights, inv_conf = [], []
        for m in micro:
            try:
                out = self.objective(self.model, m, num_items=counts)
            except FloatingPointError as e:
                raise NonFiniteLoss(f"step {self.step}: {e}") from e
            out.loss.backward()
            for k, v in out.logs().items():
                logs[k] = logs.get(k, 0.0) + (v if k in ("loss", "forget_loss", "reg_loss") else v / len(micro))
            d = out.details
            if "weights" in d:
                weights.append(d["weights"][d["mask"]].detach().float().cpu())
            elif "seq_weights" in d:
                weights.append(d["seq_weights"].detach().float().cpu())
            if "logprobs" in d:  # GA's gradient carries 1/p per token: its "inverse confidence"
                inv_conf.append(torch.exp(-d["logprobs"][d["mask"]].double()).cpu())
        if inv_conf:
            logs["inv_conf"] = float(torch.cat(inv_conf).mean())
        if weights:
            w = torch.cat(weights)
            logs["weights"] = {"mean": float(w.mean()), "std": float(w.std(unbiased=False)) if w.numel() > 1 else 0.0,
                               "min": float(w.min()), "max": float(w.max())}
        return logs

    def measure(self, micro: List[dict], logs: dict, logger: GEffectLogger, epoch: int) -> dict:
        forget = self.forget_risk_batch(micro)
        retain = self.retain_risk_batch()
        self.model.eval()  # risks without dropout
        res = self.geffect.measure({"unlearn": lambda: nll_risk(self.model, forget),
                                    "retain": lambda: nll_risk(self.model, retain)})
        self.model.train()
        extra = {k: v for k, v in logs.items() if k != "weights"}
        logger.log(self.step, res, stats=logs.get("weights"), epoch=epoch, objective=self.objective.name,
                   lr=self.scheduler.get_last_lr()[0], **extra)
        return res

    def per_sample(self, micro: List[dict]) -> None:
        """PG-effects of the step's first micro-batch, with its per-sample objective weights."""
        m = micro[0]
        self.model.eval()
        res = self.geffect.per_sample(
            lambda: nll_risk(self.model, m["forget"]),
            lambda: self.objective.forget_loss(self.model, m, count_items(m), per_sample=True)[0])
        _, details = self.objective.forget_loss(self.model, m, count_items(m))
        self.model.train()
        rec = {"step": self.step, "index": m["forget"]["index"].tolist(), "pg_effect": res.tolist()}
        if "seq_weights" in details:
            rec["seq_weights"] = details["seq_weights"].tolist()
        elif "weights" in details:
            mask = details["mask"]
            rec["seq_weights"] = ((details["weights"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
        with open(self.out_dir / "pg_effects.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("train_log.jsonl", "pg_effects.jsonl"):  # a resumed run re-does steps >= self.step
            truncate_jsonl(self.out_dir / name, self.step)
        logger = GEffectLogger(self.out_dir / "geffect.jsonl", resume_step=self.step)
        train_log = open(self.out_dir / "train_log.jsonl", "a", encoding="utf-8")
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   desc=f"unlearn {self.objective.name}")
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                first = self.start_batch if epoch == self.start_epoch else 0
                for b in range(first, self.n_steps_epoch):
                    if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                        self.save(epoch, b)
                        return {"completed": False, "step": self.step}
                    micro = self.step_batches(epoch, b)
                    try:
                        logs = self.train_step(micro)
                    except NonFiniteLoss:
                        self.save(epoch, b)  # the last finite state, resumable
                        raise
                    postfix = {"loss": f"{logs['loss']:.3g}"}
                    if self.geffect is not None and self.step % cfg.geffect_every == 0:
                        res = self.measure(micro, logs, logger, epoch)
                        postfix.update(e_u=f"{res['unlearn'].total:.3g}", e_r=f"{res['retain'].total:.3g}")
                    if self.geffect is not None and self.step in self.pg_steps:
                        self.per_sample(micro)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    train_log.write(json.dumps({"step": self.step, "epoch": epoch, "grad_norm": float(grad_norm),
                                                **logs}) + "\n")
                    train_log.flush()
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(postfix)
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save(epoch, b + 1)
                self.save(epoch + 1, 0)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, self)
        finally:
            bar.close()
            logger.close()
            train_log.close()
        return {"completed": True, "step": self.step}


def config_dict(cfg: UnlearnConfig) -> dict:
    d = asdict(cfg)
    d["pg_steps"] = list(cfg.pg_steps)
    return d
