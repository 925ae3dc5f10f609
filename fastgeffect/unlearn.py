"""The unlearning loop: objective steps with G-effects measured every k steps, resumable.

One optimiser step = ``batch_size`` forget samples (with their retain partners), split into
``grad_accum`` micro-batches whose reductions share the whole step's counts (exact accumulation).
After the backward, while the objective gradient sits in ``p.grad``, :class:`~fastgeffect.GEffect`
measures the unlearning G-effect (NLL on the step's forget samples) and the retaining G-effect
(NLL on held-out retain rows the optimiser never sees). The raw objective gradient is measured,
before clipping. With ``update_effects`` the same measurement also predicts the AdamW step itself
(clipped, as it will be taken: :mod:`fastgeffect.geffect.update`), and after the step each risk is
evaluated once more on the same batch (one forward, no backward), so the log holds the realised
change of each risk next to both predictions, ``-lr·e`` and ``-lr·u``.
Everything needed to continue (model, optimiser, scheduler, step) is saved
atomically at epoch ends and every ``save_every`` steps; an interrupted run resumes from the
last saved state and re-does (without duplicating log lines) the steps after it.

Data parallel (``accelerate launch`` with DDP, FSDP2 or DeepSpeed ZeRO-3; or any DDP / FSDP2 model
under ``torchrun``): the step's global batch is split into ``world_size * grad_accum`` micro-batches,
rank r taking ``grad_accum`` of them (:func:`~fastgeffect.training.plan.plan_step`); the counts
behind every reduction are summed over ranks, so gradients, G-effects and trained parameters are
those of one process with the same global batch (retain partners are paired by global forget
index, hence distinct across ranks and independent of the world size). Only the main process
writes files. The engine-specific parts (backward, clip-and-step, the resumable state) are one
backend object (:mod:`fastgeffect.training.backend`), chosen once.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import distributed as dist_
from . import run_files as files
from .data.collate import collate_qa
from .data.unlearning import UnlearningData
from .geffect import GEffect, GEffectLogger
from .jsonl import truncate_jsonl
from .losses import nll
from .model_structure import unwrap
from .objectives import Objective
from .objectives.base import count_items
from .training.backend import STATE_FILE, make_backend
from .training.batches import forget_risk_items, n_tokens, retain_risk_items, step_batches, to_device
from .training.config import UnlearnConfig, config_dict  # noqa: F401  (re-exported: users import it from here)
from .training.plan import StepPlan, plan_step, steps_per_epoch, warmup_linear
from .training.reduce import LOSS_TERMS, global_counts, global_logs


class NonFiniteLoss(FloatingPointError):
    """The objective became NaN/inf; the state before the step is saved."""


def stop_if_nonfinite(error: Optional[FloatingPointError], step: int) -> None:
    """:class:`NonFiniteLoss` on every rank when the objective failed on any: a rank stopping alone
    would leave the others waiting in a collective (one flag all-reduce per micro-batch)."""
    if not dist_.is_distributed():
        if error is not None:
            raise NonFiniteLoss(f"step {step}: {error}") from error
        return
    if float(dist_.all_reduce_sum(torch.tensor(float(error is not None)))) > 0:
        bad = dist_.all_gather_objects(None if error is None else str(error))
        raise NonFiniteLoss(f"step {step}: " + "; ".join(f"rank {r}: {b}" for r, b in enumerate(bad) if b))


def nll_risk(model: torch.nn.Module, batch: Dict[str, torch.Tensor], num_tokens=None, weight: float = 1.0
             ) -> torch.Tensor:
    """The default risk R: token-mean NLL over the batch's answer tokens (``num_tokens``: the divisor
    of the whole, all-rank risk batch, so each rank returns its share)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = nll(out.logits, batch["labels"], num_items_in_batch=num_tokens)
    return loss * weight if weight != 1.0 else loss


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


class Unlearner:
    """Runs ``objective`` on ``data`` with ``model``, writing ``geffect.jsonl`` and ``train_log.jsonl``
    in ``out_dir``."""

    def __init__(self, model: torch.nn.Module, objective: Objective, data: UnlearningData, cfg: UnlearnConfig,
                 out_dir: Path, *, device: Optional[torch.device] = None, progress: bool = True,
                 on_epoch_end: Optional[Callable[[int, "Unlearner"], None]] = None, accelerator=None):
        cfg.check()
        self.world, self.rank = dist_.world_size(), dist_.rank()
        dist_.check_divisible(cfg.batch_size, self.world, cfg.grad_accum)
        self.objective, self.data, self.cfg = objective, data, cfg
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
        micro_batch = cfg.batch_size // (self.world * cfg.grad_accum)  # per rank
        self.backend = make_backend(model, adamw, accelerator, micro_batch=micro_batch, max_grad_norm=cfg.max_grad_norm)
        self.model = self.backend.model
        self.strategy = dist_.strategy(self.model)
        if cfg.geffect_every > 0:
            dist_.reduction_mode(self.model)  # refuses, before any step, sharding G-effects do not support
        warmup = max(1, round(cfg.warmup_epochs * self.n_steps_epoch))
        # on the AdamW itself: accelerate's and DeepSpeed's wrappers update its param_groups in place
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, warmup_linear(self.total_steps, warmup))
        self.geffect = GEffect(self.model, groups=cfg.geffect_groups) if cfg.geffect_every > 0 else None
        self.optimizer = adamw
        self.update_effects = self.geffect is not None and cfg.update_effects
        if self.update_effects and dist_.reduction_mode(self.model) == "zero3":
            warnings.warn("update effects are not measured under DeepSpeed ZeRO-3 (its Adam state lives in "
                          "DeepSpeed's partitions); the G-effects are", stacklevel=2)
            self.update_effects = False
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
        state = self.backend.load(self.state_path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.start_epoch, self.start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.objective.lam = state.get("lam", self.objective.lam)  # PDU's dual variable moves during training
        return True

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        self.backend.save(self.state_path, {"scheduler": self.scheduler.state_dict(), "step": self.step,
                                            "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                            "lam": self.objective.lam})

    # ---- one step ---------------------------------------------------------------------------
    def plan(self, epoch: int, batch: int) -> StepPlan:
        cfg = self.cfg
        return plan_step(len(self.data.pairs), cfg.batch_size, cfg.grad_accum, self.world, self.rank, cfg.seed,
                         epoch, batch)

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

    def train_step(self, micro: List[dict], plan: StepPlan) -> dict:
        """Forwards and backwards of this rank's micro-batches: the objective gradient of the global
        batch is then in the gradients. Returns the step's logs (of the global batch)."""
        self.model.train()
        self.backend.zero_grad()
        counts: Dict[str, torch.Tensor] = {}
        for m, w in zip(micro, plan.weights):
            if w == 0.0:
                continue
            for k, v in count_items(m).items():
                counts[k] = counts.get(k, 0) + v
        counts = global_counts(counts, self.device)  # every reduction divides by the whole global batch's counts
        logs: Dict[str, float] = {}
        weights, inv_conf = [], []
        last = len(micro) - 1
        for j, (m, w) in enumerate(zip(micro, plan.weights)):
            try:
                out, error = self.objective(self.model, m, num_items=counts), None
            except FloatingPointError as e:
                out, error = None, e
            stop_if_nonfinite(error, self.step)
            # DDP/FSDP average over ranks; each rank's loss is its share of the global sum
            self.backend.backward(out.loss * (w * self.world), sync=j == last)
            if w == 0.0:
                continue
            for k, v in out.logs().items():
                logs[k] = logs.get(k, 0.0) + (v if k in LOSS_TERMS else v / len(micro))
            d = out.details
            if "weights" in d:
                weights.append(d["weights"][d["mask"]].detach().float().cpu())
            elif "seq_weights" in d:
                weights.append(d["seq_weights"].detach().float().cpu())
            if "logprobs" in d:  # GA's gradient carries 1/p per token: its "inverse confidence"
                inv_conf.append(torch.exp(-d["logprobs"][d["mask"]].double()).cpu())
        logs, weights, inv_conf = global_logs(logs, len(micro), weights, inv_conf)
        if inv_conf:
            value = float(torch.cat(inv_conf).mean())
            logs["inv_conf"] = value if math.isfinite(value) else None  # 1/p overflows as p underflows: undefined
        if weights:
            w = torch.cat(weights)
            logs["weights"] = {"mean": float(w.mean()), "std": float(w.std(unbiased=False)) if w.numel() > 1 else 0.0,
                               "min": float(w.min()), "max": float(w.max())}
        return logs

    def measure(self, plan: StepPlan) -> tuple:
        """``(results, risks)``: G-effects of the objective gradient now in the gradients, unlearning
        (the step's first ``geffect_batch`` forget samples) and retaining (a draw of held-out retain
        rows), with the update effects of the coming AdamW step when asked for."""
        cfg = self.cfg
        risks = {"unlearn": self.risk_fn(forget_risk_items(self.data.pairs, plan.global_chunks, cfg.geffect_batch)),
                 "retain": self.risk_fn(retain_risk_items(self.data.heldout, cfg.seed, self.step, cfg.geffect_batch))}
        self.model.eval()  # risks without dropout
        if self.update_effects:
            res = self.geffect.measure(risks, optimizer=self.optimizer, max_grad_norm=cfg.max_grad_norm or None)
        else:
            res = self.geffect.measure(risks)
        self.model.train()
        return res, risks

    def realised(self, res: dict, risks: dict, lr: float) -> Dict[str, dict]:
        """Per risk, after the step: its value on the same batch (one forward, no backward), the
        realised change and the two predictions of it, plain gradient descent's and the optimiser's."""
        self.model.eval()
        with torch.no_grad():
            after = torch.tensor([float(fn()) for fn in risks.values()], dtype=torch.float64)
        dist_.reshard(self.model)
        self.model.train()
        if dist_.is_distributed():  # each rank's share of each risk
            after = dist_.all_reduce_sum(after)
        out = {}
        for name, a in zip(risks, after.tolist()):
            fields = {"risk_after": a, "realised": a - res[name].risk, "predicted_gd": -lr * res[name].total,
                      "predicted_opt": -lr * res[name].update_total}
            # a step into overflow (a run about to stop) has no finite outcome: null, as strict JSON wants
            out[name] = {k: v if math.isfinite(v) else None for k, v in fields.items()}
        return out

    def log_geffects(self, res: dict, per_risk: Optional[dict], logs: dict, lr: float, logger: GEffectLogger,
                     epoch: int) -> None:
        extra = {k: v for k, v in logs.items() if k != "weights"}
        logger.log(self.step, res, stats=logs.get("weights"), per_risk=per_risk, epoch=epoch,
                   objective=self.objective.name, lr=lr, **extra)

    def per_sample(self, micro: List[dict], plan: StepPlan) -> None:
        """PG-effects of the step's first micro-batch, with its per-sample objective weights."""
        m = micro[0]  # under data parallel: the first micro-batch of every rank, together
        # a rank left idle by a short last batch joins with a zero-weight copy and reports nothing
        w = plan.weights[0]
        base = unwrap(self.model)
        counts = global_counts(count_items(m) if w else {}, self.device)
        divisor = counts["forget_tokens"] if self.world > 1 else None  # one process: the batch's own token mean
        self.model.eval()
        res = self.geffect.per_sample(lambda: nll_risk(base, m["forget"], divisor, w),
                                      lambda: self.objective.forget_loss(base, m, counts, per_sample=True)[0])
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
        rec = {"step": self.step, **{k: [x for p in parts for x in p[k]] for k in rec if k != "step"}}
        if dist_.is_main():
            with open(self.out_dir / files.PG_EFFECTS, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, on_step: Optional[Callable[[dict, Optional[dict]], None]] = None) -> dict:
        """Train to the end (or ``stop_at_step``). ``on_step(row, geffects)`` after each step: its
        ``train_log.jsonl`` row and its G-effect results (None when not measured), e.g. TensorBoard."""
        cfg = self.cfg
        main = dist_.is_main()
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in (files.TRAIN_LOG, files.PG_EFFECTS):  # a resumed run re-does steps >= self.step
                truncate_jsonl(self.out_dir / name, self.step)
        logger = GEffectLogger(self.out_dir / files.GEFFECTS, resume_step=self.step) if main else _NoLog()
        train_log = open(self.out_dir / files.TRAIN_LOG, "a", encoding="utf-8") if main else _NoLog()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   desc=f"unlearn {self.objective.name}")
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                first = self.start_batch if epoch == self.start_epoch else 0
                for b in range(first, self.n_steps_epoch):
                    if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                        self.save(epoch, b)
                        return {"completed": False, "step": self.step}
                    plan = self.plan(epoch, b)
                    micro = step_batches(self.data.pairs, plan, self.device)
                    res = None
                    lr = self.scheduler.get_last_lr()[0]  # the lr of this step
                    try:  # a non-finite loss, G-effect or gradient norm stops every rank before the step
                        logs = self.train_step(micro, plan)
                        if self.objective.primal_dual:
                            logs["lam"] = self.objective.lam  # the λ this step used
                        postfix = {"loss": f"{logs['loss']:.3g}"}
                        res = None
                        if self.geffect is not None and self.step % cfg.geffect_every == 0:
                            res, risks = self.measure(plan)
                            postfix.update(e_u=f"{res['unlearn'].total:.3g}", e_r=f"{res['retain'].total:.3g}")
                        if self.geffect is not None and self.step in self.pg_steps:
                            self.per_sample(micro, plan)
                        grad_norm = self.backend.clip_and_step(cfg.max_grad_norm)
                        if self.objective.primal_dual:  # after the step: a failed one leaves λ as saved
                            self.objective.dual_update(logs["reg_loss"])
                    except FloatingPointError as e:
                        if res is not None:  # the G-effects were measured: logged, without the step's outcome
                            self.log_geffects(res, None, logs, lr, logger, epoch)
                        self.save(epoch, b)  # the last finite state, resumable (all ranks stop together)
                        if isinstance(e, NonFiniteLoss):
                            raise
                        raise NonFiniteLoss(f"step {self.step}: {e}") from e
                    if res is not None:
                        per_risk = self.realised(res, risks, lr) if self.update_effects else None
                        self.log_geffects(res, per_risk, logs, lr, logger, epoch)
                    self.scheduler.step()
                    row = {"step": self.step, "epoch": epoch, "grad_norm": grad_norm, **logs}
                    train_log.write(json.dumps(row, allow_nan=False) + "\n")
                    train_log.flush()
                    if on_step is not None:
                        on_step(row, res)
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
