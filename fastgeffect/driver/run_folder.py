"""The run folder: where a run's configuration, logs, errors and timings live.

A folder holding a run (its ``config.json``) is never reused silently: ``resume`` continues it
when the settings in ``RESUME_KEYS`` agree, ``overwrite`` replaces it. Only the main process
writes; every write is atomic (JSON) or line by line (JSON-lines logs).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Sequence

from ..distributed import write_json_main


def default_run_name(method: str, regularizer: str, split: str, seed: int) -> str:
    return f"{method}-{regularizer}-{split}-seed{seed}"


class RunFolder:
    def __init__(self, path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def has_config(self) -> bool:
        return self.config_path.exists()

    def prepare(self, *, resume: bool, overwrite: bool, settings: Dict[str, object],
                resume_keys: Sequence[str]) -> None:
        """Create the folder, or check that it may be continued (``resume``) or replaced (``overwrite``)."""
        if self.has_config():
            if overwrite:
                shutil.rmtree(self.path)
            elif resume:
                saved = json.loads(self.config_path.read_text())
                diff = {k: (saved.get(k), settings.get(k)) for k in resume_keys if saved.get(k) != settings.get(k)}
                if diff:
                    raise SystemExit(f"--resume: {self.path} was run with other settings {diff} (saved, now)")
            else:
                raise SystemExit(f"{self.path} holds another run (config.json): pass --resume to continue it or "
                                 "--overwrite to replace it")
        elif resume and self.path.exists() and any(self.path.iterdir()):
            raise SystemExit(f"--resume: {self.path} has no config.json, it is not a run folder")
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        """The run's configuration, written once (a resumed run keeps the first one)."""
        if not self.has_config():
            write_json_main(self.config_path, config)

    def write_error(self, message: str, step: int, state: Path) -> None:
        write_json_main(self.path / "error.json", {"error": message, "step": step, "state": str(state)})

    def add_timing(self, times: Dict[str, float], resumed: bool) -> None:
        """Append this invocation's phase timings to ``timing.json`` (one entry per start or resume)."""
        path = self.path / "timing.json"
        previous = json.loads(path.read_text()) if path.exists() else []
        write_json_main(path, previous + [{"resumed": bool(resumed), **times}])
