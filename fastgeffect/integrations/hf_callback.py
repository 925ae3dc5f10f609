"""G-effects inside any Hugging Face ``Trainer``: a callback measuring at ``on_pre_optimizer_step``.

At that event the gradient of the whole optimiser step (all accumulated micro-batches, all-reduced
under DDP) sits in ``p.grad`` and the optimiser has not used it yet, so the engine's
``<∇R, g>`` (docs/design.md §4) is the step's G-effect whatever the Trainer's ``compute_loss`` is:
a plain ``Trainer`` subclass, :class:`~fastgeffect.integrations.hf.UnlearningTrainer`, or an
open-unlearning trainer. The engine puts ``p.grad`` back as it found it, and the risks run in eval
mode without touching any random state, so training is unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, List, Optional

import torch
import transformers
from transformers import TrainerCallback

from .. import distributed as dist_
from .. import run_files as files
from ..geffect import GEffect, GEffectLogger
from ..geffect.groups import GroupSpec
from ..geffect.risk import nll_risk
from ..scalars import geffect_scalars
from ..training.batches import to_device

RiskOf = Callable[[torch.nn.Module, dict], torch.Tensor]
NLL_KEYS = ("input_ids", "attention_mask", "labels")


def check_nll_batch(name: str, batch: Mapping) -> None:
    """A risk batch for the default NLL risk: integer ``input_ids`` and ``labels`` of one shape, with
    at least one label that is not -100 (else the risk has no token and fails at the first step)."""
    ids, labels = batch["input_ids"], batch["labels"]
    for key, t in (("input_ids", ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"risk batch {name!r}: {key} must be a 2-D integer tensor (batch, tokens), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    if labels.shape != ids.shape:
        raise ValueError(f"risk batch {name!r}: labels {tuple(labels.shape)} and input_ids {tuple(ids.shape)} differ")
    # the label at position 0 is never predicted (HF shifts by one)
    if not bool((labels[:, 1:] != -100).any()):
        raise ValueError(f"risk batch {name!r} has no label to predict (every label after the first position is "
                         "-100): its NLL risk would be undefined")


def check_token_ids(name: str, batch: Mapping, vocab_size: int) -> None:
    """Token ids and labels of a risk batch inside the model's vocabulary (named before training)."""
    for key in ("input_ids", "labels"):
        t = batch[key]
        t = t[t != -100] if key == "labels" else t
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"risk batch {name!r}: {key} holds ids outside the model's vocabulary "
                             f"[0, {vocab_size}) (min {int(t.min())}, max {int(t.max())})")


class GEffectCallback(TrainerCallback):
    """Measures G-effects of each ``every``-th optimiser step of a ``Trainer``.

    ``risk_batches``: name -> batch (a dict of tensors), e.g. ``{"unlearn": forget_batch, "retain":
    retain_batch}``; each risk is the model's token-mean NLL on its batch (``input_ids``,
    ``attention_mask``, HF ``labels``), or ``risk_fn(model, batch)`` (a scalar tensor) when given.
    ``groups``: as :class:`~fastgeffect.GEffect` (``"paper"``, ``"blocks"``, ``"params"``, a mapping).
    ``out``: the JSON-lines G-effect log, records as the driver's ``geffect.jsonl`` (None: no file).

    Add it as any callback: ``Trainer(..., callbacks=[cb])``, ``trainer.add_callback(cb)`` or
    ``cb.attach(trainer)``; all three measure the same and write the same ``out``. At each of the
    Trainer's logs it adds ``geffect/<risk>/<group>``, ``geffect/<risk>/total`` and ``risk/<risk>``,
    averaged over the steps measured since the last log (as the Trainer averages its loss), to the
    ``logs`` dict and to that log's entry of ``state.log_history``; the JSON-lines log holds every
    measured step. Callbacks run in the order of the Trainer's list, and the ``report_to``
    integrations (TensorBoard, W&B, ...) are put first at ``Trainer`` init, before
    ``callbacks=[...]`` and before anything ``add_callback`` appends: added those two ways, the values
    reach ``state.log_history`` and the callbacks after this one, not ``report_to``.
    ``attach(trainer)`` moves it to the front of the list, so ``report_to`` sees them too.

    What is measured is the gradient the optimiser is about to apply: with ``max_grad_norm > 0``
    (HF's default 1.0) the Trainer has already clipped it, so the G-effects are those of the clipped
    step; ``max_grad_norm=0`` gives the raw objective gradient, as the driver logs it.

    Data parallel (accelerate DDP or FSDP2): every rank holds the same ``risk_batches``; the main
    rank's risk counts, the others contribute its gradient times 0, so the all-reduced result is the
    risk of the whole batch, for any ``risk_fn``. Not supported: DeepSpeed (it steps inside
    ``backward``, before this event) and fp16 loss scaling (the gradient may still be scaled).
    """

    def __init__(self, risk_batches: Mapping, every: int = 1, groups: GroupSpec = "paper",
                 out: Optional[str] = files.GEFFECTS, risk_fn: Optional[RiskOf] = None):
        if not isinstance(risk_batches, Mapping) or not risk_batches:
            raise ValueError("risk_batches must be a non-empty dict mapping a risk name to a batch (a dict of tensors)")
        for name, batch in risk_batches.items():
            if not isinstance(batch, Mapping):
                raise TypeError(f"risk batch {name!r} must be a dict of tensors, got {type(batch).__name__}")
            missing = [k for k in NLL_KEYS if k not in batch]
            if risk_fn is None and missing:
                raise ValueError(f"risk batch {name!r} lacks {missing}: the default NLL risk needs "
                                 f"{list(NLL_KEYS)} (or pass risk_fn(model, batch))")
            if risk_fn is None:
                check_nll_batch(name, batch)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if risk_fn is not None and not callable(risk_fn):
            raise TypeError(f"risk_fn must be a callable (model, batch) -> scalar tensor, got {type(risk_fn).__name__}")
        self.risk_batches = dict(risk_batches)
        self.every, self.groups, self.out = every, groups, out
        self.risk_fn: RiskOf = risk_fn or nll_risk
        self.geffect: Optional[GEffect] = None
        self.logger: Optional[GEffectLogger] = None
        self._pending: Dict[str, List[float]] = {}  # scalar name -> [sum, count] since the last log

    def attach(self, trainer) -> "GEffectCallback":
        """Make this the first of ``trainer``'s callbacks (adding it if absent): its values then join
        each log before the ``report_to`` integrations, which the Trainer registers first, see it."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # else it would never measure
            raise RuntimeError(f"GEffectCallback needs a transformers Trainer with the on_pre_optimizer_step "
                               f"event (transformers {transformers.__version__} has none): upgrade transformers")
        if getattr(args, "deepspeed_plugin", None) is not None or getattr(args, "deepspeed", None):
            raise NotImplementedError("GEffectCallback does not support DeepSpeed: it steps the optimiser inside "
                                      "backward, before on_pre_optimizer_step sees the gradient (use DDP or FSDP2)")
        if args.fp16:
            raise NotImplementedError("GEffectCallback does not support fp16 mixed precision: the gradient at "
                                      "on_pre_optimizer_step may still carry the loss scale (use bf16 or fp32)")
        model = kwargs.get("model")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if self.risk_fn is nll_risk and vocab is not None:
            for name, batch in self.risk_batches.items():
                check_token_ids(name, batch, vocab)
        if self.out is not None and state.is_world_process_zero:
            # a run resumed from a checkpoint re-measures the steps after it without duplicate lines
            self.logger = GEffectLogger(self.out, resume_step=state.global_step)

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        step = state.global_step  # 0-based index of the step about to be taken, as in the driver's log
        if step % self.every:
            return
        if self.geffect is None:  # built on the model as prepared for training (e.g. sharded by FSDP2)
            self.geffect = GEffect(model, groups=self.groups)
            device = next(model.parameters()).device
            self.risk_batches = {name: to_device(dict(batch), device) for name, batch in self.risk_batches.items()}
        weight = 1.0 if dist_.is_main() else 0.0
        risks = {name: self._risk(model, batch, weight) for name, batch in self.risk_batches.items()}
        was_training = model.training
        model.eval()  # risks without dropout (and without drawing random numbers)
        try:
            results = self.geffect.measure(risks)
        finally:
            model.train(was_training)
        if self.logger is not None:
            extra = {"lr": float(lr_scheduler.get_last_lr()[0])} if lr_scheduler is not None else {}
            self.logger.log(step, results, **extra)
        for name, value in geffect_scalars(results).items():
            acc = self._pending.setdefault(name, [0.0, 0])
            acc[0] += value
            acc[1] += 1

    def _risk(self, model, batch: dict, weight: float) -> Callable[[], torch.Tensor]:
        """The zero-argument risk the engine calls (a function, so each binds its own batch)."""
        return lambda: self.risk_fn(model, batch) * weight

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        values = {name: total / n for name, (total, n) in self._pending.items()}
        self._pending = {}
        history = state.log_history
        # Trainer.log appends a copy of ``logs`` (plus "step") to the history just before this event
        if history and history[-1].get("step") == state.global_step and logs.keys() <= history[-1].keys():
            entry = history[-1]
            history[-1] = {**{k: v for k, v in entry.items() if k != "step"}, **values, "step": entry["step"]}
        else:  # a log that did not come through Trainer.log: an entry of its own
            history.append({**values, "step": state.global_step})
        logs.update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.close()
            self.logger = None


__all__ = ["GEffectCallback"]
