"""TensorBoard event files of a driver run (``--report-to tensorboard``), next to its JSON-lines logs:
losses, objective-weight statistics and G-effects per group at every step, evaluation metrics before
(step 0) and after unlearning (the last step), named as in :mod:`fastgeffect.scalars`."""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Mapping, Optional

from .scalars import geffect_scalars, train_scalars

if TYPE_CHECKING:  # a type only: the command line imports this module to check for tensorboard
    from .geffect import GEffectResult


def tensorboard_missing() -> Optional[str]:
    """Why TensorBoard files cannot be written here, or None when they can."""
    if importlib.util.find_spec("tensorboard") is None:
        return "the tensorboard package is not installed (pip install tensorboard)"
    return None


class TensorBoardLog:
    """Scalars into the event files of ``log_dir``, flushed at every call.

    ``purge_step``: the step this (possibly resumed) run continues from. TensorBoard hides the events
    an interrupted attempt wrote at steps >= it, so re-done steps are not shown twice.
    """

    def __init__(self, log_dir: os.PathLike, purge_step: int = 0):
        # optional dependency, imported only when TensorBoard output is asked for
        from torch.utils.tensorboard import SummaryWriter

        self.purge_step = purge_step
        self._writer = SummaryWriter(os.fspath(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def step(self, row: Mapping, results: Optional[Mapping[str, GEffectResult]] = None) -> None:
        """One training step: its ``train_log.jsonl`` row and its G-effects (None: not measured)."""
        self.scalars(row["step"], {**train_scalars(row), **(geffect_scalars(results) if results else {})})

    def close(self) -> None:
        self._writer.close()


__all__ = ["TensorBoardLog", "tensorboard_missing"]
