"""``--eval-tasks``: lm-evaluation-harness tasks (WMDP, MMLU, local multiple-choice tasks) on the
model in memory, before and after unlearning, on any benchmark (docs/design.md §5.6).

The task names are checked against lm-eval's task list (plus ``--eval-tasks-include``) before the
run folder is claimed; the task manager built for that check (15-30 s: it scans every task YAML)
is kept for both evaluations. Each writes ``lm_eval_before.json`` / ``lm_eval_after.json``: the
tasks asked, lm-eval's version and its metrics per task; the report shows the accuracies of the
tasks asked beside the run's other metrics (:func:`~fastgeffect.report.logs.read_metrics`).
"""
from __future__ import annotations

import time
from typing import Optional

from .. import distributed as dist_
from .. import run_files as files
from ..eval.lm_eval_tasks import check_tasks, evaluate_tasks, load_task_manager
from .config_checks import eval_tasks
from .run_context import Run


def checked_task_manager(cfg) -> Optional[object]:
    """lm-eval's task manager with ``--eval-tasks-include``, every task of ``--eval-tasks`` checked
    against it (None when the run evaluates no task)."""
    tasks = eval_tasks(cfg)
    if not tasks or cfg.eval != "full":
        return None
    try:
        manager = load_task_manager(cfg.eval_tasks_include)
        check_tasks(list(tasks), manager)
    except (ImportError, OSError, ValueError) as e:
        raise SystemExit(f"--eval-tasks: {e}") from None
    return manager


def tasks_phase(run: Run, model, when: str) -> None:
    """lm-eval's tasks of ``model`` into ``lm_eval_<when>.json`` (main process; ``when``: before or after)."""
    if run.task_manager is None or not dist_.is_main():
        return
    t = time.perf_counter()
    tasks = list(eval_tasks(run.cfg))
    result = evaluate_tasks(model, run.target.tokenizer, tasks, batch_size=run.cfg.eval_batch_size,
                            limit=run.cfg.eval_tasks_limit, task_manager=run.task_manager)
    name = files.LM_EVAL_BEFORE if when == "before" else files.LM_EVAL_AFTER
    dist_.write_json_main(run.out / name, {"requested": tasks, **result})
    run.timer.phase(f"lm_eval_{when}", t)
