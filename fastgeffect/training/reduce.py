"""Data-parallel sums of the loop's counts and logs; with one process each returns its input unchanged."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from .. import distributed as dist_
from ..objectives.base import count_items

LOSS_TERMS = ("loss", "forget_loss", "reg_loss")  # each rank logs its share of these: they are summed


def local_counts(micro: Sequence[dict], weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """The counts (the objective's divisors) of this rank's micro-batches that take part in the step
    (a zero-weight one is the stand-in copy of a rank left idle by a short last batch)."""
    counts: Dict[str, torch.Tensor] = {}
    for m, w in zip(micro, weights):
        if w == 0.0:
            continue
        for k, v in count_items(m).items():
            counts[k] = counts.get(k, 0) + v
    return counts


def global_counts(counts: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """The counts of the whole global batch, which every rank's reductions divide by (float64 on
    ``device``). A rank may hold fewer keys, or none when it has no sample this step."""
    if not dist_.is_distributed():
        return counts
    keys = sorted(set().union(*dist_.all_gather_objects(sorted(counts))))
    total = dist_.all_reduce_sum(torch.stack([torch.as_tensor(counts.get(k, 0)).double().cpu() for k in keys]))
    return {k: total[i].to(device) for i, k in enumerate(keys)}


def global_logs(logs: Dict[str, float], n_micro: int, weights: List[torch.Tensor], inv_conf: List[torch.Tensor]
                ) -> Tuple[Dict[str, float], List[torch.Tensor], List[torch.Tensor]]:
    """Logs of the global batch: loss terms summed over ranks, other values averaged over all
    micro-batches; the weight and inverse-confidence pieces of every rank."""
    if not dist_.is_distributed():
        return logs, weights, inv_conf
    parts = dist_.all_gather_objects((logs, n_micro, weights, inv_conf))
    n = sum(p[1] for p in parts)
    out: Dict[str, float] = {}
    for lg, nm, _, _ in parts:
        for k, v in lg.items():
            out[k] = out.get(k, 0.0) + (v if k in LOSS_TERMS else v * nm / n)
    return out, [w for p in parts for w in p[2]], [c for p in parts for c in p[3]]
