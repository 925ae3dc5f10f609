"""Hugging Face ``Trainer`` integration: unlearning on paired forget/retain batches.

``GEffectCallback`` (:mod:`.hf_callback`, re-exported here) measures G-effects inside any ``Trainer``.

Each training item is a dict of sub-batches (``{"forget": {...}, "retain": {...}}`` plus
``forget_idk`` / ``forget_win`` where the objective needs them). The trainer counts, over all
micro-batches of one optimiser step, the items every reduction divides by (tokens, positions,
sequences; see :func:`fastgeffect.objectives.base.count_items`) and hands them to the objective, so
gradient accumulation gives the gradient of one big batch and HF's own loss rescaling is off.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Optional

import torch
from torch.utils.data import default_collate
from transformers import Trainer, TrainerCallback

from ..objectives import Objective
from ..objectives.base import count_items
from .hf_callback import GEffectCallback


class UnlearningTrainer(Trainer):
    """``Trainer`` that minimises an :class:`~fastgeffect.objectives.Objective`.

    ``objective`` carries its reference (cache or model). Loss terms (``forget_loss``,
    ``reg_loss``, forget NLL and mean objective weight) are logged separately. A PDU objective
    (``constraint_eps``, ``dual_step``) has its λ moved after every optimiser step from that step's
    retain loss (averaged over processes) and logged as ``unlearn/lam``; λ is not part of HF's
    checkpoints, so resuming such a run is refused.
    """

    def __init__(self, *args, objective: Objective, **kwargs):
        kwargs.setdefault("data_collator", default_collate)
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            # the nested forget/retain dicts are not model.forward arguments: keep them
            self.args.remove_unused_columns = False
        self.objective = objective
        # Our loss is already normalised by whole-step counts: HF must not divide by the
        # accumulation steps again (attribute names differ across transformers versions).
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = True
        self._term_sums: Dict[str, float] = defaultdict(float)
        self._term_count = 0
        self._step_reg_loss = 0.0  # PDU: the retain loss of the optimiser step under way
        if objective.primal_dual:
            self.add_callback(_DualAscent(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint and self.objective.primal_dual:
            raise ValueError("UnlearningTrainer cannot resume a PDU run (constraint_eps/dual_step): its dual "
                             "variable λ is not saved in HF checkpoints; the driver (python -m fastgeffect.run) "
                             "saves and resumes it")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _dual_update(self) -> None:
        """PDU, after an optimiser step: λ from the step's retain loss (the sum of its micro-batch
        parts, each normalised by whole-step counts), averaged over processes as DDP averages gradients."""
        reg = torch.tensor(self._step_reg_loss, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            reg = self.accelerator.reduce(reg, reduction="mean")
        self.objective.dual_update(float(reg))
        self._step_reg_loss = 0.0

    def get_batch_samples(self, *args, **kwargs):
        batch_samples, _ = super().get_batch_samples(*args, **kwargs)
        totals: Dict[str, torch.Tensor] = {}
        for batch in batch_samples:
            for k, v in count_items(batch).items():
                totals[k] = totals.get(k, 0) + v
        return batch_samples, (totals or None)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[dict] = None):
        if not isinstance(num_items_in_batch, dict):
            # evaluation / prediction loops, or a call from outside a training step: this batch alone
            num_items_in_batch = count_items(inputs)
        out = self.objective(model, inputs, num_items=num_items_in_batch)
        if model.training:
            for k, v in out.logs().items():
                self._term_sums[k] += v
            self._term_count += 1
            if self.objective.primal_dual:
                self._step_reg_loss += float(out.reg_loss.detach())
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            # loss terms are normalised by whole-step counts, so their micro-batch parts add up to the
            # step's value; NLL and weight statistics are plain per-micro-batch means
            steps = max(1.0, self._term_count / max(1, self.args.gradient_accumulation_steps))
            for k, v in self._term_sums.items():
                if k in ("forget_loss", "reg_loss"):
                    logs[f"unlearn/{k}"] = v / steps
                elif k != "loss":
                    logs[f"unlearn/{k}"] = v / self._term_count
            self._term_sums.clear()
            self._term_count = 0
        if self.objective.primal_dual and "loss" in logs:
            logs["unlearn/lam"] = self.objective.lam  # the λ the next step uses
        super().log(logs, *args, **kwargs)


class _DualAscent(TrainerCallback):
    """Calls the trainer's PDU dual update once per optimiser step (after it)."""

    def __init__(self, trainer: UnlearningTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._dual_update()


__all__ = ["UnlearningTrainer", "GEffectCallback"]
