"""The risk: what a G-effect measures the objective gradient against (docs/design.md §4).

* The contract and its checks: a risk is a zero-argument callable returning a scalar with an
  autograd graph, per-sample losses a (B,) tensor; checked before any backward, so a bad value
  fails with its name instead of deep inside autograd.
* The default risk, :func:`nll_risk` (token-mean NLL of the answers), which the unlearning loop and
  :class:`~fastgeffect.integrations.hf_callback.GEffectCallback` both use.
* The rows the loop measures it on: with ``risk_rows="fixed"`` one seeded draw of forget rows and
  one of held-out retain rows, the same at every step (so that the effects of successive steps add
  up to the change of one risk); with ``"step"`` the step's first forget samples and a fresh draw
  of held-out retain rows. :func:`nll_risk_on` is the risk on such rows, as one rank's share under
  data parallel.

Nothing here imports the loop: the callback takes its risk from here.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..data.collate import collate_qa
from ..data.pairs import ForgetRetainDataset
from ..data.qa import QADataset
from ..losses import nll

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


def nll_risk(model: torch.nn.Module, batch: Dict[str, torch.Tensor], num_tokens=None, weight: float = 1.0
             ) -> torch.Tensor:
    """The default risk R: token-mean NLL over the batch's answer tokens (``num_tokens``: the divisor
    of the whole, all-rank risk batch, so each rank returns its share)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = nll(out.logits, batch["labels"], num_items_in_batch=num_tokens)
    return loss * weight if weight != 1.0 else loss


def n_tokens(items: List[dict]) -> int:
    """Valid shifted labels in ``items`` (the token-mean divisor)."""
    return int(sum(int((it["labels"][1:] != -100).sum()) for it in items))


def forget_risk_items(pairs: ForgetRetainDataset, global_chunks: Sequence[Sequence[int]], n: int) -> List[dict]:
    """The unlearning risk's rows: the first ``n`` forget samples of the step, in global micro-batch order."""
    return [pairs[i]["forget"] for c in global_chunks for i in c][:n]


def retain_risk_items(heldout: QADataset, seed: int, step: int, n: int) -> List[dict]:
    """The retaining risk's rows: ``n`` held-out retain rows, a fresh, seeded draw at every step."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    idx = torch.randperm(len(heldout), generator=g)[:min(n, len(heldout))].tolist()
    return [heldout[i] for i in idx]


# the fixed draws' generator seeds lie above every per-step draw's (seed * 7919 + step, steps < 2^50)
_FIXED_SEED = 1 << 50


def fixed_rows(n_rows: int, seed: int, n: int, salt: int) -> List[int]:
    """``min(n, n_rows)`` row numbers, one seeded draw (``salt`` tells the forget draw from the retain one)."""
    g = torch.Generator().manual_seed(_FIXED_SEED + 2 * seed + salt)
    return torch.randperm(n_rows, generator=g)[:min(n, n_rows)].tolist()


def fixed_forget_items(forget: QADataset, seed: int, n: int) -> List[dict]:
    """The unlearning risk's rows with fixed risk rows: ``n`` forget rows, drawn once for ``seed``."""
    return [forget[i] for i in fixed_rows(len(forget), seed, n, salt=0)]


def fixed_retain_items(heldout: QADataset, seed: int, n: int) -> List[dict]:
    """The retaining risk's rows with fixed risk rows: ``n`` held-out retain rows, drawn once for ``seed``."""
    return [heldout[i] for i in fixed_rows(len(heldout), seed, n, salt=1)]


def nll_risk_on(model: torch.nn.Module, items: List[dict], device: torch.device, *, rank: int = 0, world: int = 1
                ) -> RiskFn:
    """:func:`nll_risk` on the rows ``items``, batched once on ``device``. Under data parallel
    (``world`` > 1), rank ``rank``'s share: its rows ``rank::world`` divided by the token count
    of all rows, so the shares sum to the risk of all rows (a rank without rows joins with a
    zero-weight copy of the first)."""
    if world == 1:
        batch = _on(collate_qa(items), device)
        return lambda: nll_risk(model, batch)
    mine = items[rank::world]
    batch = _on(collate_qa(mine or items[:1]), device)
    total = max(1, n_tokens(items))
    return lambda: nll_risk(model, batch, total, 1.0 if mine else 0.0)


def _on(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


__all__ = ["RiskFn", "check_risk_value", "evaluate_risk", "check_per_sample_losses", "nll_risk", "nll_risk_on",
           "n_tokens", "forget_risk_items", "retain_risk_items", "fixed_rows", "fixed_forget_items",
           "fixed_retain_items"]
