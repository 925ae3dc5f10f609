"""The one atomic file writer: JSON files, JSON-lines rewrites, the resumable state and the
reference caches all replace their file through :func:`atomic_write`.

The content goes to a temporary file in the target's folder (so the rename is atomic; named per
process, so concurrent writers never mix), is synced to disk and renamed over the target: a crash,
a kill or a full disk leaves the previous file or the new one, never a partial one. (A folder
built in place is another thing: :func:`fastgeffect.embedded.cache.atomic_dir`.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` by what ``write(f)`` writes to the binary file ``f``. Any failure (an error
    or an interruption, in ``write`` or after it) removes the temporary file and propagates,
    leaving the previous ``path``, if any, unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error is the one to report
            tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["atomic_write"]
