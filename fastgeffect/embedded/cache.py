"""On-disk cache of built artefacts: a directory per key, written atomically.

A build writes into a hidden temporary sibling and renames it into place when complete, so an
interrupted build never leaves a half-written directory under the final name. Temporaries of
builders that died on this host are removed on the next build.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterator, Union

ENV_VAR = "FASTGEFFECT_CACHE"


def default_cache_dir() -> Path:
    """``$FASTGEFFECT_CACHE`` or ``~/.cache/fastgeffect``."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "fastgeffect")


def config_hash(obj) -> str:
    """Short stable hash of a JSON-serialisable config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # never probe process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OWNER_FILE = ".owner"


def remove_stale_tmp(parent: Path) -> None:
    """Delete temporaries (``.tmp-*``) whose builder process on this host is gone."""
    for p in parent.glob(".tmp-*"):
        try:
            owner = json.loads((p / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``final``, on any error it is removed.

    If another process completed ``final`` meanwhile, its copy is kept and ours is dropped.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(final.parent)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:12]}-{final.name}"
    tmp.mkdir()
    (tmp / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink()
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_dir(final: Union[str, Path], build: Callable[[Path], None]) -> Path:
    """``final`` if it exists, else ``build(tmp_dir)`` run inside ``atomic_dir``."""
    final = Path(final)
    if not final.is_dir():
        with atomic_dir(final) as tmp:
            build(tmp)
    return final
