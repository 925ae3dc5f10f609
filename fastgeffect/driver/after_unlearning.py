"""After unlearning, on the main process: the evaluation of the unlearned model, UWC calibration,
and the attacks (``--attacks``), each a phase of the run's timing, with TensorBoard scalars."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

from .. import distributed as dist_
from .. import run_files as files
from ..attacks import run_attacks
from ..attacks.relearn import STEPS, check_steps
from ..attacks.report import check_attack_args
from ..jsonfile import read_json
from ..scalars import metric_scalars
from ..tensorboard import TensorBoardLog
from .config import attack_names, relearn_steps
from .evaluation import eval_options, evaluate, uwc_metrics
from .run_context import Run


def tensorboard_log(report_to: str, out: Path, step: int) -> Optional[TensorBoardLog]:
    """With ``--report-to tensorboard``, on the main process: event files in ``<out>/tensorboard``
    from ``step`` on (what an interrupted attempt wrote from there is hidden)."""
    if report_to != "tensorboard" or not dist_.is_main():
        return None
    return TensorBoardLog(out / files.TENSORBOARD, purge_step=step)


def evaluate_after(run: Run, model, step: int) -> None:
    """TOFU metrics and PS after unlearning, then (unless ``--no-uwc``) of the UWC-calibrated model,
    then the ``--attacks``."""
    cfg, out, timer = run.cfg, run.out, run.timer
    tb = tensorboard_log(cfg.report_to, out, step)
    t = time.perf_counter()
    after = evaluate(model, run.target, run.sets, out / files.EVAL_AFTER, cfg, run.retain_log, run.privacy)
    dist_.write_json_main(out / files.METRICS_AFTER, after)
    if tb is not None:
        tb.scalars(step, metric_scalars(after, "eval_after"))
    timer.phase("eval_after", t)
    if not cfg.no_uwc:
        t = time.perf_counter()
        before = read_json(out / files.METRICS_BEFORE)
        uwc = uwc_metrics(model, run.target, run.sets, out / files.EVAL_UWC, cfg, run.preset, run.device,
                          before.get("PS-exact retain"), run.retain_log, run.privacy, shared=run.shared)
        dist_.write_json_main(out / files.METRICS_UWC, uwc)
        if tb is not None:
            tb.scalars(step, metric_scalars(uwc, "eval_uwc"))
        timer.phase("uwc", t)
    if attack_names(cfg):
        t = time.perf_counter()
        attacks = run_attack_phase(run, model)
        if tb is not None:
            for k, values in attack_scalars(attacks).items():
                tb.scalars(k, values)
        timer.phase("attacks", t)
    if tb is not None:
        tb.close()


def check_attack_settings(cfg) -> None:
    """What ``--attacks`` would refuse in the settings alone (the relearning steps and learning
    rate), before the run folder is claimed."""
    if "relearn" in attack_names(cfg):
        steps = relearn_steps(cfg)
        try:
            check_steps(STEPS if steps is None else steps)
        except ValueError as e:
            raise SystemExit(f"--relearn-steps: {e}") from None


def check_attack_inputs(run: Run) -> None:
    """What ``--attacks`` would refuse about the forget rows and the settings, found before the
    evaluation before unlearning rather than after unlearning."""
    names = attack_names(run.cfg)
    if names:
        steps = relearn_steps(run.cfg)
        try:
            check_attack_args(run.sets["forget"][: run.cfg.eval_size], attacks=names,
                              **({} if steps is None else {"steps": steps}))
        except ValueError as e:
            raise SystemExit(f"--attacks: {e}") from None


def run_attack_phase(run: Run, model) -> dict:
    """``--attacks`` on the unlearned model over the evaluated forget rows, the retain twin (when
    the run has one) as the relearning control; ``attacks.json`` in the run folder."""
    cfg, target = run.cfg, run.target
    twin = target.load_retain().to(run.device) if target.load_retain is not None and "relearn" in attack_names(
        cfg) else None
    steps = relearn_steps(cfg)
    return run_attacks(model, target.tokenizer, target.template, run.sets["forget"][: cfg.eval_size], out_dir=run.out,
                       attacks=attack_names(cfg), twin=twin, seed=cfg.seed, lr=cfg.relearn_lr or cfg.lr,
                       max_length=eval_options(cfg, target)["max_length"], eval_batch_size=cfg.eval_batch_size,
                       **({} if steps is None else {"steps": steps}))


def attack_scalars(attacks: dict) -> Dict[int, Dict[str, float]]:
    """TensorBoard scalars of ``attacks.json`` by step: the relearning curves at each k (target,
    twin, gap), the quantised models' metrics at step 0."""
    out: Dict[int, Dict[str, float]] = {}
    relearn = attacks.get("relearn") or {}
    for curve in ("target", "twin", "gap"):
        for row in relearn.get(curve) or []:
            out.setdefault(row["step"], {}).update(
                {f"attacks/relearn_{curve}/{m}": float(v) for m, v in row.items() if m in attacks["metrics"]})
    for row in (attacks.get("quantize") or {}).get("rows", []):
        name = "none" if row["bits"] is None else f"{row['bits']}bit_{row['granularity']}"
        out.setdefault(0, {}).update({f"attacks/quantize_{name}/{m}": float(row[m]) for m in attacks["metrics"]})
    return out
