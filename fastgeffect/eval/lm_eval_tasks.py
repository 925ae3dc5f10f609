"""Benchmarks of lm-evaluation-harness (WMDP, MMLU, ...) on the model already in memory.

The model is wrapped as lm-eval's HF model object (``HFLM(pretrained=model, tokenizer=...)``, no
reload) and scored by ``lm_eval.simple_evaluate``: the harness' prompts, its log-likelihood of each
choice and its metrics, so numbers compare with papers and open-unlearning. ``wmdp_bio``,
``wmdp_cyber`` and ``mmlu`` download their data from the hub; a local task (a YAML file in
``include_path`` with ``dataset_path: json`` and ``data_files``) needs no network.

lm-eval is an optional dependency (``pip install fastgeffect[lmeval]``), imported only here and
only when a function runs. Task names are checked against lm-eval's task list before anything is
evaluated; building that list scans every task YAML (~15-30 s), so a caller that checks first and
evaluates twice (before/after unlearning) builds it once with :func:`load_task_manager` and passes
it on.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch

PathOrPaths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

INSTALL_HINT = "pip install 'fastgeffect[lmeval]' (or: pip install lm-eval==0.4.13)"
TASK_LIST_HINT = ("the names lm-eval knows are listed by `lm-eval ls tasks` or "
                  "`python -c 'from lm_eval.tasks import TaskManager; print(TaskManager().all_tasks)'`")


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"evaluating lm-eval tasks needs the lm-eval package: {INSTALL_HINT}") from e
    return lm_eval


def lm_eval_version() -> str:
    return _lm_eval().__version__


def load_task_manager(include_path: Optional[PathOrPaths] = None, *, include_defaults: bool = True):
    """lm-eval's ``TaskManager``: its built-in tasks (unless ``include_defaults=False``) plus the
    task YAMLs under ``include_path`` (a folder or a list of folders; a missing one is an error)."""
    paths = None
    if include_path is not None:
        paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        missing = [os.fspath(p) for p in paths if not os.path.isdir(p)]
        if missing:
            raise FileNotFoundError(f"include_path: no such folder {', '.join(missing)}")
        paths = [os.fspath(p) for p in paths]
    _lm_eval()
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def _check_task_list(tasks) -> None:
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")


def check_tasks(tasks: Sequence[str], task_manager) -> None:
    """A ``ValueError`` naming every task (or group, or tag) ``task_manager`` does not know, with the
    closest known names, before anything runs."""
    _check_task_list(tasks)
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, known, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {'; '.join(hints)}: not in "
                         f"lm-eval {lm_eval_version()}'s task list nor in include_path; {TASK_LIST_HINT}")


def _check_counts(batch_size, limit, num_fewshot) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and limit >= 1)):
        raise ValueError(f"limit must be a positive number of examples per task or a fraction in (0, 1), "
                         f"got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")


@contextlib.contextmanager
def _caller_state_kept(model, tokenizer):
    """``simple_evaluate`` seeds python, numpy and torch globally, ``HFLM`` puts the model in eval
    mode and gives a tokenizer without a pad token its unk or EOS token: a run that evaluates
    between training steps must draw the same numbers and pad the same way afterwards."""
    py_state, np_state, training = random.getstate(), np.random.get_state(), model.training
    pad_token = tokenizer.pad_token
    devices = [model.device] if getattr(model, "device", torch.device("cpu")).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train(training)
        tokenizer.pad_token = pad_token


def task_metrics(task_results: dict) -> dict:
    """One task's entry of lm-eval's ``results["results"]`` without the ``,filter`` suffix of the
    metrics of the ``none`` filter (``acc``, ``acc_stderr``, ``acc_norm``, ...); other filters keep
    ``metric,filter``. A stderr lm-eval could not compute (``"N/A"``) becomes None."""
    out = {}
    for key, value in task_results.items():
        if "," not in key:
            continue  # "alias", "name", ...
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else key
        out[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], *, batch_size: int, limit: Union[int, float, None] = None,
                   include_path: Optional[PathOrPaths] = None, num_fewshot: Optional[int] = None,
                   task_manager=None) -> dict:
    """Score ``model`` (a loaded ``transformers`` causal LM, not reloaded) on lm-eval ``tasks``.

    ``tasks`` are lm-eval task, group or tag names (``["wmdp_bio", "wmdp_cyber", "mmlu"]``) or
    names of YAML tasks under ``include_path``; an unknown name is a ``ValueError`` before anything
    runs. ``limit`` caps the examples per task (a fraction in (0, 1) takes that share; for quick
    checks only: lm-eval's numbers are on full tasks). ``num_fewshot`` overrides a task's own count,
    except where its config fixes 0 (WMDP's does: lm-eval keeps 0); without it a task that sets no
    count (MMLU) is zero-shot. ``task_manager`` (from
    :func:`load_task_manager`) replaces ``include_path``.

    Returns ``{"lm_eval_version": str, "tasks": {name: {"acc", "acc_stderr", "acc_norm",
    "acc_norm_stderr", ..., "n_samples"}}}`` with an entry per task and per group lm-eval reported
    (a group such as ``mmlu`` has its aggregate and its subtasks'); metrics are lm-eval's own, with
    the ``,none`` filter suffix dropped (:func:`task_metrics`). The caller's random states, the
    model's train/eval mode and the tokenizer's pad token are as they were.
    """
    _check_task_list(tasks)
    _check_counts(batch_size, limit, num_fewshot)
    if task_manager is None:
        task_manager = load_task_manager(include_path)
    elif include_path is not None:
        raise ValueError("give include_path to load_task_manager() when passing a task_manager, not both")
    tasks = list(tasks)
    check_tasks(tasks, task_manager)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    with _caller_state_kept(model, tokenizer):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
                                          limit=limit, task_manager=task_manager, log_samples=False)
    out = {}
    for name, entry in {**results.get("results", {}), **results.get("groups", {})}.items():
        out[name] = task_metrics(entry)
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        if n is not None:
            out[name]["n_samples"] = int(n)
    return {"lm_eval_version": lm_eval.__version__, "tasks": out}
