"""The settings of :class:`~.config.RunConfig` that are lists in one flag (``--eval-metrics``,
``--attacks``, ``--relearn-steps``, ``--pg-steps``) read as tuples, and the combinations of
settings that are valid alone but cannot run together (:func:`combination_error`). Pure functions
of a config (or of the ``argparse.Namespace`` its parser gives); ``.config`` re-exports them."""
from __future__ import annotations

from typing import Optional

from ..objectives import OBJECTIVES
from ..training.config import damage_stop_error, guard_error

# what each evaluation computes (--eval-metrics; docs/design.md §5.4): TOFU's metrics, PrivLeak (Min-K%
# AUC forget vs holdout against the twin's), all six membership-inference AUCs, exact memorisation and
# extraction strength; and the attacks run after unlearning (--attacks)
EVAL_METRICS = ("tofu", "privleak", "mia", "memorization")
DEFAULT_EVAL_METRICS = ("tofu", "privleak", "memorization")
ATTACKS = ("relearn", "quantize")
BENCHMARKS = ("tofu", "muse", "wmdp")
WMDP_TASKS = ("wmdp_bio", "wmdp_cyber", "mmlu")  # --benchmark wmdp's default --eval-tasks (hub data)
WMDP_DOMAINS = ("bio", "cyber")
# --muse-forget: MUSE's forget corpus, or its scalability / sustainability forget sets (MUSE-News)
MUSE_FORGET = ("raw/forget",) + tuple(f"{s}/forget_{i}" for s in ("scal", "sust") for i in range(1, 5))
# TOFU's alone: a raw-text run has no authors, no TOFU retain log, and measures its benchmark's own metrics
TOFU_ONLY = (("authors", "--authors"), ("retain_log", "--retain-log"), ("eval_metrics", "--eval-metrics"),
             ("attacks", "--attacks"))


def pg_steps(cfg) -> tuple:
    return tuple(int(s) for s in cfg.pg_steps.split(",") if s.strip())


def _names(value: Optional[str], flag: str, allowed: tuple, extra: tuple = ()) -> tuple:
    names = tuple(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))
    unknown = [n for n in names if n not in allowed + extra]
    if unknown:
        raise ValueError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed + extra)}")
    return names


def eval_metrics(cfg) -> tuple:
    """The metric families each evaluation computes (``--eval-metrics``; ValueError for an unknown name)."""
    if cfg.eval_metrics is None:
        return DEFAULT_EVAL_METRICS
    names = _names(cfg.eval_metrics, "--eval-metrics", EVAL_METRICS, ("all",))
    if not names:
        raise ValueError("--eval-metrics: name at least one of " + ", ".join(EVAL_METRICS + ("all",)))
    return EVAL_METRICS if "all" in names else tuple(n for n in EVAL_METRICS if n in names)


def attack_names(cfg) -> tuple:
    """The attacks run after unlearning (``--attacks``; ValueError for an unknown name)."""
    return _names(cfg.attacks, "--attacks", ATTACKS)


def relearn_steps(cfg) -> Optional[tuple]:
    """``--relearn-steps`` as integers (None: the attack's default; ValueError when not integers)."""
    if cfg.relearn_steps is None:
        return None
    try:
        return tuple(int(k) for k in cfg.relearn_steps.split(","))
    except ValueError:
        raise ValueError(f"--relearn-steps must be comma-separated integers, got {cfg.relearn_steps!r}") from None


def eval_tasks(cfg) -> tuple:
    """The lm-eval tasks each evaluation scores (``--eval-tasks``; ``--benchmark wmdp``: WMDP's and
    MMLU by default); none with ``--eval none``."""
    if cfg.eval == "none":
        return ()
    if cfg.eval_tasks is None:
        return WMDP_TASKS if cfg.benchmark == "wmdp" else ()
    return tuple(dict.fromkeys(t.strip() for t in cfg.eval_tasks.split(",") if t.strip()))


def wmdp_domains(cfg) -> tuple:
    """``--wmdp-domains`` as a tuple (ValueError for an unknown domain)."""
    names = _names(cfg.wmdp_domains, "--wmdp-domains", WMDP_DOMAINS)
    if not names:
        raise ValueError(f"--wmdp-domains: name at least one of {', '.join(WMDP_DOMAINS)}")
    return names


def tasks_error(cfg) -> Optional[str]:
    if cfg.eval_tasks is not None and not eval_tasks(cfg):
        return ("--eval-tasks needs --eval full (it scores the model)" if cfg.eval == "none"
                else f"--eval-tasks: no task named in {cfg.eval_tasks!r}")
    if (cfg.eval_tasks_include or cfg.eval_tasks_limit) and not eval_tasks(cfg):
        return "--eval-tasks-include and --eval-tasks-limit need --eval-tasks"
    return None


def benchmark_error(cfg) -> Optional[str]:
    """A raw-text benchmark (muse, wmdp) with what only a TOFU run has, or without the data it needs."""
    if cfg.muse_forget != "raw/forget" and cfg.benchmark != "muse":
        return "--muse-forget needs --benchmark muse"
    if cfg.benchmark == "tofu":
        return "--stride needs --benchmark muse or wmdp (TOFU items are question-answer pairs)" if cfg.stride else None
    flag = f"--benchmark {cfg.benchmark}"
    given = [name for attr, name in TOFU_ONLY if getattr(cfg, attr)]
    if given:
        return f"{given[0]} is TOFU's: {flag} measures {'MUSE' if cfg.benchmark == 'muse' else 'WMDP'}'s own metrics"
    if OBJECTIVES[cfg.method].needs_refusals:
        return (f"--method {cfg.method} answers questions with refusals; {flag} unlearns raw text, which has no "
                "questions")
    if cfg.benchmark == "wmdp":
        if not (cfg.model and cfg.data_dir):
            return f"{flag} needs --model and --data-dir, a folder of WMDP's JSON-lines corpora"
        try:
            wmdp_domains(cfg)
        except ValueError as e:
            return str(e)
        return None
    if cfg.model and not cfg.data_dir:
        return ("--benchmark muse with --model needs --data-dir, a MUSE folder (e.g. huggingface-cli download "
                "muse-bench/MUSE-News --repo-type dataset --local-dir D)")
    if cfg.data_dir and not cfg.model:
        return ("without --model, --benchmark muse runs the offline MUSE-style default on its own generated articles; "
                "--data-dir needs --model")
    return None


def uwc_rows_error(cfg, ps_protocol: Optional[str]) -> Optional[str]:
    """``--uwc-rows heldout`` without UWC, or under a PS protocol whose rows are not the first
    ``--eval-size`` of the evaluation sets (``ps_protocol``: as given, or resolved)."""
    if cfg.uwc_rows != "heldout":
        return None
    if cfg.no_uwc or cfg.eval == "none" or cfg.benchmark != "tofu":
        return "--uwc-rows heldout needs UWC calibration: --benchmark tofu with --eval full and without --no-uwc"
    if ps_protocol not in (None, "clean"):
        return (f"--uwc-rows heldout needs --ps-protocol clean: {ps_protocol} draws its own retain rows, so the rows "
                "after the reported ones are not defined apart from them")
    return None


def combination_error(cfg) -> Optional[str]:
    """Settings that are valid alone but not together."""
    error = benchmark_error(cfg) or tasks_error(cfg) or uwc_rows_error(cfg, cfg.ps_protocol)
    if error:
        return error
    if cfg.template is not None and cfg.model is None:
        return "--template needs --model (the embedded target has its own format)"
    if cfg.retain_model is not None and cfg.model is None:
        return "--retain-model needs --model (the embedded target trains and evaluates its own retain twin)"
    if cfg.target_seed is not None and cfg.model is not None:
        return "--target-seed needs the embedded target (--model is a target of its own)"
    if cfg.retain_model is not None and cfg.retain_log is not None:
        return "--retain-model and --retain-log both give Forget Quality's retain log: pass one of them"
    if cfg.lora is not None and cfg.fsdp2:
        return "--lora with --fsdp2 is not supported: shard LoRA unlearning with DDP (torchrun without --fsdp2)"
    if cfg.batch_size % cfg.grad_accum:
        return (f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}: every "
                "micro-batch takes batch-size / grad-accum samples")
    stop_error = damage_stop_error(cfg.stop_at_retain_damage, cfg.geffect_every, cfg.update_effects == "on") or \
        guard_error(cfg.geffect_guard, cfg.regularizer or OBJECTIVES[cfg.method].default_regularizer)
    if stop_error:
        return stop_error
    try:
        eval_metrics(cfg), attack_names(cfg), relearn_steps(cfg)
    except ValueError as e:
        return str(e)
    if "relearn" not in attack_names(cfg) and (cfg.relearn_steps is not None or cfg.relearn_lr is not None):
        return "--relearn-steps and --relearn-lr need --attacks relearn"
    if cfg.eval == "none" and (cfg.eval_metrics is not None or cfg.attacks):
        return "--eval-metrics and --attacks need --eval full (they evaluate the model)"
    if cfg.second_order and (cfg.geffect_every == 0 or cfg.update_effects == "off"):
        return ("--second-order needs the G-effects (--geffect-every > 0) with --update-effects on: it is a term of "
                "the real step's predicted risk change")
    try:
        steps = pg_steps(cfg)
    except ValueError:
        return f"--pg-steps must be comma-separated integers (-1: the last step), got {cfg.pg_steps!r}"
    if any(s < -1 for s in steps):
        return f"--pg-steps: steps are >= 0, or -1 for the last step, got {cfg.pg_steps!r}"
    return None
