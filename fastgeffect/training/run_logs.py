"""What one step of the unlearning loop records, and the run folder's JSON-lines logs it goes to:
``geffect.jsonl`` (a line per measured step and risk), ``pg_effects.jsonl`` (a line per PG-effect
step) and ``train_log.jsonl`` (a line per step taken). Only the main process writes them
(:class:`NoRunLogs` stands in on the others)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from .. import run_files as files
from ..geffect import GEffectLogger
from ..jsonl import JsonlAppender, append_jsonl, truncate_jsonl


@dataclass
class StepRecord:
    """One step's outcome, filled as the step goes: a step stopped by a non-finite value leaves
    ``grad_norm`` (and what was not measured yet) None."""
    step: int
    epoch: int
    batch: int                            # the step's index in its epoch
    lr: float                             # the learning rate of this step
    logs: Dict = field(default_factory=dict)  # the objective's (ObjectiveLogs.result), λ of primal-dual ones
    geffects: Optional[dict] = None       # risk -> GEffectResult, at measured steps
    outcome: Optional[dict] = None        # risk -> value after the step, realised and predicted changes
    second_order: Optional[dict] = None   # risk -> ½ΔθᵀHΔθ of the step, with --second-order
    pg_effects: Optional[dict] = None     # the pg_effects.jsonl line, at PG-effect steps
    grad_norm: Optional[float] = None     # set once the optimiser step is taken

    @property
    def row(self) -> dict:
        """The ``train_log.jsonl`` line."""
        return {"step": self.step, "epoch": self.epoch, "grad_norm": self.grad_norm, **self.logs}

    @property
    def postfix(self) -> dict:
        """The progress bar's summary."""
        out = {"loss": f"{self.logs['loss']:.3g}"}
        if self.geffects is not None:
            out.update(e_u=f"{self.geffects['unlearn'].total:.3g}", e_r=f"{self.geffects['retain'].total:.3g}")
        return out


class RunLogs:
    """The logs of a run (re)starting at ``step``: the lines of steps >= it, left by an interrupted
    attempt, are dropped first (the run re-does those steps)."""

    def __init__(self, out_dir: Path, step: int, objective: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (files.TRAIN_LOG, files.PG_EFFECTS):
            truncate_jsonl(out_dir / name, step)
        self.objective = objective
        self.geffects = GEffectLogger(out_dir / files.GEFFECTS, resume_step=step)
        self.train = JsonlAppender(out_dir / files.TRAIN_LOG)
        self.pg_path = out_dir / files.PG_EFFECTS

    def write(self, r: StepRecord) -> None:
        """What ``r`` holds: its G-effects (with the step's outcome when measured), PG-effects, and
        its train-log line once the step was taken."""
        if r.geffects is not None:
            extra = {k: v for k, v in r.logs.items() if k != "weights"}
            self.geffects.log(r.step, r.geffects, stats=r.logs.get("weights"), per_risk=r.outcome, epoch=r.epoch,
                              objective=self.objective, lr=r.lr, **extra)
        if r.pg_effects is not None:
            append_jsonl(self.pg_path, [r.pg_effects])
        if r.grad_norm is not None:
            self.train.append([r.row])

    def close(self) -> None:
        self.geffects.close()
        self.train.close()


class NoRunLogs:
    """Stands in for the logs on the processes other than the main one."""

    def write(self, r: StepRecord) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["StepRecord", "RunLogs", "NoRunLogs"]
