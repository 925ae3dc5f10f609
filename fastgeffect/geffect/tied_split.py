"""The tied embedding's G-effect split by use (docs/design.md §4.6).

When the input embedding and the LM head share one weight W, the risk gradient on W is the sum of
two uses, ∇_W R = r_in + r_head: r_in scatters ∂R/∂e_t (the gradient at the embedding's output
for token t) into row x_t, r_head comes through the logits. The G-effect on W splits exactly:

    ⟨∇_W R, g⟩ = ⟨r_in, g⟩ + ⟨r_head, g⟩,   ⟨r_in, g⟩ = Σ_t ⟨∂R/∂e_t, g[x_t]⟩

for the objective gradient g (and, for update effects, for the optimiser's direction d = −Δθ/lr
in place of g). The input part costs one gather of the rows of g the risk's tokens use, in a hook
on the embedding's output gradient, during the backward pass the engine runs anyway; the LM-head
part is the rest of W's G-effect. Positions holding the embedding's ``padding_idx`` are left out:
``nn.Embedding`` gives that row no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class TiedInputSplit:
    """Context manager: while it is open, every forward of ``embedding`` whose output needs a
    gradient adds ``Σ_t ⟨∂R/∂e_t, partner[x_t]⟩`` to ``acc[row]`` when that gradient arrives
    (``row`` as set when the forward ran), and, with ``direction`` (the optimiser's direction of
    W, flat elements [lo, hi) → tensor), the same with ``direction``'s rows to ``acc[row + offset]``."""

    def __init__(self, embedding: nn.Embedding, partner: Optional[torch.Tensor], n_rows: int, *,
                 direction=None, offset: int = 0, chunk_numel: int = 1 << 20,
                 accumulate_dtype: torch.dtype = torch.float64):
        self.embedding = embedding
        self.partner = partner
        self.direction, self.offset = direction, int(offset)
        self.chunk_rows = max(1, int(chunk_numel) // max(1, embedding.weight.shape[1]))
        self.dtype = accumulate_dtype
        self.acc = torch.zeros(n_rows, dtype=accumulate_dtype, device=embedding.weight.device)
        self.row = 0
        self._handle = None

    def __enter__(self) -> "TiedInputSplit":
        self._handle = self.embedding.register_forward_hook(self._forward, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _forward(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input")
        if self.partner is None or not torch.is_tensor(output) or not output.requires_grad:
            return
        row = self.row
        pad = module.padding_idx if isinstance(module, nn.Embedding) else None
        keep = None if pad is None else ids != pad

        def on_grad(grad):
            ids_, grad_ = (ids, grad) if keep is None else (ids[keep], grad[keep])
            ids_, grad_ = ids_.reshape(-1), grad_.reshape(-1, grad.shape[-1]).to(self.dtype)
            self.acc[row] += (grad_ * self.partner[ids_].to(self.dtype)).sum()
            if self.direction is not None:
                rows = self._direction_rows(ids_)
                if rows is not None:
                    self.acc[row + self.offset] += (grad_ * rows.to(self.dtype)).sum()
        output.register_hook(on_grad)

    def _direction_rows(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The direction's rows ``ids`` (one per position), computed block by block of W's rows
        (the optimiser's rule needs the state slices; no full-size copy of W)."""
        dim = self.embedding.weight.shape[1]
        unique, inverse = torch.unique(ids, return_inverse=True)
        out = None
        for a in range(0, self.embedding.weight.shape[0], self.chunk_rows):
            b = min(a + self.chunk_rows, self.embedding.weight.shape[0])
            sel = (unique >= a) & (unique < b)
            if not bool(sel.any()):
                continue
            d = self.direction(a * dim, b * dim)
            if d is None:
                return None
            if out is None:
                out = torch.empty(len(unique), dim, dtype=d.dtype, device=d.device)
            out[sel] = d.reshape(b - a, dim)[unique[sel] - a]
        return None if out is None else out[inverse]


__all__ = ["TiedInputSplit"]
