"""JSON-lines files: one reader, the one appender, an atomic rewrite and the resume-time truncation.

Every log line the package appends goes through :func:`json_line`: strict JSON (a NaN or infinite
number is refused, naming it: strict parsers reject ``NaN``/``Infinity``; an undefined value is
written as ``null``), ``json.dumps``' default separators and the record's own key order.
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

from .atomic_file import atomic_write
from .jsonfile import find_non_finite

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


def json_line(record: dict) -> str:
    """One log line of ``record``: strict JSON (see the module docstring) and a newline."""
    try:
        return json.dumps(record, allow_nan=False) + "\n"
    except ValueError:
        where = find_non_finite(record)
        if where is None:  # another problem (a circular reference): json's own message
            raise
        raise ValueError(f"refusing to write {where}: NaN and infinity are not JSON (an undefined value "
                         "must be None)") from None


class JsonlAppender:
    """A JSON-lines log kept open and appended to: each :meth:`append` serialises all its records
    before writing any (a refused record leaves the file as it was), then flushes (and syncs with
    ``fsync=True``), so a later crash loses nothing written here."""

    def __init__(self, path: PathLike, *, fsync: bool = False):
        self.path, self.fsync = os.fspath(path), fsync
        self._f = open(self.path, "a", encoding="utf-8")

    @property
    def closed(self) -> bool:
        return self._f.closed

    def append(self, records: Iterable[dict]) -> None:
        try:
            text = "".join(json_line(r) for r in records)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}; nothing was written") from None
        self._f.write(text)
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    """Append one strict line per record (:class:`JsonlAppender`: all or nothing, flushed)."""
    with JsonlAppender(path) as log:
        log.append(records)


def write_jsonl_atomic(path: PathLike, records: Iterable[dict]) -> None:
    """Replace a JSON-lines file atomically (:func:`~fastgeffect.atomic_file.atomic_write`). It
    rewrites records as they were read (the resume truncation), so a NaN an older version wrote
    is kept rather than refused: appends are where strictness is enforced."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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
