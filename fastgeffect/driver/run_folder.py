"""The run folder: where a run's configuration, logs, errors and timings live.

A run claims its folder before any work (:meth:`RunFolder.prepare`): an exclusive lock on
``<folder>/.lock`` held for the run's life, so two runs never write into one folder, and a marker
file, ``.fastgeffect-run``, that makes the folder recognisably a run: ``--overwrite`` deletes only
such folders. A folder holding a run (its ``config.json``) is never reused silently: ``resume``
continues it when the settings agree, ``overwrite`` replaces it. Only the main process writes;
every write is atomic (JSON) or line by line (JSON-lines logs).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from .. import run_files as files
from ..dataclass_cli import flag
from ..distributed import write_json_main
from ..jsonfile import read_json

LOCK = ".lock"
MARKER = files.MARKER


def as_flags(values: Dict[str, object]) -> str:
    """Settings as the flags that give them: ``--lr 0.001``, ``--save-model``, ``no --lora``."""
    words = []
    for k, v in values.items():
        name = flag(k)
        words.append(f"no {name}" if v is None or v is False else name if v is True else f"{name} {v}")
    return ", ".join(words)


class RunFolder:
    def __init__(self, path) -> None:
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / files.CONFIG

    def has_config(self) -> bool:
        return self.config_path.exists()

    def is_run(self) -> bool:
        """The folder was claimed by a fastgeffect run (it holds the marker)."""
        return (self.path / MARKER).exists()

    # ---- claiming -----------------------------------------------------------------------------
    def prepare(self, *, resume: bool, overwrite: bool, settings: Dict[str, object],
                resume_keys: Sequence[str], defaults: Optional[Dict[str, object]] = None) -> None:
        """Claim the folder: lock it, then check that it may be started (new, empty or an unfinished
        claim), continued (``resume``: its ``config.json`` agrees on ``resume_keys``) or replaced
        (``overwrite``: a fastgeffect run). A refusal leaves the folder as it was found."""
        if self.path.exists() and not self.path.is_dir():
            raise SystemExit(f"--out {self.path} is a file, not a folder")
        if resume and not self.path.exists():
            raise SystemExit(f"--resume: {self.path} does not exist, there is no run to continue (leave out "
                             "--resume to start it)")
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        held = self._lock_fd is not None
        lock_created = self._lock()
        try:
            self._check(resume, overwrite, settings, resume_keys, defaults or {})
        except SystemExit:
            if not held:  # leave the folder as found: no lock file in a folder that is not a run
                self.release(remove_lock=lock_created and not self.is_run())
                if created:
                    with contextlib.suppress(OSError):
                        self.path.rmdir()
            raise
        if not self.is_run():
            (self.path / MARKER).write_text("a fastgeffect run folder (--overwrite may delete it)\n")

    def _lock(self) -> bool:
        """Take the exclusive lock (no wait); True when this call created the lock file.

        ``flock`` locks belong to the open file: the kernel drops them when the process ends, however
        it ends (kill -9 included), so a lock file left by a dead run is not a held lock. The pid in
        the file only names the holder in the message."""
        if self._lock_fd is not None:
            return False
        path = self.path / LOCK
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = path.read_text().strip() or "unknown"
            raise SystemExit(f"{self.path} is in use by another run (pid {holder}, lock {path}): wait for it to "
                             "end, or choose another --out") from None
        except OSError as e:
            os.close(fd)
            raise SystemExit(f"cannot lock {path} ({e}): put --out on a file system with file locks") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return created

    def release(self, remove_lock: bool = False) -> None:
        """Drop the lock (the lock file stays in a run folder: removing it would race a waiting run)."""
        if self._lock_fd is None:
            return
        if remove_lock:
            with contextlib.suppress(OSError):
                (self.path / LOCK).unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _check(self, resume: bool, overwrite: bool, settings: Dict[str, object], resume_keys: Sequence[str],
               defaults: Dict[str, object]) -> None:
        if self.has_config() and not self.is_run():
            raise SystemExit(f"{self.path} has a config.json but is not a fastgeffect run folder (no {MARKER}; "
                             "a model folder?): it is left untouched; choose another --out (a run of an older "
                             f"fastgeffect: create an empty {MARKER} file there to adopt it)")
        if resume:
            if not self.has_config():
                raise SystemExit(f"--resume: {self.path} has no config.json, it is not a run folder")
            try:
                saved = json.loads(self.config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SystemExit(f"--resume: {self.config_path} is not valid JSON ({e}); the run cannot be "
                                 "checked: start it again with --overwrite") from None
            diff = {k: (saved[k], settings.get(k)) for k in resume_keys if k in saved and saved[k] != settings.get(k)}
            if diff:
                raise SystemExit(f"--resume: {self.path} was run with other settings {diff} (saved, now); to continue "
                                 f"it, give {as_flags({k: a for k, (a, _) in diff.items()})}, or start another run "
                                 "(another --out, or --overwrite)")
            # a setting added after the folder's version: that version ran as its default does
            unrecorded = [k for k in resume_keys if k not in saved and settings.get(k) != defaults.get(k)]
            if unrecorded:
                raise SystemExit(f"--resume: {self.path} was started by an older fastgeffect, which had no "
                                 f"{as_flags({k: settings[k] for k in unrecorded})} (it ran as their defaults "
                                 f"{as_flags({k: defaults.get(k) for k in unrecorded})}): give those to continue it, "
                                 "or start another run (another --out, or --overwrite)")
            return
        if overwrite and self.is_run():
            self._clear()
            return
        if self.has_config():
            failed = " that stopped with an error (error.json)" if (self.path / files.ERROR).exists() else ""
            raise SystemExit(f"{self.path} holds another run (config.json){failed}: pass --resume to continue it "
                             "(with the same settings) or --overwrite to replace it")
        others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
        if others and not self.is_run():
            raise SystemExit(f"{self.path} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
                             " and not a fastgeffect run folder: choose another --out")

    def _clear(self) -> None:
        """Delete the run's contents; the folder and its lock file stay (the lock is held)."""
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    # ---- files ----------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        """The run's configuration, written once (a resumed run keeps the first one)."""
        if not self.has_config():
            write_json_main(self.config_path, config)

    def check_sources(self, sources: Dict[str, object]) -> None:
        """On resume: the model folders the run reads (``--model``, ``--retain-model``) must be those
        recorded when it started. Checked before any set-up: the saved state was trained from the old
        weights, and θ_o, the metrics before and UWC's original would otherwise come from the new ones.
        A run folder of an older version recorded none: nothing to compare."""
        saved = read_json(self.config_path).get("sources")
        if saved is None:
            return
        changed = sorted(k for k in set(saved) | set(sources) if saved.get(k) != sources.get(k))
        if changed:
            flags = ", ".join(flag(k) for k in changed)
            raise SystemExit(f"--resume: {flags} changed since {self.path} was started (its files differ from "
                             f"those recorded in {files.CONFIG}): the saved state was trained from the old weights; "
                             "restore that folder, or start a new --out")

    def complete_config(self, extra: dict, must_agree: Sequence[str] = ()) -> None:
        """Add what set-up found (resolved choices, the target's details) to ``config.json``, once:
        keys already there (a resumed run's) are kept, and those in ``must_agree`` must be equal."""
        saved = read_json(self.config_path)
        diff = {k: (saved[k], extra[k]) for k in must_agree if k in saved and saved[k] != extra[k]}
        if diff:
            raise SystemExit(f"--resume: {self.path} was run with other resolved settings {diff} (saved, now): "
                             "resume it on the same kind of device, or pass --device / --bf16 / --fused explicitly")
        if any(k not in saved for k in extra):
            write_json_main(self.config_path, {**saved, **{k: v for k, v in extra.items() if k not in saved}})

    def write_error(self, message: str, step: Optional[int], state: Path) -> None:
        write_json_main(self.path / files.ERROR, {"error": message, "step": step, "state": str(state)})

    def clear_error(self) -> None:
        """A run that finished (or stopped as asked) has no error: a stale ``error.json`` goes."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / files.ERROR).unlink()

    def start_timing(self) -> int:
        """Open this invocation's entry in ``timing.json`` (one per start or resume) and return its
        index. An earlier entry still ``running`` belongs to an invocation that was killed (the folder's
        lock rules out one running now): it is marked ``killed``, keeping the phases it completed."""
        path = self.path / files.TIMING
        entries = read_json(path) if path.exists() else []
        for e in entries:
            if e.get("status") == "running":
                e["status"] = "killed"
        write_json_main(path, entries + [{"resumed": None, "status": "running"}])
        return len(entries)

    def update_timing(self, index: int, entry: Dict[str, object]) -> None:
        path = self.path / files.TIMING
        entries = read_json(path)
        entries[index] = entry
        write_json_main(path, entries)
