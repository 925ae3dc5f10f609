"""``report show``: the plots, the token-weight page and ``summary.md`` of one run folder."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .. import run_files as files
from ..eval.aggregate import FILES
from . import plots
from .ks_resolution import resolution_note
from .logs import RunLogs, check_run_folder, read_json, read_run
from .tables import run_name, summary_markdown
from .token_heatmap import token_weights_html


def _in_plots(file: str) -> str:
    """The path of plot ``file`` relative to the run folder, as the summary links it."""
    return f"{files.PLOTS}/{file}"


def draw_plots(run_dir: Path, run: RunLogs, name: str) -> List[str]:
    """Draw every figure ``run`` has data for into ``run_dir``'s plots folder, and its token-weight
    page; returns the paths written, relative to ``run_dir``, in the order the summary lists them."""
    folder = run_dir / files.PLOTS
    folder.mkdir(exist_ok=True)
    records, made = run.geffects, []
    if records:
        plots.plot_geffects(records, folder / files.PLOT_GEFFECTS, f"G-effects of {name}")
        plots.plot_risks(records, folder / files.PLOT_RISKS, f"risks during {name}")
        made.append(_in_plots(files.PLOT_GEFFECTS))
        made.append(_in_plots(files.PLOT_RISKS))
    if any("update_total" in r for r in records):
        plots.plot_updates(records, folder / files.PLOT_UPDATES, f"predicted and realised risk changes of {name}")
        made.append(_in_plots(files.PLOT_UPDATES))
    if plots.plot_weights(run.train_log, folder / files.PLOT_WEIGHTS, f"objective weights of {name}"):
        made.append(_in_plots(files.PLOT_WEIGHTS))
    if plots.plot_pg_effects(run.pg_effects, folder / files.PLOT_PG_EFFECTS, f"PG-effects of {name}"):
        made.append(_in_plots(files.PLOT_PG_EFFECTS))
    if token_weights_html(run.token_weights, run_dir / files.TOKEN_WEIGHTS_HTML,
                          f"token weights of {name} across epochs"):
        made.append(files.TOKEN_WEIGHTS_HTML)
    if (run_dir / files.ATTACKS_PLOT).exists():  # drawn by the relearning attack itself
        made.append(files.ATTACKS_PLOT)
    return made


FORGET_LOG = next(name for name, part in FILES.items() if part == "Forget")  # TOFU's per-sample forget log


def forget_rows(run_dir: Path) -> Optional[int]:
    """How many forget rows Forget Quality's KS test compared: the rows of the run's forget log (after
    unlearning, else calibrated, else before); None where no evaluation wrote one."""
    for folder in (files.EVAL_AFTER, files.EVAL_UWC, files.EVAL_BEFORE):
        log = read_json(run_dir / folder / FORGET_LOG)
        if log and isinstance(log.get("avg_paraphrased_loss"), dict):
            return len(log["avg_paraphrased_loss"])
    return None


def ks_note(run_dir: Path, run: RunLogs) -> Optional[str]:
    """:func:`.ks_resolution.resolution_note` where the run reports Forget Quality: the retain twin's
    log has as many rows as the model's (eval.aggregate refuses others), so m = n."""
    if not any(m and m.get("Forget Quality") is not None for m in run.metrics.values()):
        return None
    n = forget_rows(run_dir)
    return None if n is None else resolution_note(n, n)


def write_report(run_dir: Path) -> Path:
    """Plots and ``summary.md`` of one run folder; returns the summary's path. Every log is read
    and checked before anything is written."""
    run_dir = check_run_folder(run_dir)
    run = read_run(run_dir)
    name = run_name(run.config, run_dir.name)
    made = draw_plots(run_dir, run, name)
    out = run_dir / files.SUMMARY
    out.write_text(summary_markdown(name, run.config, run.metrics, run.geffects, made, run.attacks,
                                    ks_note(run_dir, run)), encoding="utf-8")
    return out
