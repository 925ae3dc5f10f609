"""Artefacts a run can share with other runs (``--shared-dir``): the reference log-probs, the
retain model's log and the evaluation before unlearning.

Each artefact is computed from a model, data and settings. Its fingerprint, a JSON dict of those
inputs plus the artefact's size and SHA-256, is written next to it as
``<artefact>.fingerprint.json``, after the artefact. An artefact is reused only when the inputs
recorded there equal this run's and its bytes still match: one computed for another model, data or
evaluation size, a half-written or corrupt one, or one without a fingerprint (older versions) is
recomputed, with a note on stderr naming the file and why. ``--overwrite`` recomputes the run's
shared artefacts unconditionally. Runs sharing a folder take turns (an ``fcntl`` lock on
``.shared.lock``, released by the OS when a process dies) so one never reads another's half-made
artefact or records a fingerprint over another's bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, TypeVar, Union

from .. import distributed as dist_
from ..file_digest import file_sha256
from ..jsonfile import JSONFileError, read_json

VERSION = 1  # bump when an artefact computed from the same inputs changes (its meaning or its code)
LOCK_NAME = ".shared.lock"
T = TypeVar("T")
PathLike = Union[str, Path]


def folder_signature(folder: PathLike) -> Dict[str, list]:
    """``{name: [size, mtime_ns]}`` of the files directly in a model or data folder: changes whenever
    a file is rewritten, without reading gigabytes of weights."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")}


def source_identity(source: Optional[PathLike]) -> dict:
    """Where weights, a tokenizer or data come from: a local folder by path and file signature,
    anything else (a hub name; None: the hub's TOFU) by name."""
    if source is not None and Path(source).is_dir():
        return {"path": str(Path(source).resolve()), "files": folder_signature(source)}
    if source is not None and Path(source).is_file():  # a .gguf model
        stat = Path(source).stat()
        return {"path": str(Path(source).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"name": None if source is None else str(source)}


def model_identity(model) -> dict:
    """A loaded Hugging Face model: where it was loaded from, its hub revision, its dtype."""
    return {**source_identity(model.name_or_path), "revision": getattr(model.config, "_commit_hash", None),
            "dtype": str(next(model.parameters()).dtype)}


def run_inputs(target, split: str) -> dict:
    """What every artefact of a run depends on besides its model: tokenizer, data, forget split,
    prompt template and token length (``target``: a :class:`~fastgeffect.driver.targets.Target`)."""
    tok = target.tokenizer
    return {"version": VERSION, "tokenizer": {**source_identity(tok.name_or_path), "size": len(tok)},
            "data": source_identity(target.data_dir), "split": split,
            "template": dataclasses.asdict(target.template), "max_length": target.max_length,
            **({"stride": target.stride} if target.stride is not None else {})}


def reference_fingerprint(target, split: str, name: str, seed: int) -> dict:
    """Reference log-probs of the forget answers (``name`` "forget"), or of their refusals, which
    are drawn per ``seed``."""
    fp = {"artefact": f"ref_logprobs_{name}", "model": model_identity(target.model), **run_inputs(target, split)}
    return fp if name == "forget" else {**fp, "seed": seed}


def retain_log_fingerprint(target, split: str, eval_size: int) -> dict:
    """The forget-set log of the retain twin (embedded, or ``--retain-model``), loaded in the target's dtype."""
    return {"artefact": "retain_model_log", "model": source_identity(target.retain_model_path),
            "dtype": str(next(target.model.parameters()).dtype), **run_inputs(target, split), "eval_size": eval_size}


def before_fingerprint(target, split: str, eval_size: int, retain_log: Optional[PathLike], ps_protocol: str) -> dict:
    """The evaluation before unlearning; Forget Quality in it depends on the retain log's bytes."""
    return {"artefact": "metrics_before", "model": model_identity(target.model), **run_inputs(target, split),
            "eval_size": eval_size, "retain_log": None if retain_log is None else file_sha256(retain_log),
            "ps_protocol": ps_protocol}


def fingerprint_path(artefact: PathLike) -> Path:
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + ".fingerprint.json")


def _canonical(obj) -> object:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def stale_reason(artefact: PathLike, fingerprint: dict) -> Optional[str]:
    """Why ``artefact`` cannot be reused for ``fingerprint`` (None: it can)."""
    artefact, fp_path = Path(artefact), fingerprint_path(artefact)
    if not artefact.exists():
        return "absent"
    if not fp_path.exists():
        return f"it has no {fp_path.name} (written by an older version, or interrupted)"
    try:
        saved = json.loads(fp_path.read_text())
        inputs, size, digest = saved["inputs"], saved["size"], saved["sha256"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"{fp_path} is unreadable ({type(e).__name__}: {e})"
    wanted = _canonical(fingerprint)
    differ = sorted(k for k in set(wanted) | set(inputs) if wanted.get(k) != inputs.get(k))
    if differ:
        return f"it was computed with other {', '.join(differ)} (recorded in {fp_path.name})"
    if artefact.stat().st_size != size or file_sha256(artefact) != digest:
        return f"its bytes differ from those {fp_path.name} recorded (truncated or overwritten)"
    return None


def record(artefact: PathLike, fingerprint: dict) -> None:
    """Write ``artefact``'s fingerprint (main process; call after the artefact is complete)."""
    if dist_.is_main():
        artefact = Path(artefact)
        dist_.write_json_main(fingerprint_path(artefact), {"inputs": _canonical(fingerprint), "size":
                              artefact.stat().st_size, "sha256": file_sha256(artefact)})


@contextlib.contextmanager
def locked(folder: PathLike) -> Iterator[None]:
    """Exclusive use of the artefacts in ``folder`` (waits, with a note, while another run holds it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"note: waiting for another process using the shared artefacts in {folder}", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(artefact: PathLike, fingerprint: dict, compute: Callable[[Path], T], load: Callable[[Path], T], *,
           recompute: bool = False, lock_dir: Optional[PathLike] = None) -> T:
    """``load(artefact)`` when it was computed for ``fingerprint`` and is intact, else
    ``compute(artefact)`` (which writes it on the main process and returns its value) and its
    fingerprint is recorded. ``recompute``: never reuse (``--overwrite``). ``lock_dir``: the folder
    whose lock is held meanwhile (default: the artefact's)."""
    artefact = Path(artefact)
    with locked(lock_dir or artefact.parent):
        reason = "--overwrite" if recompute else stale_reason(artefact, fingerprint)
        if reason is None:
            try:
                return load(artefact)
            except (OSError, ValueError, RuntimeError, EOFError) as e:  # a valid digest but unreadable content
                reason = f"it cannot be read ({type(e).__name__}: {e})"
        if reason != "absent" and dist_.is_main():
            print(f"note: recomputing {artefact}: {reason}", file=sys.stderr, flush=True)
        value = compute(artefact)
        record(artefact, fingerprint)
        return value


def load_json_dict(path: PathLike) -> dict:
    """A JSON object from ``path``; ValueError naming the file otherwise."""
    try:
        obj = read_json(path)
    except JSONFileError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a JSON object")
    return obj
