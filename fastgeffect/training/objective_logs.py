"""The objective's logs of one step, pieced together from its micro-batches: the loss terms (each
micro-batch's is its share of the step's: summed), its other values (averaged), the statistics of
its weights and GA's inverse confidence; those of the global batch under data parallel."""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from ..objectives.base import ObjectiveOutput, valid_weights
from ..weight_stats import weight_stats
from .reduce import LOSS_TERMS, global_logs


class ObjectiveLogs:
    """Add each micro-batch's :class:`~fastgeffect.objectives.base.ObjectiveOutput`; :meth:`result`
    gives the step's logs (``n_micro``: this rank's micro-batches, the divisor of the averages)."""

    def __init__(self, n_micro: int):
        self.n_micro = n_micro
        self.values: Dict[str, float] = {}
        self.weights: List[torch.Tensor] = []
        self.inv_conf: List[torch.Tensor] = []

    def add(self, out: ObjectiveOutput) -> None:
        for k, v in out.logs().items():
            self.values[k] = self.values.get(k, 0.0) + (v if k in LOSS_TERMS else v / self.n_micro)
        d = out.details
        w = valid_weights(d)
        if w is not None:
            self.weights.append(w.detach().float().cpu())
        if "logprobs" in d:  # GA's gradient carries 1/p per token: its "inverse confidence"
            self.inv_conf.append(torch.exp(-d["logprobs"][d["mask"]].double()).cpu())

    def result(self) -> dict:
        """The logs of the global batch (under data parallel a collective: every rank calls it)."""
        logs, weights, inv_conf = global_logs(self.values, self.n_micro, self.weights, self.inv_conf)
        if inv_conf:
            value = float(torch.cat(inv_conf).mean())
            logs["inv_conf"] = value if math.isfinite(value) else None  # 1/p overflows as p underflows: undefined
        if weights:
            # float32 statistics without the count: the train and G-effect logs' "weights" as they have always been
            stats = weight_stats(torch.cat(weights), dtype=torch.float32)
            logs["weights"] = {k: v for k, v in stats.items() if k != "count"}
        return logs


__all__ = ["ObjectiveLogs"]
