"""The unlearning loop: objective steps with G-effects measured every k steps, resumable.

One optimiser step = ``batch_size`` forget samples (with their retain partners), split into
``grad_accum`` micro-batches whose reductions share the whole step's counts (exact accumulation).
After the backward, while the objective gradient sits in ``p.grad``, :class:`~fastgeffect.GEffect`
measures the unlearning G-effect (NLL on forget rows) and the retaining G-effect (NLL on held-out
retain rows the optimiser never sees), on one fixed, seeded draw of rows (``risk_rows="fixed"``)
or on the step's forget samples and a fresh held-out draw (``"step"``). The raw objective gradient is measured,
before clipping (with ``geffect_guard``, the guarded gradient the optimiser steps on:
:mod:`fastgeffect.training.guard`). With ``update_effects`` the same measurement also predicts the AdamW step itself
(clipped, as it will be taken: :mod:`fastgeffect.geffect.update`), and after the step each risk is
evaluated once more on the same batch (one forward, no backward), so the log holds the realised
change of each risk next to both predictions, ``-lr·e`` and ``-lr·u``; ``stop_at_retain_damage``
ends unlearning once their sum over steps exceeds a share of the retain risk
(:mod:`fastgeffect.training.damage_stop`).
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

import math
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from tqdm.auto import tqdm

from . import distributed as dist_
from .data.unlearning import UnlearningData
from .geffect import GEffect
from .geffect.groups import build_grouping
from .geffect.risk import (
    RiskFn,
    fixed_forget_items,
    fixed_retain_items,
    forget_risk_items,
    nll_risk,
    nll_risk_on,
    retain_risk_items,
)
from .geffect.second_order import second_order_error, second_order_terms, with_second_order
from .model_structure import unwrap
from .objectives import Objective
from .objectives.base import count_items, sequence_weights
from .training.backend import STATE_FILE, make_backend
from .training.batches import step_batches
from .training.config import UnlearnConfig, config_dict, guard_error  # noqa: F401  (re-exported)
from .training.damage_stop import DamageSum
from .training.decay import decay_param_groups
from .training.guard import GradientGuard
from .training.guarded_step import guarded_gradient
from .training.objective_logs import ObjectiveLogs
from .training.plan import StepPlan, plan_step, steps_per_epoch, warmup_linear
from .training.reduce import global_counts, local_counts
from .training.run_logs import NoRunLogs, RunLogs, StepRecord

# users import nll_risk (now geffect.risk's), UnlearnConfig and config_dict from here too


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
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters")
        adamw = torch.optim.AdamW(decay_param_groups(model, cfg.weight_decay, cfg.decay_all_params), lr=cfg.lr)
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
        self.guard = self.make_guard()
        self.update_effects = self.geffect is not None and cfg.update_effects
        if self.update_effects and dist_.reduction_mode(self.model) == "zero3":
            warnings.warn("update effects are not measured under DeepSpeed ZeRO-3 (its Adam state lives in "
                          "DeepSpeed's partitions); the G-effects are", stacklevel=2)
            self.update_effects = False
        if cfg.second_order:  # before any step: a term that cannot be measured is refused, not skipped
            error = second_order_error(self.update_effects, dist_.reduction_mode(self.model) if self.geffect else None)
            if error:
                raise ValueError(error)
        self.pg_steps = {self.total_steps - 1 if s < 0 else int(s) for s in cfg.pg_steps}
        # --risk-rows fixed: the two risks' rows are drawn (and batched) once
        self.fixed_risks = None if self.geffect is None or cfg.risk_rows != "fixed" else {
            "unlearn": self.risk_fn(fixed_forget_items(data.forget, cfg.seed, cfg.geffect_batch)),
            "retain": self.risk_fn(fixed_retain_items(data.heldout, cfg.seed, cfg.geffect_batch))}
        self.damage = self.stop_damage()
        self.stopped: Optional[dict] = None  # why and where unlearning stopped early, once it did
        self.step = 0
        self.start_epoch, self.start_batch = 0, 0

    def make_guard(self) -> Optional[GradientGuard]:
        """The ``--geffect-guard`` of the run (None: off); refused without a regulariser (the retain
        gradient it guards against) and under ZeRO-3 (whose gradients are not in ``p.grad``)."""
        cfg = self.cfg
        if cfg.geffect_guard == "none":
            return None
        error = guard_error(cfg.geffect_guard, self.objective.regularizer)
        if error:
            raise ValueError(error)
        mode = dist_.reduction_mode(self.model)
        if mode == "zero3":
            raise ValueError("--geffect-guard is not supported under DeepSpeed ZeRO-3: its gradients live in "
                             "DeepSpeed's partitions, not in p.grad; guard under DDP or FSDP2")
        g = self.geffect.grouping if self.geffect is not None else build_grouping(unwrap(self.model),
                                                                                 cfg.geffect_groups)
        return GradientGuard(g.params, g.group_ids, len(g.names), cfg.geffect_guard, cfg.guard_scope, cfg.gru_gamma,
                             sharded=mode == "sharded")

    def stop_damage(self) -> Optional[DamageSum]:
        """The damage sum of ``stop_at_retain_damage`` (None: off); refused where the retain risk's update
        effect is not measured at every step (``UnlearnConfig.check`` refuses the settings; ZeRO-3 here)."""
        if self.cfg.stop_at_retain_damage is None:
            return None
        if not self.update_effects:
            raise ValueError("--stop-at-retain-damage needs update effects, which are not measured under DeepSpeed "
                             "ZeRO-3")
        return DamageSum(self.cfg.stop_at_retain_damage, self.cfg.stop_damage_from)

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
        if self.damage is not None:
            self.damage.load(state.get("damage"))
        self.stopped = state.get("stopped")
        if self.guard is not None:
            self.guard.load(state.get("guard"))
        return True

    def save(self, epoch: int, batch_in_epoch: int) -> None:
        self.backend.save(self.state_path, {"scheduler": self.scheduler.state_dict(), "step": self.step,
                                            "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                            "lam": self.objective.lam, "stopped": self.stopped,
                                            "damage": None if self.damage is None else self.damage.state(),
                                            "guard": None if self.guard is None else self.guard.state()})

    # ---- one step ---------------------------------------------------------------------------
    def plan(self, epoch: int, batch: int) -> StepPlan:
        cfg = self.cfg
        return plan_step(len(self.data.pairs), cfg.batch_size, cfg.grad_accum, self.world, self.rank, cfg.seed,
                         epoch, batch)

    def risk_fn(self, items: List[dict]) -> RiskFn:
        """The NLL risk on ``items``; under data parallel, this rank's share."""
        return nll_risk_on(self.model, items, self.device, rank=self.rank, world=self.world)

    def train_step(self, micro: List[dict], plan: StepPlan) -> dict:
        """Forwards and backwards of this rank's micro-batches: the objective gradient of the global
        batch is then in the gradients. Returns the step's logs (of the global batch)."""
        self.model.train()
        self.backend.zero_grad()
        # every reduction divides by the whole global batch's counts
        counts = global_counts(local_counts(micro, plan.weights), self.device)
        if self.guard is not None:  # two passes, regulariser then forget term (training.guarded_step)
            return guarded_gradient(self.objective, self.model, self.guard, self.step, micro, plan.weights, counts,
                                    self.backend.backward, self.world, lambda e: stop_if_nonfinite(e, self.step))
        logs = ObjectiveLogs(len(micro))
        last = len(micro) - 1
        for j, (m, w) in enumerate(zip(micro, plan.weights)):
            out = self.objective_on(m, counts)
            # DDP/FSDP average over ranks; each rank's loss is its share of the global sum
            self.backend.backward(out.loss * (w * self.world), sync=j == last)
            if w != 0.0:
                logs.add(out)
        return logs.result()

    def objective_on(self, micro_batch: dict, counts: dict):
        """The objective's output on one micro-batch; :class:`NonFiniteLoss` on every rank when it
        failed on any."""
        try:
            out, error = self.objective(self.model, micro_batch, num_items=counts), None
        except FloatingPointError as e:
            out, error = None, e
        stop_if_nonfinite(error, self.step)
        return out

    def measure(self, plan: StepPlan) -> tuple:
        """``(results, risks)``: G-effects of the objective gradient now in the gradients, unlearning
        (forget rows) and retaining (held-out retain rows) on the ``risk_rows`` rows, with the update
        effects of the coming AdamW step when asked for."""
        cfg = self.cfg
        risks = self.fixed_risks or {
            "unlearn": self.risk_fn(forget_risk_items(self.data.pairs, plan.global_chunks, cfg.geffect_batch)),
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
                      "predicted_opt": res[name].update_change}  # ⟨∇R, Δθ⟩: -lr·u, each param group at its lr
            # a step into overflow (a run about to stop) has no finite outcome: null, as strict JSON wants
            out[name] = {k: v if math.isfinite(v) else None for k, v in fields.items()}
        return out

    def second_order(self, risks: dict) -> Dict[str, float]:
        """Per risk, ``½ Δθᵀ H Δθ`` of the coming (clipped AdamW) step (:mod:`fastgeffect.geffect.second_order`)."""
        self.model.eval()  # as the risks were measured: without dropout
        terms = second_order_terms(self.model, risks, self.optimizer, self.geffect.grouping.params,
                                   self.cfg.max_grad_norm or None)
        self.model.train()
        return terms

    def per_sample(self, micro: List[dict], plan: StepPlan) -> dict:
        """PG-effects of the step's first micro-batch, with its per-sample objective weights: the
        ``pg_effects.jsonl`` line (of every rank's first micro-batch, together, on every rank)."""
        m = micro[0]
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
        seq_weights = sequence_weights(details)
        if seq_weights is not None:
            rec["seq_weights"] = seq_weights.tolist()
        parts = [p for p in dist_.all_gather_objects(rec if w else None) if p is not None]
        return {"step": self.step, **{k: [x for p in parts for x in p[k]] for k in rec if k != "step"}}

    def take_step(self, plan: StepPlan, logs: RunLogs) -> StepRecord:
        """The step of ``plan``, with the measurements due at it. A non-finite loss, G-effect or
        gradient norm stops every rank before the optimiser step: what was measured is logged, the
        state before the step saved, and :class:`NonFiniteLoss` raised."""
        record = StepRecord(self.step, plan.epoch, plan.batch, lr=self.scheduler.get_last_lr()[0])
        try:
            risks = self.step_into(record, plan)
        except FloatingPointError as e:
            logs.write(record)  # without the step's outcome
            self.save(plan.epoch, plan.batch)  # the last finite state, resumable (all ranks stop together)
            if isinstance(e, NonFiniteLoss):
                raise
            raise NonFiniteLoss(f"step {self.step}: {e}") from e
        if risks is not None and self.update_effects:
            record.outcome = self.realised(record.geffects, risks, record.lr)
            if record.second_order is not None:
                record.outcome = with_second_order(record.outcome, record.second_order)
            if self.damage is not None:
                self.stopped = self.damage.add(self.step, record.geffects["retain"].risk, record.outcome["retain"])
        self.scheduler.step()
        return record

    def step_into(self, record: StepRecord, plan: StepPlan) -> Optional[dict]:
        """Fill ``record`` as the step goes: objective, G-effects and PG-effects when due, optimiser
        step. Returns the G-effect risks (None when not measured)."""
        micro = step_batches(self.data.pairs, plan, self.device)
        record.logs = self.train_step(micro, plan)
        if self.objective.primal_dual:
            record.logs["lam"] = self.objective.lam  # the λ this step used
        risks = None
        if self.geffect is not None and self.step % self.cfg.geffect_every == 0:
            record.geffects, risks = self.measure(plan)
            if self.cfg.second_order:  # the objective gradient is back in p.grad; the step not yet taken
                record.second_order = self.second_order(risks)
        if self.geffect is not None and self.step in self.pg_steps:
            record.pg_effects = self.per_sample(micro, plan)
        record.grad_norm = self.backend.clip_and_step(self.cfg.max_grad_norm)
        if self.objective.primal_dual:  # after the step: a failed one leaves λ as saved
            self.objective.dual_update(record.logs["reg_loss"])
        return risks

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, on_step: Optional[Callable[[dict, Optional[dict]], None]] = None) -> dict:
        """Train to the end (or ``stop_at_step``, or the step whose retain damage exceeds
        ``stop_at_retain_damage``: the status then says why, under ``stopped``; a state saved after
        that stop takes no further step). ``on_step(row, geffects)`` after each step: its
        ``train_log.jsonl`` row and its G-effect results (None when not measured), e.g. TensorBoard."""
        logs = RunLogs(self.out_dir, self.step, self.objective.name) if dist_.is_main() else NoRunLogs()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress,
                   desc=f"unlearn {self.objective.name}")
        try:
            for plan in [] if self.stopped else self.planned_steps():  # a run stopped on damage stays stopped
                if self.cfg.stop_at_step is not None and self.step >= self.cfg.stop_at_step:
                    self.save(plan.epoch, plan.batch)
                    return {"completed": False, "step": self.step}
                record = self.take_step(plan, logs)
                logs.write(record)
                self.after_step(record, on_step, bar)
                if self.stopped is not None and self.step < self.total_steps:  # (at the last step: the end as usual)
                    self.save(record.epoch, record.batch + 1)
                    break
        finally:
            bar.close()
            logs.close()
        return {"completed": True, "step": self.step, **({"stopped": self.stopped} if self.stopped else {})}

    def planned_steps(self) -> Iterator[StepPlan]:
        """The plans of the steps still to take, in order; after each epoch's last step (even when
        none was left of it), the state is saved at the next epoch's start and ``on_epoch_end`` called."""
        for epoch in range(self.start_epoch, self.cfg.epochs):
            first = self.start_batch if epoch == self.start_epoch else 0
            for b in range(first, self.n_steps_epoch):
                yield self.plan(epoch, b)
            self.save(epoch + 1, 0)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, self)

    def after_step(self, record: StepRecord, on_step, bar) -> None:
        """The step is done: ``on_step``, the step counter, the progress bar, the periodic save."""
        if on_step is not None:
            on_step(record.row, record.geffects)
        self.step += 1
        bar.update(1)
        bar.set_postfix(record.postfix)
        if self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save(record.epoch, record.batch + 1)
