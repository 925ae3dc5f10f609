"""Statistics of an objective's weights (NPO's, TNPO's, WGA's, ... per-token or per-sequence weights),
as the logs hold them: the one function the G-effect log and the unlearning loop both use."""
from __future__ import annotations

from typing import Dict, Optional

import torch


def weight_stats(weights: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                 dtype: torch.dtype = torch.float64) -> Dict[str, float]:
    """mean / std (population) / min / max / count of ``weights`` over ``mask`` (e.g. the ``weights``
    and ``mask`` an objective returns in its details), computed in ``dtype``; ``{"count": 0}`` when
    no weight is selected."""
    w = weights.detach()
    if mask is not None:
        if mask.shape != w.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weights {tuple(w.shape)}")
        w = w[mask.bool()]
    w = w.reshape(-1).to(dtype)
    if w.numel() == 0:
        return {"count": 0}
    return {"mean": float(w.mean()), "std": float(w.std(unbiased=False)), "min": float(w.min()),
            "max": float(w.max()), "count": int(w.numel())}


__all__ = ["weight_stats"]
