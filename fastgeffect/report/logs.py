"""What the report reads of a run folder: the keys each log's records must have, and strict readers
that name the file and line of a record the report cannot use (before anything is written)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from .. import run_files as files
from ..geffect import read_geffect_log
from ..jsonl import read_jsonl

Check = Callable[[object], Optional[str]]  # a JSON value -> what is wrong with it, or None


def _is(types: tuple, what: str) -> Check:
    return lambda v: None if isinstance(v, types) and not isinstance(v, bool) else \
        f"is {json.dumps(v)}, expected {what}"


NUMBER, TEXT, LIST = _is((int, float), "a number"), _is((str,), "a string"), _is((list,), "a list")


def _numbers(names: Optional[Sequence[str]] = None) -> Check:
    """An object of numbers (with at least ``names``)."""
    def check(v):
        if not isinstance(v, dict):
            return f"is {json.dumps(v)}, expected an object of numbers"
        for k in v if names is None else names:
            if NUMBER(v.get(k)) is not None:
                return f"has {k!r}: {json.dumps(v.get(k))}, expected a number"
        return None
    return check


# the keys each log's records must have for the report, with the check of each value
GEFFECT_KEYS = {"step": NUMBER, "risk": TEXT, "total": NUMBER, "groups": _numbers(), "risk_value": NUMBER}
# records of a run with update effects (issue 17); an overflowed step logs null outcomes
UPDATE_KEYS = {"update_total": NUMBER, "update_groups": _numbers(), "lr": NUMBER}
PG_KEYS = {"step": NUMBER, "pg_effect": LIST}
TOKEN_WEIGHT_KEYS = {"index": NUMBER, "epoch": NUMBER, "tokens": LIST, "weights": LIST}
# train_log.jsonl: only the records holding weight statistics or the inverse confidence are plotted
TRAIN_KEYS = {"weights": {"step": NUMBER, "weights": _numbers(("mean", "min", "max"))},
              "inv_conf": {"step": NUMBER, "inv_conf": NUMBER}}


def _line_of(path: Path, index: int) -> int:
    """The line number of record ``index`` of a JSON-lines file (blank lines hold no record)."""
    with open(path, encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    return lines[index] if index < len(lines) else index + 1


def _problem(record, keys: Mapping[str, Check]) -> Optional[str]:
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {json.dumps(record)}"
    for key, check in keys.items():
        if key not in record:
            return f"the record has no {key!r}"
        problem = check(record[key])
        if problem is not None:
            return f"{key!r} {problem}"
    return None


def check_records(path: Path, records: Sequence[dict], keys: Mapping[str, Check],
                  when: Optional[Mapping[str, Mapping[str, Check]]] = None) -> List[dict]:
    """``records`` of ``path`` if each passes ``keys`` (and, for each key of ``when`` it holds,
    that entry's keys); else a ``ValueError`` naming the file, the line and the problem."""
    for i, r in enumerate(records):
        problem = _problem(r, keys)
        for cond, extra in (when or {}).items():
            if problem is None and cond in r:
                problem = _problem(r, extra)
        if problem is not None:
            raise ValueError(f"{path}:{_line_of(path, i)}: {problem}; the report cannot use this record "
                             "(repair or remove the line)")
    return list(records)


def read_log(path: Path, keys: Optional[Mapping[str, Check]] = None,
             when: Optional[Mapping[str, Mapping[str, Check]]] = None) -> List[dict]:
    """The checked records of an optional JSON-lines log of a run (none when absent); a torn last
    line (a crash while writing) is dropped, a malformed line names the file and line."""
    if not path.exists():
        return []
    return check_records(path, read_jsonl(path, skip_torn_tail=True), keys or {}, when)


def read_json(path: Path) -> Optional[dict]:
    """A JSON object file of a run (None when absent); a malformed one names the file."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e}); rerun the step that writes it or remove it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_run_folder(run_dir: Path) -> Path:
    """``run_dir`` if it is a fastgeffect run folder (it holds config.json); else a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder (pass the --out folder of a "
                                "`python -m fastgeffect.run`)")
    if not (run_dir / files.CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a run folder: it has no {files.CONFIG} (pass the --out folder of a "
                         "`python -m fastgeffect.run`)")
    return run_dir


def read_geffects(path: Path) -> List[dict]:
    """The checked records of a run's G-effect log (none when absent)."""
    return check_records(path, read_geffect_log(path), GEFFECT_KEYS, {"update_total": UPDATE_KEYS}) \
        if path.exists() else []


@dataclass(frozen=True)
class RunLogs:
    """Everything the report reads of one run folder, each log checked."""
    config: dict
    geffects: List[dict]
    train_log: List[dict]
    pg_effects: List[dict]
    token_weights: List[dict]
    metrics: Dict[str, Optional[dict]]  # "before", "after", "uwc": None where not measured
    attacks: Optional[dict] = None  # attacks.json (--attacks), None where none ran


def lm_eval_numbers(results: Optional[dict]) -> dict:
    """The accuracies of the tasks asked in an ``lm_eval_*.json`` (``--eval-tasks``) as metrics:
    ``"<task> acc"``, ``"<task> acc_norm"``."""
    if not results:
        return {}
    tasks = results.get("tasks") or {}
    return {f"{task} {m}": tasks[task][m] for task in results.get("requested", tasks) if task in tasks
            for m in ("acc", "acc_norm") if tasks[task].get(m) is not None}


def read_metrics(run_dir: Path, name: str, lm_eval_name: Optional[str] = None) -> Optional[dict]:
    """A run's metrics file ``name`` with the lm-eval accuracies of ``lm_eval_name`` beside them
    (None when neither exists)."""
    metrics = read_json(run_dir / name) or {}
    tasks = lm_eval_numbers(read_json(run_dir / lm_eval_name)) if lm_eval_name else {}
    return {**metrics, **tasks} or None


def read_run(run_dir: Path) -> RunLogs:
    """The logs of run folder ``run_dir`` (checked by ``check_run_folder``), all read and checked
    before the report writes anything."""
    return RunLogs(
        config=read_json(run_dir / files.CONFIG) or {},
        geffects=read_geffects(run_dir / files.GEFFECTS),
        train_log=read_log(run_dir / files.TRAIN_LOG, when=TRAIN_KEYS),
        pg_effects=read_log(run_dir / files.PG_EFFECTS, PG_KEYS),
        token_weights=read_log(run_dir / files.TOKEN_WEIGHTS, TOKEN_WEIGHT_KEYS),
        metrics={"before": read_metrics(run_dir, files.METRICS_BEFORE, files.LM_EVAL_BEFORE),
                 "after": read_metrics(run_dir, files.METRICS_AFTER, files.LM_EVAL_AFTER),
                 "uwc": read_json(run_dir / files.METRICS_UWC)},
        attacks=read_json(run_dir / files.ATTACKS))
