"""Whole JSON files (configs, metrics, evaluation logs): an atomic, strict writer and a reader whose
errors name the file.

* :func:`write_json` replaces the file atomically (:func:`fastgeffect.atomic_file.atomic_write`:
  a crash, a kill or a full disk leaves the previous file or the new one, never a partial one).
  It writes strict JSON: a NaN or infinite number is refused (``ValueError`` naming
  the file and the key), since strict parsers reject ``NaN``/``Infinity``; write ``None`` where
  a value is undefined.
* :func:`read_json` raises :class:`JSONFileError` (a ``ValueError``) naming the file when it is
  empty, not UTF-8 or not JSON (a partial write of an older version, a torn copy), with the fix.

No torch here: ``python -m fastgeffect.eval aggregate`` uses it and stays instant.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Union

from .atomic_file import atomic_write

PathLike = Union[str, os.PathLike]


class JSONFileError(ValueError):
    """A JSON file that cannot be read; ``path`` is the file."""

    def __init__(self, path: PathLike, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}; it may be a partial write of an interrupted run or a full "
                         "disk: delete it and rerun to recompute it")


def read_json(path: PathLike):
    """The content of a JSON file. ``FileNotFoundError`` when it is missing, :class:`JSONFileError`
    when it is empty, not UTF-8 or not valid JSON. ``NaN``/``Infinity`` are read (older files and
    other tools write them); callers that need finite numbers check them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JSONFileError(path, f"is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise JSONFileError(path, "is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONFileError(path, f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def find_non_finite(obj, where: str = "") -> Optional[str]:
    """Where the first NaN/infinite float of ``obj`` is (``"'key' → 3"``), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the top level'} is {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = find_non_finite(v, f"{where} → {k!r}" if where else repr(k))
        if found:
            return found
    return None


def write_json(path: PathLike, obj, *, indent: Optional[int] = 2) -> Path:
    """Replace ``path`` by ``obj`` as strict JSON, atomically (see the module docstring).
    Objects JSON does not know (paths, dtypes) are written as their ``str``."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=str)
    except ValueError:
        raise ValueError(f"{path}: refusing to write {find_non_finite(obj)}: NaN and infinity are not JSON "
                         "(an undefined value must be None)") from None
    try:
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path} ({e.strerror}); the previous file, if any, is "
                               "unchanged") from e
    return path


__all__ = ["JSONFileError", "read_json", "write_json"]
