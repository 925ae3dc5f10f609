"""What the phases of one study share (:class:`Run`), how long each took (:class:`Timer`), and a
stop that already recorded why (:class:`RecordedStop`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from .. import distributed as dist_
from ..data.muse import MuseData
from .config import RunConfig
from .presets import Preset
from .privacy import PrivacyInputs
from .run_folder import RunFolder
from .targets import Target


class RecordedStop(SystemExit):
    """A stop whose ``error.json`` is already written, with the step and the state to resume from."""


class Timer:
    """Seconds spent per phase of this invocation, kept in the run folder's ``timing.json`` as each
    phase ends (main process), so an invocation that is killed keeps the phases it completed."""

    def __init__(self, folder: Optional[RunFolder] = None, resumed: bool = False) -> None:
        self.t0 = time.perf_counter()
        self.times: Dict[str, float] = {}
        self.folder, self.resumed = folder, resumed
        self.entry: Optional[int] = folder.start_timing() if folder is not None and dist_.is_main() else None

    def phase(self, name: str, since: float) -> None:
        self.times[name] = time.perf_counter() - since
        self.save("running")

    def save(self, status: str) -> None:
        """``status``: running, done, stopped (as asked), interrupted (Ctrl-C) or failed."""
        if self.entry is not None:
            self.folder.update_timing(self.entry, {"resumed": bool(self.resumed), "status": status, **self.times})


@dataclass
class Run:
    """What the phases of one study share: its settings (resolved), the claimed folder, the target on
    its device, and (main process, ``--eval full``) the evaluation sets and the retain twin's log."""
    cfg: RunConfig
    preset: Preset
    folder: RunFolder
    target: Target
    device: torch.device
    fused: bool  # the fused LM-head losses run (--fused, resolved for the target)
    timer: Timer
    sets: Optional[dict] = None
    retain_log: Optional[str] = None
    privacy: Optional[PrivacyInputs] = None  # --eval-metrics: families, holdout rows, PrivLeak's reference
    muse: Optional[MuseData] = None  # --benchmark muse: the MUSE folder, read and checked
    task_manager: Optional[object] = None  # --eval-tasks: lm-eval's task manager, the tasks checked against it

    @property
    def out(self) -> Path:
        return self.folder.path

    @property
    def shared(self) -> Path:
        """Where what only depends on the target and data is kept (``--shared-dir``, else the run folder)."""
        return Path(self.cfg.shared_dir) if self.cfg.shared_dir else self.out
