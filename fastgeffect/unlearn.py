"""The unlearning loop: objective steps with G-effects measured every k steps, resumable.

One optimiser step = ``batch_size`` forget samples (with their retain partners), split into
``grad_accum`` micro-batches whose reductions share the whole step's counts (exact accumulation).
After the backward, while the objective gradient sits in ``p.grad``, :class:`~fastgeffect.GEffect`
measures the unlearning G-effect (NLL on the step's forget samples) and the retaining G-effect
(NLL on held-out retain rows the optimiser never sees). The raw objective gradient is measured,
before clipping. Everything needed to continue (model, optimiser, scheduler, step) is saved
atomically at epoch ends and every ``save_every`` steps; an interrupted run resumes from the
last saved state and re-does (without duplicating log lines) the steps after it.

Data parallel (``accelerate launch`` with DDP, FSDP2 or DeepSpeed ZeRO-3; or any DDP / FSDP2 model
under ``torchrun``): the step's global batch is split
into ``world_size * grad_accum`` micro-batches, rank r taking ``grad_accum`` of them; the counts
behind every reduction are summed over ranks, so gradients, G-effects and trained parameters are
those of one process with the same global batch (retain partners are paired by global forget
index, hence distinct across ranks and independent of the world size). Only the main process
writes files. Under DeepSpeed its engine runs the backward passes and the step (with the clipping
set from ``max_grad_norm``), and the resumable state is a DeepSpeed checkpoint next to ``state.pt``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed as dist_
from .data.collate import collate_pairs, collate_qa
from .data.unlearning import UnlearningData
from .geffect import GEffect, GEffectLogger
from .geffect.log import truncate_jsonl
from .losses import nll
from .models import is_deepspeed, unwrap
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


def nll_risk(model: torch.nn.Module, batch: Dict[str, torch.Tensor], num_tokens=None, weight: float = 1.0
             ) -> torch.Tensor:
    """The default risk R: token-mean NLL over the batch's answer tokens (``num_tokens``: the divisor
    of the whole, all-rank risk batch, so each rank returns its share)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = nll(out.logits, batch["labels"], num_items_in_batch=num_tokens)
    return loss * weight if weight != 1.0 else loss


def n_tokens(items: List[dict]) -> int:
    """Valid shifted labels in ``items`` (the token-mean divisor)."""
    return int(sum(int((it["labels"][1:] != -100).sum()) for it in items))


class _NoLog:
    """Stands in for log files on non-main ranks."""
    def log(self, *a, **k):
        pass

    def write(self, *a):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def full_model_state(model) -> dict:
    """The whole (unsharded, CPU) model state dict; a collective under data parallel, where only the
    main process gets the tensors (the others get an empty dict)."""
    if not dist_.is_distributed():
        return unwrap(model).state_dict()
    if is_deepspeed(model):
        return _gather_zero3_state(model.module)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gather_zero3_state(module: torch.nn.Module) -> dict:
    """ZeRO-3 parameters gathered one at a time (never the whole model at once on any rank)."""
    import deepspeed

    out, main = {}, dist_.is_main()
    for name, t in module.state_dict(keep_vars=True).items():  # tied weights: one tensor, two names
        if isinstance(t, torch.nn.Parameter) and hasattr(t, "ds_id"):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if main:
                    out[name] = t.detach().to("cpu", copy=True)
        elif main:
            out[name] = t.detach().to("cpu", copy=True)
    return out


DEEPSPEED_DIR = "deepspeed_state"


def configure_deepspeed(ds_config: dict, cfg: UnlearnConfig, world: int) -> None:
    """Our step is one ``engine.step()`` after all micro-batch backwards (DeepSpeed must not divide
    the loss or skip steps for its own accumulation), clipped at ``max_grad_norm``."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    ds_config.update(train_micro_batch_size_per_gpu=micro, train_batch_size=micro * world,
                     gradient_accumulation_steps=1, gradient_clipping=cfg.max_grad_norm)
    ds_config.setdefault("steps_per_print", 1 << 30)


def save_state(path: Path, model, optimizer, scheduler, step: int, epoch: int, batch_in_epoch: int) -> None:
    """Atomic resumable state: ``state.pt`` is replaced only once everything it points to is written."""
    meta = {"scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}
    if is_deepspeed(model):  # DeepSpeed's own sharded checkpoint (fp32 master weights, optimiser)
        tag = f"step{step}-epoch{epoch}-batch{batch_in_epoch}"  # never the tag state.pt points to now
        model.save_checkpoint(str(path.parent / DEEPSPEED_DIR), tag=tag, save_latest=False)
        meta["deepspeed_tag"] = tag
    elif dist_.is_distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        meta["model"], meta["optimizer"] = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        meta["model"], meta["optimizer"] = model.state_dict(), optimizer.state_dict()
    if dist_.is_main():
        tmp = path.with_suffix(".tmp")
        torch.save(meta, tmp)
        os.replace(tmp, path)  # atomic: an interruption never leaves a half-written state
        if "deepspeed_tag" in meta:  # older DeepSpeed checkpoints are no longer referenced
            for old in (path.parent / DEEPSPEED_DIR).iterdir():
                if old.is_dir() and old.name != meta["deepspeed_tag"]:
                    shutil.rmtree(old)
    dist_.barrier()


class Unlearner:
    """Runs ``objective`` on ``data`` with ``model``, writing ``geffect.jsonl`` and ``train_log.jsonl``
    in ``out_dir``."""

    def __init__(self, model: torch.nn.Module, objective: Objective, data: UnlearningData, cfg: UnlearnConfig,
                 out_dir: Path, *, device: Optional[torch.device] = None, progress: bool = True,
                 on_epoch_end: Optional[Callable[[int, "Unlearner"], None]] = None, accelerator=None):
        cfg.check()
        self.world, self.rank = dist_.world_size(), dist_.rank()
        dist_.check_divisible(cfg.batch_size, self.world, cfg.grad_accum)
        self.model, self.objective, self.data, self.cfg = model, objective, data, cfg
        self.out_dir = Path(out_dir)
        self.device = device or next(model.parameters()).device
        self.progress = progress and dist_.is_main()
        self.on_epoch_end = on_epoch_end
        self.n_steps_epoch = steps_per_epoch(len(data.pairs), cfg.batch_size)
        self.total_steps = self.n_steps_epoch * cfg.epochs
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        adamw = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.optimizer = adamw
        self.accelerator = accelerator
        if accelerator is not None:  # DDP / FSDP2 / DeepSpeed wrapping by accelerate; our own exact accumulation
            if accelerator.state.deepspeed_plugin is not None:
                configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, self.world)
            self.model, self.optimizer = accelerator.prepare(model, adamw)
        self.strategy = dist_.strategy(self.model)
        self.params = [p for group in adamw.param_groups for p in group["params"]]
        if self.strategy == "deepspeed" and cfg.geffect_every > 0:
            dist_.reduction_mode(self.model)  # refuses ZeRO stages other than 3 before any step
        warmup = max(1, round(cfg.warmup_epochs * self.n_steps_epoch))
        # on the AdamW itself: accelerate's and DeepSpeed's wrappers update its param_groups in place
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, warmup_linear(self.total_steps, warmup))
        self.geffect = GEffect(self.model, groups=cfg.geffect_groups) if cfg.geffect_every > 0 else None
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
        if not dist_.broadcast_object(self.state_path.exists()):
            return False
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)  # loaders move it
        if ("deepspeed_tag" in state) != (self.strategy == "deepspeed"):
            raise RuntimeError(f"{self.state_path} was written by a run {'with' if 'deepspeed_tag' in state else 'without'} "
                               "DeepSpeed; resume it with the same kind of launch")
        if self.strategy == "deepspeed":
            self.model.load_checkpoint(str(self.out_dir / DEEPSPEED_DIR), tag=state["deepspeed_tag"],
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        elif dist_.is_distributed():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.start_epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        return True

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        save_state(self.state_path, self.model, self.optimizer, self.scheduler, self.step, epoch, batch_in_epoch)

    # ---- one step ---------------------------------------------------------------------------
    def global_chunks(self, epoch: int, b: int) -> List[List[int]]:
        """The step's forget indices, cut into the global micro-batches (``world * grad_accum``;
        with one process, as many as there are samples when fewer)."""
        order = epoch_order(len(self.data.pairs), self.cfg.seed, epoch)
        idx = order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size].tolist()
        n = self.world * self.cfg.grad_accum
        n_micro = min(n, len(idx)) if self.world == 1 else n
        return [idx[i::n_micro] for i in range(n_micro)]

    def step_batches(self, epoch: int, b: int) -> List[dict]:
        """This rank's micro-batches. A rank left without samples (a short last batch) gets a copy of
        the first sample with ``weight`` 0, so that every rank runs the same collectives."""
        chunks = self.global_chunks(epoch, b)
        self.data.pairs.set_epoch(epoch)
        A = len(chunks) // self.world
        mine = chunks[self.rank * A:(self.rank + 1) * A]
        self.micro_weights = [1.0 if c else 0.0 for c in mine]
        return [to_device(collate_pairs([self.data.pairs[i] for i in (c or chunks[0][:1])]), self.device)
                for c in mine]

    def retain_risk_items(self) -> List[dict]:
        """Held-out retain rows for the retaining risk: a fresh, seeded draw at every step."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        n = min(self.cfg.geffect_batch, len(self.data.heldout))
        idx = torch.randperm(len(self.data.heldout), generator=g)[:n].tolist()
        return [self.data.heldout[i] for i in idx]

    def retain_risk_batch(self) -> dict:
        return to_device(collate_qa(self.retain_risk_items()), self.device)

    def forget_risk_items(self, chunks: List[List[int]]) -> List[dict]:
        """The first ``geffect_batch`` forget samples of the step, in global micro-batch order."""
        return [self.data.pairs[i]["forget"] for c in chunks for i in c][:self.cfg.geffect_batch]

    def forget_risk_batch(self, micro: List[dict]) -> dict:
        items = [dict(input_ids=m["forget"]["input_ids"][i], attention_mask=m["forget"]["attention_mask"][i],
                      labels=m["forget"]["labels"][i], index=m["forget"]["index"][i])
                 for m in micro for i in range(m["forget"]["labels"].shape[0])]
        return to_device(collate_qa(items[:self.cfg.geffect_batch]), self.device)

    def risk_fn(self, items: List[dict]) -> Callable[[], torch.Tensor]:
        """The NLL risk on ``items``; under data parallel, this rank's share (rows ``rank::world``,
        divided by the token count of all rows)."""
        if self.world == 1:
            batch = to_device(collate_qa(items), self.device)
            return lambda: nll_risk(self.model, batch)
        mine = items[self.rank::self.world]
        batch = to_device(collate_qa(mine or items[:1]), self.device)
        total = max(1, n_tokens(items))
        return lambda: nll_risk(self.model, batch, total, 1.0 if mine else 0.0)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":  # our losses already carry the global divisors
            self.model.backward(loss, scale_wrt_gas=False)
        elif self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _clip_and_step(self) -> float:
        """Clip to ``max_grad_norm`` and step; the gradient norm before clipping."""
        if self.strategy == "deepspeed":
            self.model.step()  # clips (gradient_clipping), steps and zeroes the partitions
            grad_norm = self.model.get_global_grad_norm()
        else:
            clip = self.accelerator.clip_grad_norm_ if self.accelerator is not None else torch.nn.utils.clip_grad_norm_
            # the optimiser's own parameters (under FSDP2 the module may expose unsharded ones)
            grad_norm = clip(self.params, self.cfg.max_grad_norm)
            if dist_.is_dtensor(grad_norm):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def train_step(self, micro: List[dict]) -> dict:
        self.model.train()
        if self.strategy == "deepspeed":
            self.model.optimizer.zero_grad()  # accelerate's wrapper leaves this to the engine
        else:
            self.optimizer.zero_grad(set_to_none=True)
        counts: Dict[str, torch.Tensor] = {}
        ws = self.micro_weights if self.world > 1 else [1.0] * len(micro)
        for m, w in zip(micro, ws):
            if w == 0.0:
                continue
            for k, v in count_items(m).items():
                counts[k] = counts.get(k, 0) + v
        if self.world > 1:  # every reduction divides by the counts of the whole global batch
            keys = sorted(set().union(*dist_.all_gather_objects(sorted(counts))))
            total = dist_.all_reduce_sum(torch.stack([torch.as_tensor(counts.get(k, 0)).double().cpu()
                                                      for k in keys]))
            counts = {k: total[i].to(self.device) for i, k in enumerate(keys)}
        logs: Dict[str, float] = {}
        weights, inv_conf = [], []
        last = len(micro) - 1
        for j, (m, w) in enumerate(zip(micro, ws)):
            try:
                out, error = self.objective(self.model, m, num_items=counts), None
            except FloatingPointError as e:
                out, error = None, e
            if self.world > 1:  # every rank stops together (a lone rank would leave the others in a collective)
                if float(dist_.all_reduce_sum(torch.tensor(float(error is not None)))) > 0:
                    bad = dist_.all_gather_objects(None if error is None else str(error))
                    raise NonFiniteLoss(f"step {self.step}: " + "; ".join(
                        f"rank {r}: {b}" for r, b in enumerate(bad) if b))
            elif error is not None:
                raise NonFiniteLoss(f"step {self.step}: {error}") from error
            if self.world == 1:
                out.loss.backward()
            else:
                # DDP/FSDP average over ranks; each rank's loss is its share of the global sum
                sync = j == last or not isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
                with (contextlib.nullcontext() if sync else self.model.no_sync()):
                    self._backward(out.loss * (w * self.world))
                if w == 0.0:
                    continue
            for k, v in out.logs().items():
                logs[k] = logs.get(k, 0.0) + (v if k in ("loss", "forget_loss", "reg_loss") else v / len(micro))
            d = out.details
            if "weights" in d:
                weights.append(d["weights"][d["mask"]].detach().float().cpu())
            elif "seq_weights" in d:
                weights.append(d["seq_weights"].detach().float().cpu())
            if "logprobs" in d:  # GA's gradient carries 1/p per token: its "inverse confidence"
                inv_conf.append(torch.exp(-d["logprobs"][d["mask"]].double()).cpu())
        if self.world > 1:
            logs, weights, inv_conf = self._gather_logs(logs, len(micro), weights, inv_conf)
        if inv_conf:
            logs["inv_conf"] = float(torch.cat(inv_conf).mean())
        if weights:
            w = torch.cat(weights)
            logs["weights"] = {"mean": float(w.mean()), "std": float(w.std(unbiased=False)) if w.numel() > 1 else 0.0,
                               "min": float(w.min()), "max": float(w.max())}
        return logs

    def _gather_logs(self, logs: dict, n_micro: int, weights: list, inv_conf: list):
        """Logs of the global batch: loss terms are shares (summed), other values averaged."""
        parts = dist_.all_gather_objects((logs, n_micro, weights, inv_conf))
        n = sum(p[1] for p in parts)
        out: Dict[str, float] = {}
        for lg, nm, _, _ in parts:
            for k, v in lg.items():
                out[k] = out.get(k, 0.0) + (v if k in ("loss", "forget_loss", "reg_loss") else v * nm / n)
        return out, [w for p in parts for w in p[2]], [c for p in parts for c in p[3]]

    def measure(self, micro: List[dict], logs: dict, logger: GEffectLogger, epoch: int) -> dict:
        if self.world == 1:
            forget_fn = (lambda b: lambda: nll_risk(self.model, b))(self.forget_risk_batch(micro))
            retain_fn = self.risk_fn(self.retain_risk_items())
        else:
            forget_fn = self.risk_fn(self.forget_risk_items(self._chunks))
            retain_fn = self.risk_fn(self.retain_risk_items())
        self.model.eval()  # risks without dropout
        res = self.geffect.measure({"unlearn": forget_fn, "retain": retain_fn})
        self.model.train()
        extra = {k: v for k, v in logs.items() if k != "weights"}
        logger.log(self.step, res, stats=logs.get("weights"), epoch=epoch, objective=self.objective.name,
                   lr=self.scheduler.get_last_lr()[0], **extra)
        return res

    def per_sample(self, micro: List[dict]) -> None:
        """PG-effects of the step's first micro-batch, with its per-sample objective weights."""
        m = micro[0]  # under data parallel: the first micro-batch of every rank, together
        # a rank left idle by a short last batch joins with a zero-weight copy and reports nothing
        w = self.micro_weights[0] if self.world > 1 else 1.0
        base = unwrap(self.model)
        counts = count_items(m)
        if self.world > 1:
            counts = {k: dist_.all_reduce_sum(v.double().cpu() * w).to(self.device) for k, v in counts.items()}

        def risk():
            logits = base(input_ids=m["forget"]["input_ids"], attention_mask=m["forget"]["attention_mask"]).logits
            share = nll(logits, m["forget"]["labels"], num_items_in_batch=counts["forget_tokens"] if self.world > 1
                        else None)
            return share * w if w != 1.0 else share

        self.model.eval()
        res = self.geffect.per_sample(risk, lambda: self.objective.forget_loss(base, m, counts, per_sample=True)[0])
        with torch.no_grad():
            _, details = self.objective.forget_loss(base, m, counts)
        dist_.reshard(self.model)
        self.model.train()
        rec = {"step": self.step, "index": m["forget"]["index"].tolist(), "pg_effect": res.tolist()}
        if "seq_weights" in details:
            rec["seq_weights"] = details["seq_weights"].tolist()
        elif "weights" in details:
            mask = details["mask"]
            rec["seq_weights"] = ((details["weights"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
        parts = [p for p in dist_.all_gather_objects(rec if w else None) if p is not None]
        if self.world > 1:
            rec = {"step": self.step, **{k: [x for p in parts for x in p[k]] for k in rec if k != "step"}}
        if dist_.is_main():
            with open(self.out_dir / "pg_effects.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        main = dist_.is_main()
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in ("train_log.jsonl", "pg_effects.jsonl"):  # a resumed run re-does steps >= self.step
                truncate_jsonl(self.out_dir / name, self.step)
        logger = GEffectLogger(self.out_dir / "geffect.jsonl", resume_step=self.step) if main else _NoLog()
        train_log = open(self.out_dir / "train_log.jsonl", "a", encoding="utf-8") if main else _NoLog()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   desc=f"unlearn {self.objective.name}")
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                first = self.start_batch if epoch == self.start_epoch else 0
                for b in range(first, self.n_steps_epoch):
                    if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                        self.save(epoch, b)
                        return {"completed": False, "step": self.step}
                    self._chunks = self.global_chunks(epoch, b)
                    micro = self.step_batches(epoch, b)
                    try:
                        logs = self.train_step(micro)
                    except NonFiniteLoss:
                        self.save(epoch, b)  # the last finite state, resumable (all ranks stop together)
                        raise
                    postfix = {"loss": f"{logs['loss']:.3g}"}
                    if self.geffect is not None and self.step % cfg.geffect_every == 0:
                        res = self.measure(micro, logs, logger, epoch)
                        postfix.update(e_u=f"{res['unlearn'].total:.3g}", e_r=f"{res['retain'].total:.3g}")
                    if self.geffect is not None and self.step in self.pg_steps:
                        self.per_sample(micro)
                    grad_norm = self._clip_and_step()
                    train_log.write(json.dumps({"step": self.step, "epoch": epoch, "grad_norm": grad_norm,
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
