"""Post-hoc G-effects of saved checkpoints, as the paper computed them, without training.

For each checkpoint: load the model, back-propagate the objective once, measure the risks with the
streaming engine, free the model. Everything about data and the objective stays with the caller,
so any loss and any model loader work::

    rows = posthoc_geffects(
        ["out/checkpoint-25", "out/checkpoint-50"],
        load_model=lambda path: AutoModelForCausalLM.from_pretrained(path),
        loss_fn=lambda model: my_objective(model, forget_batch),
        risks_fn=lambda model: {"unlearn": lambda: nll_of(model, forget_batch),
                                "retain": lambda: nll_of(model, retain_batch)},
        logger=GEffectLogger("geffects_posthoc.jsonl"))
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from .engine import GEffect, GEffectResult
from .groups import GroupSpec
from .log import GEffectLogger
from .risk import RiskFn


def step_from_checkpoint(checkpoint: Any, default: int) -> int:
    """The trailing integer of a checkpoint name (``checkpoint-125`` -> 125), else ``default``."""
    m = re.search(r"(\d+)\D*$", os.path.basename(os.fspath(checkpoint).rstrip("/\\"))) if isinstance(
        checkpoint, (str, os.PathLike)) else None
    return int(m.group(1)) if m else default


def posthoc_geffects(checkpoints: Iterable[Any], load_model: Callable[[Any], nn.Module],
                     loss_fn: Callable[[nn.Module], Optional[torch.Tensor]],
                     risks_fn: Callable[[nn.Module], Mapping[str, RiskFn]], *, groups: GroupSpec = "paper",
                     accumulate_dtype: Optional[torch.dtype] = None, logger: Optional[GEffectLogger] = None,
                     step_of: Callable[[Any, int], int] = step_from_checkpoint) -> List[Dict[str, Any]]:
    """G-effects of each checkpoint.

    ``load_model(ckpt)`` returns the model (trainable parameters as during unlearning);
    ``loss_fn(model)`` returns the scalar objective loss, or ``None`` if it back-propagated itself
    (e.g. accumulating over several batches); ``risks_fn(model)`` returns the named risk callables.
    Returns one record per checkpoint: ``{"checkpoint", "step", "loss", "results": {risk: GEffectResult}}``,
    and logs each measurement to ``logger`` (with the checkpoint name) when given.
    """
    rows: List[Dict[str, Any]] = []
    for index, ckpt in enumerate(checkpoints):
        model = load_model(ckpt)
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_model({ckpt!r}) returned {type(model).__name__}, not a torch.nn.Module")
        engine = GEffect(model, groups=groups, accumulate_dtype=accumulate_dtype)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn(model)
        loss_value = None
        if loss is not None:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor or None, got "
                                 f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"objective loss at checkpoint {ckpt!r} is not finite ({loss_value})")
            loss.reshape(()).backward()
            del loss
        results: Dict[str, GEffectResult] = engine.measure(risks_fn(model))
        step = step_of(ckpt, index)
        if logger is not None:
            logger.log(step, results, checkpoint=str(ckpt), objective_loss=loss_value)
        rows.append({"checkpoint": str(ckpt), "step": step, "loss": loss_value, "results": results})
        model.zero_grad(set_to_none=True)
        del model, engine
    return rows


__all__ = ["posthoc_geffects", "step_from_checkpoint"]
