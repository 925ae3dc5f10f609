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
from transformers import Trainer

from ..objectives import Objective
from ..objectives.base import count_items
from .hf_callback import GEffectCallback


class UnlearningTrainer(Trainer):
    """``Trainer`` that minimises an :class:`~fastgeffect.objectives.Objective`.

    ``objective`` carries its reference (cache or model). Loss terms (``forget_loss``,
    ``reg_loss``, forget NLL and mean objective weight) are logged separately.
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
        super().log(logs, *args, **kwargs)


__all__ = ["UnlearningTrainer", "GEffectCallback"]
