"""Refusing non-finite G-effects. A risk with a finite value can still have a NaN/inf gradient,
and the objective gradient in ``p.grad`` can hold NaN/inf too; the dot products are then NaN and
nothing else would notice. The check is one look at the small (rows × groups) table a measurement
produces anyway (no per-parameter host synchronisation); which gradient was non-finite is looked
up only on the error path, from per-group squared norms of the gradient that is still at hand."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

HINT = ("NaN/inf gradients usually come from an overflow (fp16, a too large learning rate) or from "
        "NaN/inf inputs; check the loss and the batch at this step")


def nonfinite_groups(table: torch.Tensor, group_names: Sequence[str]) -> List[str]:
    """The groups (columns of a (rows, groups) table) holding NaN or ±inf in some row."""
    bad = ~torch.isfinite(table).all(0)
    return [g for g, b in zip(group_names, bad.tolist()) if b]


def blame(groups: Sequence[str], group_names: Sequence[str], norm2: Optional[torch.Tensor], known: str,
          other: str) -> str:
    """Which gradient is non-finite in ``groups``: ``known`` where its per-group squared norm
    ``norm2`` is not finite, else ``other`` (``norm2`` None: either)."""
    if norm2 is None:
        return f"{known} or {other} holds NaN/inf there"
    finite = torch.isfinite(norm2).tolist()
    bad = [g for g in groups if not finite[list(group_names).index(g)]]
    if bad:
        return f"{known} is non-finite in group(s) {', '.join(bad)}"
    return f"{known} is finite there, so {other} is non-finite"


def check_finite_geffects(table: torch.Tensor, group_names: Sequence[str], risk_names: Sequence[str],
                          objective_norm2: Callable[[], Optional[torch.Tensor]]) -> None:
    """Raise ``FloatingPointError`` when the (risks × groups) G-effect table holds NaN/inf, naming
    each risk and group and whether the objective gradient (per-group squared norms from
    ``objective_norm2()``, called only then) was the non-finite one."""
    if bool(torch.isfinite(table).all()):
        return
    parts = [f"risk {name!r} in group(s) {', '.join(groups)}" for name, row in zip(risk_names, table)
             if (groups := nonfinite_groups(row[None], group_names))]
    cause = blame(nonfinite_groups(table, group_names), group_names, objective_norm2(),
                  "the objective gradient (p.grad)", "the risk's gradient (its value is finite)")
    raise FloatingPointError(f"G-effect is not finite (NaN/inf) for {'; '.join(parts)}: {cause}. {HINT}")


def check_finite_pg_effects(table: torch.Tensor, group_names: Sequence[str],
                            risk_norm2: Callable[[], Optional[torch.Tensor]], batch: Optional[torch.Tensor] = None,
                            risk: str = "risk_fn") -> None:
    """Raise ``FloatingPointError`` when the (groups × samples) PG-effect table, or the per-group
    batch dots ``batch`` (the consistency check's ``<∇R, ∇Σℓ>``), hold NaN/inf, naming the groups,
    the samples and whether ∇R (per-group squared norms from ``risk_norm2()``, called only then)
    or the per-sample losses' gradients were non-finite."""
    columns = table if batch is None else torch.cat([table, batch.reshape(-1, 1)], 1)
    if bool(torch.isfinite(columns).all()):
        return
    groups = nonfinite_groups(columns.t(), group_names)
    samples = (~torch.isfinite(table).all(0)).nonzero().flatten().tolist()
    where = f"sample(s) {samples}" if samples else "the batch's gradient"
    cause = blame(groups, group_names, risk_norm2(), f"the gradient of risk {risk!r}",
                  "the per-sample losses' gradient")
    raise FloatingPointError(f"PG-effects against risk {risk!r} are not finite (NaN/inf) in group(s) "
                             f"{', '.join(groups)} for {where}: {cause}. {HINT}")


__all__ = ["check_finite_geffects", "check_finite_pg_effects", "nonfinite_groups", "blame"]
