"""``report compare``: one metrics table and overlaid cumulative G-effect curves of several runs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .. import run_files as files
from .logs import check_run_folder, read_geffects, read_json
from .plots import plot_compare
from .tables import compare_updates, metrics_table


def compare(run_dirs: Sequence[Path], out_dir: Optional[Path] = None) -> Path:
    """One metrics table and overlaid total G-effect curves of several runs, in ``out_dir``
    (default: a compare folder beside the first run); returns the table's path. Every run's logs
    are read and checked before anything is written."""
    run_dirs = [check_run_folder(d) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir else run_dirs[0].parent / files.COMPARE
    label = {d: f"{(read_json(d / files.CONFIG) or {}).get('method', d.name)} ({d.name})" for d in run_dirs}
    table = metrics_table({label[d]: read_json(d / files.METRICS_AFTER) for d in run_dirs})
    runs = {label[d]: read_geffects(d / files.GEFFECTS) for d in run_dirs}
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_compare([(label[d], runs[label[d]]) for d in run_dirs], out_dir / files.COMPARE_PLOT)
    out = out_dir / files.COMPARE_SUMMARY
    out.write_text(f"# Comparison (after unlearning)\n\n{table}\n![curves]({files.COMPARE_PLOT})\n"
                   + compare_updates(runs), encoding="utf-8")
    return out
