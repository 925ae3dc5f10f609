"""JSON-lines log of G-effect measurements: one line per (step, risk), flushed as it goes.

Resume-safe: a torn last line left by a crash is dropped when the file is opened, and the first
step logged after (re)opening drops every earlier record with a step >= that step, so a run
restarted from a checkpoint re-measures those steps without duplicating or losing lines.
:func:`read_geffect_log` also keeps only the last record per (step, risk).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from ..jsonl import JsonlAppender, read_jsonl, truncate_jsonl
from ..weight_stats import weight_stats
from .engine import TIED_SPLIT_FIELDS, GEffectResult


def read_geffect_log(path: Union[str, os.PathLike], dedupe: bool = True) -> List[dict]:
    """All records of a G-effect log in order; ``dedupe`` keeps the last record per (step, risk)."""
    records = read_jsonl(path, skip_torn_tail=True)
    if not dedupe:
        return records
    last: Dict[Any, int] = {}
    for i, r in enumerate(records):
        last[(r.get("step"), r.get("risk"))] = i
    keep = sorted(last.values())
    return [records[i] for i in keep]


# the fields a record's measurement fills
MEASURED = ("total", "groups", "risk_value", "weights", "update_total", "update_groups", "update_change",
            "update_change_groups") + TIED_SPLIT_FIELDS


def _check_measured(record: dict) -> None:
    """A NaN/inf measurement is a wrong number: refused with the step and risk it belongs to (the
    appender refuses any other non-finite field; an undefined value is written as None)."""
    try:
        json.dumps({k: record[k] for k in MEASURED if k in record}, allow_nan=False)
    except ValueError:
        raise ValueError(f"G-effect record of step {record['step']}, risk {record['risk']!r} holds NaN or inf "
                         f"in {', '.join(k for k in MEASURED if k in record)}: {record}; nothing was written") from None


class GEffectLogger:
    """Appends one JSON line per measurement to ``path``::

        {"step": 12, "risk": "unlearn", "total": -3.1, "groups": {...}, "risk_value": 2.4,
         "tied": false, "weights": {"mean": ..., ...}, ...extra}

    plus ``update_total`` / ``update_groups`` and ``update_change`` / ``update_change_groups`` when the
    result holds update effects, the tied weight's split (``tied_input``, ``tied_lm_head`` and
    their update-effect twins) when the model ties its embedding and LM head, and the
    ``per_risk`` fields of that risk (e.g. its value after the step).

    ``resume_step``: drop records with step >= it right away (otherwise this happens at the first
    :meth:`log` call, with that call's step).
    """

    def __init__(self, path: Union[str, os.PathLike], resume_step: Optional[int] = None, fsync: bool = False):
        self.path = os.fspath(path)
        self.fsync = fsync
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._truncated = False
        truncate_jsonl(self.path)  # a torn last line from a crash
        if resume_step is not None:
            self._truncate_from(int(resume_step))
        self._log = JsonlAppender(self.path, fsync=fsync)

    def _truncate_from(self, step: int) -> None:
        self._truncated = True
        log = getattr(self, "_log", None)
        reopen = log is not None and not log.closed
        if reopen:
            log.close()
        truncate_jsonl(self.path, step)
        if reopen:
            self._log = JsonlAppender(self.path, fsync=self.fsync)

    def log(self, step: int, results: Union[Mapping[str, GEffectResult], GEffectResult], risk: Optional[str] = None,
            *, weights: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
            stats: Optional[Mapping[str, float]] = None, per_risk: Optional[Mapping[str, Mapping]] = None,
            **extra) -> List[dict]:
        """Write one line per risk of ``results`` (the dict from ``GEffect.measure``, or one result
        with its ``risk`` name). ``weights``/``mask`` (or ready ``stats``) add objective weight statistics; ``extra``
        entries (JSON-serialisable: epoch, objective name, loss terms, ...) go into every line,
        ``per_risk[name]`` entries into that risk's line only. A NaN or inf measurement (total,
        groups, risk value, weight statistics, update effects) is refused, naming its step and risk,
        and so is a NaN or inf ``extra`` field (strict JSON: pass None for an undefined value); then
        no line of the call is written."""
        if self._log.closed:
            raise ValueError("the logger is closed")
        if isinstance(results, GEffectResult):
            if risk is None:
                raise ValueError("logging a single GEffectResult needs its risk name (risk=...)")
            results = {risk: results}
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not self._truncated:
            self._truncate_from(step)
        if stats is None and weights is not None:
            stats = weight_stats(weights, mask)
        lines = []
        for name, res in results.items():
            if not isinstance(res, GEffectResult):
                raise TypeError(f"result for risk {name!r} is a {type(res).__name__}, not a GEffectResult")
            rec = {"step": step, "risk": str(name), "total": res.total, "groups": dict(res.groups),
                   "risk_value": res.risk, "tied": res.tied}
            if res.update_groups is not None:
                rec.update(update_total=res.update_total, update_groups=dict(res.update_groups),
                           update_change=res.update_change, update_change_groups=dict(res.update_change_groups))
            for k in TIED_SPLIT_FIELDS:
                if getattr(res, k) is not None:
                    rec[k] = getattr(res, k)
            if stats is not None:
                rec["weights"] = dict(stats)
            for k, v in {**extra, **(per_risk or {}).get(name, {})}.items():
                if k in rec:
                    raise ValueError(f"extra field {k!r} collides with a standard field")
                rec[k] = v
            lines.append(rec)
        for r in lines:
            _check_measured(r)
        self._log.append(lines)  # every line serialised before any is written
        return lines

    def close(self) -> None:
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "GEffectLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["GEffectLogger", "read_geffect_log"]
