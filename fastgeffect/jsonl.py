"""JSON-lines files: one reader, an appender, an atomic writer and the resume-time truncation.

Logs are written line by line, so a crash can leave a torn last line (no trailing newline):
``read_jsonl(..., skip_torn_tail=True)`` drops it and :func:`truncate_jsonl` repairs the file.
Data files (TOFU's) may end without a newline, so the default reads the last line as it is.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, List, Union

PathLike = Union[str, os.PathLike]


def read_jsonl(path: PathLike, *, skip_torn_tail: bool = False) -> List[dict]:
    """Every record of a JSON-lines file, in order; blank lines are skipped and a malformed line is a
    ``ValueError`` naming the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if skip_torn_tail and not line.endswith("\n"):
                break  # torn last line (crash while writing): not a record
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a JSON record ({e.msg})") from None
    return records


def append_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    """Append one line per record and flush (a later crash loses nothing written here)."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()


def write_jsonl_atomic(path: PathLike, records: Iterable[dict]) -> None:
    """Replace a JSON-lines file atomically: a crash leaves either the old or the new file."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_jsonl(path: PathLike, from_step: float = math.inf) -> bool:
    """Drop the records with ``step >= from_step`` and a torn last line from a JSON-lines log (a
    resumed run re-does those steps); the default only repairs a torn line. True when rewritten."""
    if not os.path.exists(path):
        return False
    torn = not Path(path).read_bytes().endswith(b"\n") and os.path.getsize(path) > 0
    records = read_jsonl(path, skip_torn_tail=True)
    kept = [r for r in records if not (isinstance(r.get("step"), (int, float)) and r["step"] >= from_step)]
    if len(kept) == len(records) and not torn:
        return False
    write_jsonl_atomic(path, kept)
    return True
