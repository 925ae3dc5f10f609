"""Objective objects: a forget term plus an optional retain regulariser, with their defaults.

A forget term is a small function ``term(ctx, batch, hp) -> (loss, details)`` where ``ctx`` is the
:class:`StepContext` of the call (model, reference, accumulation counts). An :class:`Objective`
combines it with a regulariser and weight λ and returns an :class:`ObjectiveOutput`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..reference import ReferenceModel

Batch = Mapping[str, torch.Tensor]
TermFn = Callable[["StepContext", Mapping[str, Batch], Dict[str, float]], Tuple[torch.Tensor, dict]]


def loss_defaults(loss: Callable, *names: str) -> Dict[str, object]:
    """The defaults of hyper-parameters ``names`` as the loss function's signature states them: an
    objective over a loss takes its defaults from there, so each default is written once."""
    params = inspect.signature(loss).parameters
    return {n: params[n].default for n in names}


# sub-batches built from refusal answers to the forget questions (DPO's preferred answers included)
REFUSAL_BATCHES = ("forget_idk", "forget_win")


@dataclass(frozen=True)
class ForgetTerm:
    name: str
    fn: TermFn
    defaults: Dict[str, object]  # hyper-parameter names (see hparams.HPARAMS) and defaults
    formula: str
    needs_batches: Tuple[str, ...] = ("forget",)
    ref_batches: Tuple[str, ...] = ()  # sub-batches whose reference log-probs the term reads (cache or θ_o)
    default_regularizer: str = "none"
    needs_reference_model: bool = False  # θ_o itself at every step (UNDIAL's full logits), not cached log-probs

    @property
    def needs_reference(self) -> bool:
        """The term reads reference log-probs (from a cache or the original model)."""
        return bool(self.ref_batches)

    @property
    def needs_refusals(self) -> bool:
        """The term reads refusal answers (PO, DPO, IdkDPO): the data must include them."""
        return any(k in REFUSAL_BATCHES for k in self.needs_batches)


@dataclass
class StepContext:
    """What a term may use besides the batch."""

    model: torch.nn.Module
    reference: Optional[ReferenceModel] = None
    num_items: Mapping[str, object] = field(default_factory=dict)  # e.g. forget_tokens, retain_tokens, forget_seqs
    fused: bool = False
    per_sample: bool = False  # terms return (B,) contributions that sum to the loss (PG-effects)

    def forward(self, batch: Batch, hidden_layer: Optional[int] = None):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          output_hidden_states=hidden_layer is not None)

    def ref_logprobs(self, batch: Batch) -> torch.Tensor:
        """Reference log-probs aligned with ``batch['labels']``: from the batch (where the objective put
        cached values) or from θ_o."""
        if "ref_logprobs" in batch:
            return batch["ref_logprobs"]
        if self.reference is not None:
            return self.reference.token_logprobs(batch)
        raise ValueError("this objective needs reference log-probabilities: put 'ref_logprobs' in the batch, "
                         "or give the objective a RefLogprobCache (batches with 'index') or a reference model")


def count_items(batches: Mapping[str, Batch]) -> Dict[str, torch.Tensor]:
    """The divisors every reduction uses, per sub-batch ``k``: ``k_tokens`` (valid shifted labels),
    ``k_positions`` (labels != -100, for hidden-state losses), ``k_seqs`` and ``k_rows`` (all
    positions, for TOFU's KL). Summed over micro-batches they make accumulation exact."""
    out = {}
    for k, b in batches.items():
        labels = b["labels"]
        out[f"{k}_tokens"] = (labels[:, 1:] != -100).sum()
        out[f"{k}_positions"] = (labels != -100).sum()
        out[f"{k}_seqs"] = torch.tensor(labels.shape[0])
        out[f"{k}_rows"] = torch.tensor(labels.numel())
    return out


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    forget_loss: torch.Tensor
    reg_loss: Optional[torch.Tensor]
    details: dict

    def logs(self) -> Dict[str, float]:
        out = {"loss": float(self.loss.detach()), "forget_loss": float(self.forget_loss.detach())}
        if self.reg_loss is not None:
            out["reg_loss"] = float(self.reg_loss.detach())
        for k in ("nll", "weight_mean"):
            if k in self.details:
                out[f"forget_{k}"] = float(self.details[k])
        return out


def valid_weights(details: dict) -> Optional[torch.Tensor]:
    """The objective's weights over the valid tokens (token weights) or its sequence weights, as
    one flat tensor; None for an objective without weights."""
    if "weights" in details:
        return details["weights"][details["mask"]]
    if "seq_weights" in details:
        return details["seq_weights"]
    return None


def sequence_weights(details: dict) -> Optional[torch.Tensor]:
    """One weight per sequence: the objective's sequence weights, or the mean of its token weights
    over each sequence's valid tokens; None for an objective without weights."""
    if "seq_weights" in details:
        return details["seq_weights"]
    if "weights" in details:
        mask = details["mask"]
        return (details["weights"] * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return None


def add_weight_mean(details: dict) -> dict:
    """``details`` with the mean of its :func:`valid_weights` added as ``weight_mean`` (logged as
    ``forget_weight_mean``); statistics of the weights are :func:`fastgeffect.weight_stats.weight_stats`."""
    w = valid_weights(details)
    if w is not None:
        details["weight_mean"] = w.mean()
    return details
