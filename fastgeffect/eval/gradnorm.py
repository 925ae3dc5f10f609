"""Per-sample gradient norms for the GradNorm attack: for each row, the p-norm of its loss's
gradient per parameter tensor (open-unlearning then averages over the tensors).

p = 2 without a backward per sample ("ghost" norms): one batched forward/backward of Σ_i ℓ_i with
hooks keeping, per module call, its input ``a`` and output gradient ``δ`` (rows of sample i only);
a parameter's per-sample gradient is the sum over its uses of

* Linear weight:  Σ_t δ_t a_tᵀ (HF Conv1D: its transpose),  so ||·||² = Σ_{t,s} (a_t·a_s)(δ_t·δ_s)
  (or, when T² > in·out, the (out, in) matrix itself);
* Embedding:      row v gets Σ_{t: id_t = v} δ_t,  so ||·||² = Σ_{t,s: id_t = id_s} δ_t·δ_s
  (positions holding ``padding_idx`` get no gradient; a call broadcast over the batch, as GPT-2's
  position embeddings, is expanded to per-sample rows);
* Linear bias, and the small parameters of any other leaf module (RMSNorm/LayerNorm weights):
  the per-sample gradient itself (a vmap of the module's vector-Jacobian product).

A parameter with several uses (tied input embedding = LM head) gets the cross terms too:
||g_E + g_L||² = ||g_E||² + ||g_L||² + 2<g_E, g_L>, with <g_E, g_L> = Σ_{t,s} (δ^E_t·a_s) δ^L_s[id_t].
Every reconstruction is checked: the per-sample gradients must sum to the batch gradient that
the same backward gives; a parameter that fails, or whose uses have no closed form, falls back
to one backward per sample (as do p = 1 and p = ∞, which no ghost identity gives).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

EXPLICIT_LIMIT = 1 << 26  # B · numel above which a leaf module's per-sample gradients are not formed

try:  # GPT-2 style "Conv1D" (y = a W + b, W stored (in, out)); transformers is a dependency but keep this soft
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover
    _HFConv1D = nn.Linear
_GHOST_MODULES = (nn.Linear, _HFConv1D, nn.Embedding)


class _Uses:
    """Forward hooks recording, for every call of a module owning a parameter, the module, its
    input and (via a tensor hook) the gradient at its output."""

    def __init__(self, model: nn.Module, params: List[nn.Parameter]):
        self.index = {id(p): i for i, p in enumerate(params)}
        self.uses: Dict[int, list] = {i: [] for i in range(len(params))}
        self.bad: Dict[int, str] = {}
        self.off = False
        self.seen_batch = 0  # largest leading dimension of a hooked output so far in the forward
        self.handles = []
        for mod in model.modules():
            owned = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) in self.index]
            if owned:
                self.handles.append(mod.register_forward_hook(self._hook(mod, owned), with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, mod, owned):
        def hook(module, args, kwargs, output):
            if self.off or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or len(args) != 1 or kwargs:
                for _, p in owned:
                    self.bad.setdefault(self.index[id(p)], f"{type(mod).__name__}: no single tensor in and out")
                return None
            if not output.requires_grad:
                return None
            x, B = args[0].detach(), self.seen_batch
            if output.dim() >= 2 and output.shape[0] == 1 and B > 1 and x.dim() >= 1 and x.shape[0] == 1 \
                    and isinstance(mod, _GHOST_MODULES):
                # a batch-broadcast call (GPT-2's position embeddings on (1, T) ids): hand the model an
                # expanded view, identical after broadcasting, so δ arrives per sample
                output, x = output.expand(B, *output.shape[1:]), x.expand(B, *x.shape[1:])
            elif output.dim() >= 1:
                self.seen_batch = max(self.seen_batch, output.shape[0])
            use = {"mod": mod, "x": x, "d": None}
            output.register_hook(lambda d: use.__setitem__("d", d.detach()))
            for n, p in owned:
                self.uses[self.index[id(p)]].append((n, use))
            return output
        return hook


def _ct(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _rep(name: str, use: dict, B: int, uses_obj: _Uses) -> Optional[tuple]:
    """A use's per-sample gradient in a form the inner products read, or None (no closed form)."""
    mod, x, d = use["mod"], use["x"], use["d"]
    if d is None:  # the output did not reach the loss: this use contributes nothing
        return ("zero",)
    if d.dim() == 0 or d.shape[0] != B or x.dim() == 0 or x.shape[0] != B:
        return None
    if isinstance(mod, (nn.Linear, _HFConv1D)):
        a, dd = x.reshape(B, -1, x.shape[-1]), d.reshape(B, -1, d.shape[-1])
        if a.shape[1] != dd.shape[1]:
            return None
        return ("lin", a, dd, not isinstance(mod, nn.Linear)) if name == "weight" else ("exp", dd.sum(1))
    if isinstance(mod, nn.Embedding):
        if mod.max_norm is not None or mod.scale_grad_by_freq or x.shape != d.shape[:-1]:
            return None
        ids, dd = x.reshape(B, -1), d.reshape(B, -1, d.shape[-1])
        if mod.padding_idx is not None:
            dd = dd * (ids != mod.padding_idx).unsqueeze(-1).to(dd.dtype)
        return ("emb", ids, dd)
    p = dict(mod.named_parameters(recurse=False))[name]
    if next(mod.children(), None) is not None or B * p.numel() > EXPLICIT_LIMIT:
        return None

    def f(w, xb, db):
        return (functional_call(mod, {name: w}, (xb.unsqueeze(0),)).squeeze(0) * db).sum()

    uses_obj.off = True  # the recomputation must not record new uses
    try:
        with torch.enable_grad():
            return ("exp", vmap(grad(f), in_dims=(None, 0, 0))(p.detach(), x, d))
    finally:
        uses_obj.off = False


def _inner(u: tuple, v: tuple, ghost: Optional[bool]) -> Optional[torch.Tensor]:
    """(B,) <g_u, g_v> per sample, or None when this pair has no closed form."""
    if u[0] == "zero" or v[0] == "zero":
        return 0.0
    if u[0] > v[0]:
        u, v = v, u  # kinds in order: emb < exp < lin
    kinds = (u[0], v[0])
    if kinds == ("exp", "exp"):
        ct = _ct(u[1], v[1])
        return (u[1].to(ct) * v[1].to(ct)).flatten(1).sum(1)
    if kinds == ("lin", "lin"):
        (_, a1, d1, t1), (_, a2, d2, t2) = u, v
        if t1 != t2:  # one weight as both (out, in) and (in, out): not a pair met in practice
            return None
        ct = _ct(a1, d1)
        a1, d1, a2, d2 = a1.to(ct), d1.to(ct), a2.to(ct), d2.to(ct)
        use_ghost = ghost if ghost is not None else a1.shape[1] * a2.shape[1] <= a1.shape[2] * d1.shape[2]
        if use_ghost:
            return ((a1 @ a2.transpose(1, 2)) * (d1 @ d2.transpose(1, 2))).sum((1, 2))
        return ((d1.transpose(1, 2) @ a1) * (d2.transpose(1, 2) @ a2)).sum((1, 2))
    if kinds == ("emb", "emb"):
        (_, i1, d1), (_, i2, d2) = u, v
        ct = _ct(d1)
        same = (i1.unsqueeze(2) == i2.unsqueeze(1)).to(ct)
        return (same * (d1.to(ct) @ d2.to(ct).transpose(1, 2))).sum((1, 2))
    if kinds == ("emb", "lin"):  # a tied embedding and LM head: weight (V, H) in both
        (_, ids, de), (_, a, dl, transposed) = u, v
        if transposed:
            return None
        ct = _ct(de)
        B, S = ids.shape
        R = a.shape[1]
        picked = torch.gather(dl.to(ct), 2, ids.unsqueeze(1).expand(B, R, S))  # [b, s, t] = δ^L_s[id_t]
        return ((de.to(ct) @ a.to(ct).transpose(1, 2)) * picked.transpose(1, 2)).sum((1, 2))
    return None


def _batch_grad(rep: tuple, shape: torch.Size) -> Optional[torch.Tensor]:
    """Σ_i of a use's per-sample gradients (the batch gradient it should give)."""
    if rep[0] == "zero":
        return None
    if rep[0] == "exp":
        return rep[1].sum(0)
    if rep[0] == "lin":
        a, d = rep[1].to(_ct(rep[1], rep[2])).flatten(0, 1), rep[2].to(_ct(rep[1], rep[2])).flatten(0, 1)
        return a.t() @ d if rep[3] else d.t() @ a
    ids, d = rep[1], rep[2]
    out = torch.zeros(shape, dtype=_ct(d), device=d.device)
    return out.index_add_(0, ids.flatten(), d.to(out.dtype).flatten(0, 1))


def _rtol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


def _ghost_sq_norm(uses: list, g: torch.Tensor, B: int, cap: _Uses, ghost: Optional[bool]) -> Optional[torch.Tensor]:
    """(B,) ||∇ℓ_i||² of one parameter from its uses, or None (no closed form, or the check fails)."""
    reps = [_rep(n, u, B, cap) for n, u in uses]
    if not reps or any(r is None for r in reps):
        return None
    total = torch.zeros(B, dtype=torch.float64, device=g.device)
    recon = torch.zeros(g.shape, dtype=_ct(g), device=g.device)  # one gradient copy, in at least fp32
    for j, u in enumerate(reps):
        part = _batch_grad(u, g.shape)
        if part is not None:
            recon += part.to(recon.dtype)
        for v in reps[j:]:
            ip = _inner(u, v, ghost)
            if ip is None:
                return None
            total += (1.0 if v is u else 2.0) * (ip.to(torch.float64) if torch.is_tensor(ip) else ip)
    scale = float(g.abs().max()) + float(recon.abs().max())
    if float((recon - g.to(recon.dtype)).abs().max()) > _rtol(g.dtype) * max(scale, 1e-30):
        return None  # the parameter acts outside its modules' forwards (or a use was missed)
    return total.clamp(min=0)


def per_sample_grad_norms(model: nn.Module, losses_fn, *, p: float = 2, ghost_linear: Optional[bool] = None,
                          force_loop: bool = False) -> Dict[str, object]:
    """Per-sample gradient p-norms of ``losses_fn()`` ((B,) per-sample losses from one batched
    forward of ``model``), per parameter tensor: ``{"norms": (P, B) float64 CPU, "names": [...],
    "fallback": [names computed by one backward per sample]}``. Parameters the losses do not
    reach are left out (open-unlearning's ``param.grad is not None``). ``ghost_linear`` forces the
    Linear form (None: the cheaper one); ``force_loop`` computes every parameter by the loop."""
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    params = [q for _, q in named]
    if not params:
        raise ValueError("GradNorm needs gradients but the model has no trainable parameter (requires_grad)")
    cap = _Uses(model, params) if p == 2 and not force_loop else None
    try:
        with torch.enable_grad():
            losses = losses_fn()
    finally:
        if cap is not None:
            cap.close()
    B = losses.shape[0]
    grads = torch.autograd.grad(losses.sum(), params, retain_graph=True, allow_unused=True)
    keep = [i for i, g in enumerate(grads) if g is not None]
    norms = torch.zeros(len(keep), B, dtype=torch.float64)
    loop = []
    for row, i in enumerate(keep):
        sq = None if cap is None or i in cap.bad else _ghost_sq_norm(cap.uses[i], grads[i], B, cap, ghost_linear)
        if sq is None:
            loop.append(row)
        else:
            norms[row] = sq.sqrt().cpu()
    if loop:
        sub = [params[keep[r]] for r in loop]
        for b in range(B):
            gs = torch.autograd.grad(losses[b], sub, retain_graph=b < B - 1, allow_unused=True)
            for r, g in zip(loop, gs):
                norms[r, b] = 0.0 if g is None else float(g.detach().to(torch.float64).norm(p=p))
    del losses, grads
    return {"norms": norms, "names": [named[i][0] for i in keep],
            "fallback": [named[keep[r]][0] for r in loop]}


def check_p(p) -> float:
    """p of the GradNorm attack: 1, 2 or inf (open-unlearning's choices)."""
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or p not in (1, 2, math.inf):
        raise ValueError(f"p must be 1, 2 or inf (the GradNorm attack's norms), got {p!r}")
    return float(p)
