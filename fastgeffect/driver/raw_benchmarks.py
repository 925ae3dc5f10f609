"""The raw-text benchmarks (docs/design.md §5.6): ``--benchmark muse`` (a MUSE folder, or the offline
MUSE-style default, and MUSE's metrics before and after) and ``--benchmark wmdp`` (WMDP's forget and
retain corpora; lm-eval's tasks, :mod:`.lm_eval_phase`, are its metrics). The loop, the objectives,
the G-effects, the update effects, the plots and the summary are the TOFU run's; what differs is here:

- the target: the offline MUSE-style default (:func:`~fastgeffect.embedded.news_build.build_embedded_news`),
  or ``--model`` with ``--data-dir`` (and, for MUSE, ``--retain-model`` the retrained model);
- the data: forget and retain corpora in windows of ``--max-length`` tokens ``--stride`` apart
  (:mod:`~fastgeffect.data.raw_unlearning`);
- the evaluation: :func:`~fastgeffect.eval.muse.evaluate_muse` (verbmem_f, knowmem_f, knowmem_r,
  privleak) on ``--eval-size`` rows of each set; there is no PS and no UWC (TOFU's).
"""
from __future__ import annotations

import time
from typing import Optional

from .. import distributed as dist_
from .. import run_files as files
from ..data.muse import load_muse
from ..data.raw_unlearning import load_raw_unlearning_data, wmdp_raw
from ..data.unlearning import UnlearningData
from ..data.wmdp import load_wmdp_corpora
from ..eval.muse import evaluate_muse
from ..scalars import metric_scalars
from .after_unlearning import tensorboard_log
from .config_checks import wmdp_domains
from .inputs import check_model, check_shared_dir
from .run_context import Run


def check_raw_inputs(cfg) -> None:
    """The paths a raw-text run names: ``--model`` and ``--retain-model``, ``--shared-dir``, and the
    MUSE folder or WMDP corpora of ``--data-dir`` (every file read and every row checked), before
    the folder is claimed."""
    check_shared_dir(cfg.shared_dir, cfg.out)
    for flag, spec in (("--model", cfg.model), ("--retain-model", cfg.retain_model)):
        if spec is not None:
            check_model(spec, flag)
    if cfg.benchmark == "wmdp":
        try:
            load_wmdp_corpora(cfg.data_dir, wmdp_domains(cfg))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--data-dir: {e}") from None
    elif cfg.data_dir is not None:
        try:
            data = load_muse(cfg.data_dir)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--data-dir: {e}") from None
        subset, split = cfg.muse_forget.split("/")
        if not getattr(data, subset).get(split):
            raise SystemExit(f"--muse-forget {cfg.muse_forget}: {cfg.data_dir} has no {subset}/{split} split "
                             "(the scalability and sustainability sets are MUSE-News')")
        if not data.raw.get("retain2"):
            raise SystemExit(f"--data-dir {cfg.data_dir}: raw/retain2 is missing; the retaining G-effects measure the "
                             "retain data the unlearning does not train on (MUSE's retain2)")


def raw_unlearning_data(run: Run) -> UnlearningData:
    """The forget and retain corpora of the run's MUSE folder or WMDP corpora as training windows."""
    cfg, target = run.cfg, run.target
    if cfg.benchmark == "wmdp":
        corpora = load_wmdp_corpora(target.data_dir, wmdp_domains(cfg))
        raw = wmdp_raw(corpora.forget_texts, corpora.retain_texts, cfg.seed)
    else:
        run.muse = load_muse(target.data_dir)
        subset, split = cfg.muse_forget.split("/")  # raw/forget, or a scalability / sustainability set
        raw = {**run.muse.raw, "forget": getattr(run.muse, subset)[split]}
    return load_raw_unlearning_data(raw, target.tokenizer, target.max_length, target.stride, seed=cfg.seed)


def muse_metrics(run: Run, model) -> dict:
    """MUSE's metrics of ``model``, the retrained twin (when the run has one) as privleak's reference."""
    cfg, target = run.cfg, run.target
    twin = target.load_retain().to(run.device) if target.load_retain is not None else None
    metrics = evaluate_muse(model, target.tokenizer, run.muse, retain_model=twin, batch_size=cfg.eval_batch_size,
                            max_rows=cfg.eval_size)
    return {"benchmark": "muse", **metrics}


def muse_before(run: Run) -> Optional[dict]:
    """Main process, with ``--eval full``: MUSE's metrics of the target before unlearning."""
    if run.muse is None or run.cfg.eval != "full" or not dist_.is_main():
        return None
    t = time.perf_counter()
    before = muse_metrics(run, run.target.model)
    dist_.write_json_main(run.out / files.METRICS_BEFORE, before)
    run.folder.complete_config({"privleak": f"privleak's reference: {before['privleak_reference']}"})
    run.timer.phase("eval_before", t)
    return before


def muse_after(run: Run, model, step: int) -> None:
    """MUSE's metrics of the unlearned model after ``step`` steps (main process), also as TensorBoard
    scalars with ``--report-to tensorboard``."""
    t = time.perf_counter()
    after = muse_metrics(run, model)
    dist_.write_json_main(run.out / files.METRICS_AFTER, after)
    tb = tensorboard_log(run.cfg.report_to, run.out, step)
    if tb is not None:
        tb.scalars(step, metric_scalars(after, "eval_after"))
        tb.close()
    run.timer.phase("eval_after", t)
