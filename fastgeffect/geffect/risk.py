"""Risks and per-sample objective terms as the G-effect code takes them: a risk is a zero-argument
callable returning a scalar with an autograd graph, per-sample losses a (B,) tensor. Checked
before any backward, so a bad value fails with its name instead of deep inside autograd."""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

RiskFn = Callable[[], torch.Tensor]


def check_risk_value(name: str, value) -> torch.Tensor:
    """A risk must be a finite scalar tensor attached to the autograd graph."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"risk {name!r} must return a tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"risk {name!r} must return a scalar, got a tensor of shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"risk {name!r} must return a floating tensor, got {value.dtype}")
    if not value.requires_grad:
        raise ValueError(f"risk {name!r} does not depend on any trainable parameter (its value has no "
                         "autograd graph; was it computed under torch.no_grad()?)")
    return value.reshape(())


def evaluate_risk(name: str, fn: RiskFn) -> Tuple[torch.Tensor, float]:
    """Run a risk callable (with autograd on) and refuse a bad or non-finite value before any
    backward; one host sync per risk, not per parameter."""
    with torch.enable_grad():
        value = check_risk_value(name, fn())
    v = float(value.detach())
    if not math.isfinite(v):
        raise FloatingPointError(f"risk {name!r} is not finite ({v})")
    return value, v


def check_per_sample_losses(losses, need_grad: bool = True) -> torch.Tensor:
    """``per_sample_losses_fn()`` must give a finite, non-empty (B,) tensor with an autograd graph."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"per_sample_losses_fn must return a non-empty 1-D (batch,) tensor, got {got}")
    if need_grad and not losses.requires_grad:
        raise ValueError("per-sample losses do not depend on any trainable parameter (no autograd graph)")
    if not bool(torch.isfinite(losses.detach()).all()):
        raise FloatingPointError("per-sample losses contain NaN or inf")
    return losses


__all__ = ["RiskFn", "check_risk_value", "evaluate_risk", "check_per_sample_losses"]
