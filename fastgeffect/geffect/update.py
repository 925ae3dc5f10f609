"""The step an optimiser *will* take, predicted per parameter (issue 17, docs/design.md §4).

The G-effect ``e = <∇R, g>`` predicts the change of a risk under plain gradient descent,
``ΔR ≈ -lr·e``. A real run steps with momentum or Adam, after clipping; its step ``Δθ`` is not
along ``g``. The *update effect* ``u = -Σ_p <∇_p R, Δθ_p> / lr_p`` replaces ``g`` by the direction
``d_p = -Δθ_p / lr_p`` the optimiser will move parameter p in, so that ``ΔR ≈ -lr·u``.

Each rule below is a pure, elementwise function of a parameter's gradient, value, optimiser state
and hyper-parameters, written after torch's single-tensor ``sgd``/``adam`` (the foreach and fused
kernels compute the same formulas). ``lr`` cancels out of ``d``, so a zero learning rate
(warm-up's first step) is no special case. Nothing is written: the state tensors are only read.
Being elementwise, a rule runs on flat slices of the tensors, one chunk at a time, so its
intermediates are a few chunks in size however large the parameter (an embedding, say).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..distributed import is_dtensor, local_part

Number = Union[float, torch.Tensor]
Rule = Callable[[torch.Tensor, torch.Tensor, Optional[dict], dict], torch.Tensor]

SUPPORTED = "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW"


def sgd_direction(grad: torch.Tensor, param: torch.Tensor, state: Optional[dict], group: dict) -> torch.Tensor:
    """``-Δθ / lr`` of ``torch.optim.SGD`` for one parameter: weight decay (L2, added to the
    gradient), momentum with dampening (the first step's buffer is the gradient itself), nesterov,
    maximize. Without any of them this is ``grad`` itself, not a copy."""
    g = -grad if group["maximize"] else grad
    wd, momentum = group["weight_decay"], group["momentum"]
    if wd != 0:
        g = g.add(param, alpha=wd)
    if momentum == 0:
        return g
    buf = None if state is None else state.get("momentum_buffer")
    buf = g if buf is None else buf.mul(momentum).add_(g, alpha=1 - group["dampening"])
    return g.add(buf, alpha=momentum) if group["nesterov"] else buf


def _next_step(state: Optional[dict]) -> Number:
    """The step count the update will use: a Python number when torch keeps ``step`` on the CPU
    (reading it is no device sync), else a device tensor, as in torch's capturable/fused path."""
    if state is None or "step" not in state:
        return 1.0
    step = state["step"]
    on_host = not isinstance(step, torch.Tensor) or step.device.type == "cpu"  # (old checkpoints: a number)
    return float(step) + 1.0 if on_host else step + 1


def adam_direction(grad: torch.Tensor, param: torch.Tensor, state: Optional[dict], group: dict) -> torch.Tensor:
    """``-Δθ / lr`` of ``torch.optim.Adam`` / ``AdamW`` for one parameter: the moments updated with
    ``grad`` (out of place), bias correction, amsgrad's running maximum, L2 (Adam) or decoupled
    (AdamW, ``decoupled_weight_decay``) weight decay, maximize. A parameter without state yet
    (its first step) starts from zero moments, as torch does."""
    beta1, beta2 = group["betas"]
    wd, decoupled = group["weight_decay"], group.get("decoupled_weight_decay", False)
    g = -grad if group["maximize"] else grad
    if wd != 0 and not decoupled:
        g = g.add(param, alpha=wd)
    fresh = state is None or "exp_avg" not in state
    if fresh:
        m = g.mul(1 - beta1)
        v = g.mul(g).mul_(1 - beta2)
    else:
        m = torch.lerp(state["exp_avg"], g, 1 - beta1)
        v = state["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
    del g
    if group["amsgrad"] and not fresh:
        v = torch.maximum(state["max_exp_avg_sq"], v)
    step = _next_step(state)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    d = m.div_(v.sqrt_().div_(bias2 ** 0.5).add_(group["eps"])).div_(bias1)  # in place: one chunk's worth alive
    if wd != 0 and decoupled:
        d = d.add_(param, alpha=wd)
    return d


def with_decay_mode(optimizer, group: dict) -> dict:
    """``group``, with Adam's ``decoupled_weight_decay`` decided from the optimiser's class where the
    key is missing: torch releases before the AdamW/Adam merge have no such key, and there AdamW
    decays decoupled, Adam by L2. A group holding the key is returned as it is."""
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and "decoupled_weight_decay" not in group:
        return {**group, "decoupled_weight_decay": type(optimizer) is torch.optim.AdamW}
    return group


RULES: Dict[type, Rule] = {torch.optim.SGD: sgd_direction, torch.optim.Adam: adam_direction,
                           torch.optim.AdamW: adam_direction}


def rule_for(optimizer) -> Rule:
    """The direction rule of ``optimizer`` (exactly SGD, Adam or AdamW: a subclass may step differently);
    a clear error for any other optimiser or for ``differentiable=True``."""
    rule = RULES.get(type(optimizer))
    if rule is None:
        raise TypeError(f"update effects support {SUPPORTED} (foreach, fused and capturable alike); got "
                        f"{type(optimizer).__module__}.{type(optimizer).__qualname__}. Pass the optimiser itself, "
                        "not a wrapper, or measure without optimizer=")
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            raise ValueError("update effects do not support differentiable=True optimisers (their hyper-parameters "
                             "may carry autograd graphs); use differentiable=False")
    return rule


def clip_coefficient(grads: Sequence[Optional[torch.Tensor]], max_grad_norm: Optional[float]) -> Optional[torch.Tensor]:
    """The factor ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` will scale the gradients by
    (``None``: no clipping), as a tensor: computed once, with no host sync. Under FSDP2 the total norm
    is the global one (one all-reduce, as clip_grad_norm_ does)."""
    if max_grad_norm is None:
        return None
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}")
    total = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
    if is_dtensor(total):
        total = total.full_tensor()
    return (max_grad_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s own formula


class UpdateDirections:
    """``direction(i, grad, lo, hi)``: ``-Δθ / lr`` of the flat elements ``[lo, hi)`` of ``params[i]``
    (its local shard under FSDP2) for the objective gradient ``grad`` (the local part of what
    ``p.grad`` held), or ``None`` when the optimiser will not move it (no gradient).
    ``group_index[i]``: the param group of ``params[i]``, which steps with learning rate ``lrs[k]``."""

    def __init__(self, optimizer, params: Sequence[nn.Parameter], param_names: Sequence[str],
                 grads: Sequence[Optional[torch.Tensor]], max_grad_norm: Optional[float] = None):
        self.rule = rule_for(optimizer)
        if any(p.is_complex() for p in params):
            raise ValueError("update effects do not support complex parameters (torch steps their real views)")
        if any(g is not None and g.is_sparse for g in grads):
            raise ValueError("update effects do not support sparse gradients")
        self.state = optimizer.state
        # each parameter's param group: its index (the lr it steps with) and hyper-parameters
        index_of = {id(p): k for k, group in enumerate(optimizer.param_groups) for p in group["params"]}
        groups = [with_decay_mode(optimizer, group) for group in optimizer.param_groups]
        group_of = {i: groups[k] for i, k in index_of.items()}
        missing = [n for n, p, g in zip(param_names, params, grads) if g is not None and id(p) not in group_of]
        if missing:
            shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            raise ValueError(f"{len(missing)} trainable parameter(s) with a gradient are not in the optimiser's "
                             f"param_groups: {shown}; pass the optimiser that steps this model")
        self.params: List[nn.Parameter] = list(params)
        self.groups: List[Optional[dict]] = [group_of.get(id(p)) for p in params]
        # a parameter outside every group has no gradient, hence no direction: group 0 is as good as any
        self.group_index: List[int] = [index_of.get(id(p), 0) for p in params]
        self.lrs: List[float] = [float(group["lr"]) for group in optimizer.param_groups]
        self.coef = clip_coefficient(grads, max_grad_norm)

    def direction(self, i: int, grad: Optional[torch.Tensor], lo: int = 0, hi: Optional[int] = None
                  ) -> Optional[torch.Tensor]:
        group = self.groups[i]
        if grad is None or group is None:
            return None

        def part(t: torch.Tensor) -> torch.Tensor:  # the slice of a parameter-shaped tensor, a view
            return local_part(t).reshape(-1)[lo:hi]

        g = part(grad) if self.coef is None else part(grad) * self.coef.to(grad.device)
        p = self.params[i]
        state = self.state.get(p)  # not [p]: optimizer.state is a defaultdict, indexing would insert an entry
        if state is not None:
            state = {k: v if k == "step" or v is None else part(v) for k, v in state.items()}
        return self.rule(g, part(p.detach()), state, group)


__all__ = ["SUPPORTED", "RULES", "UpdateDirections", "adam_direction", "clip_coefficient", "rule_for",
           "sgd_direction", "with_decay_mode"]
