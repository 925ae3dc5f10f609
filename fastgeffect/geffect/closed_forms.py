"""The closed forms behind per-sample G-effects (docs/design.md §4.3): each module's share of
``<G, ∇ℓ_i>`` for every sample at once, from the module's input ``a`` and output gradient ``δ``
(rows of sample i summed) — see :mod:`.per_sample` for the table of forms and where they apply."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp


def _ct(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """Compute dtype of the ghost products: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_row_sum(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1, dtype=acc)


def linear_weight_contrib(x: torch.Tensor, dy: torch.Tensor, gw: torch.Tensor, acc: torch.dtype,
                          weight_is_in_out: bool = False) -> torch.Tensor:
    """(B,) Σ_t δ_tᵀ G_W a_t for ``y = a Wᵀ`` (``weight_is_in_out``: ``y = a W``, HF Conv1D)."""
    B = dy.shape[0]
    ct = _ct(x, dy, gw)
    w = (gw.t() if weight_is_in_out else gw).to(ct)  # (out, in)
    a = x.reshape(B, -1, x.shape[-1]).to(ct)
    d = dy.reshape(B, -1, dy.shape[-1]).to(ct)
    # contract over the larger side so the temporary is (B, T, min(in, out))
    prod = (a @ w.t()) * d if w.shape[0] <= w.shape[1] else (d @ w) * a
    return _per_row_sum(prod, acc)


def bias_contrib(dy: torch.Tensor, gb: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B,) Σ_t δ_t·G_b for a bias added along the last dimension."""
    ct = _ct(dy, gb)
    return _per_row_sum(dy.to(ct) * gb.to(ct), acc)


def embedding_contrib(ids: torch.Tensor, dy: torch.Tensor, gw: torch.Tensor, padding_idx: Optional[int],
                      acc: torch.dtype) -> torch.Tensor:
    """(B,) Σ_t G_W[ids_t]·δ_t; positions holding ``padding_idx`` get no gradient in nn.Embedding."""
    ct = _ct(dy, gw)
    prod = F.embedding(ids, gw.to(ct)) * dy.to(ct)
    if padding_idx is not None:
        prod = prod * (ids != padding_idx).unsqueeze(-1).to(ct)
    return _per_row_sum(prod, acc)


def layer_norm_weight_contrib(mod: nn.LayerNorm, x: torch.Tensor, dy: torch.Tensor, gw: torch.Tensor,
                              acc: torch.dtype) -> torch.Tensor:
    """(B,) Σ_t δ_t·(x̂_t ⊙ G_w) with x̂ the normalised input of ``mod``."""
    ct = _ct(x, dy, gw)
    xhat = F.layer_norm(x.to(ct), mod.normalized_shape, None, None, mod.eps)
    return _per_row_sum(dy.to(ct) * xhat * gw.to(ct), acc)


def module_jvp_contrib(mod: nn.Module, name: str, tangent: torch.Tensor, args, kwargs, dy: torch.Tensor,
                       acc: torch.dtype) -> torch.Tensor:
    """(B,) Σ_t δ_t·(J_t G): forward-mode derivative of the output of ``mod`` along G for its
    parameter ``name`` (the module's other parameters held fixed)."""
    p = dict(mod.named_parameters(recurse=False))[name]

    def f(w):
        return functional_call(mod, {name: w}, args, kwargs)

    _, ydot = jvp(f, (p.detach(),), (tangent.to(p.dtype),))
    if not isinstance(ydot, torch.Tensor) or ydot.shape != dy.shape:
        raise RuntimeError("module output changed shape in the forward-mode recomputation")
    ct = _ct(ydot, dy)
    return _per_row_sum(ydot.to(ct) * dy.to(ct), acc)
