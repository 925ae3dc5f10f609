"""``report compare``: one metrics table and overlaid cumulative G-effect curves of several runs; with
``ci``, intervals over seeds per setting and paired differences between settings (:mod:`.ci_tables`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .. import run_files as files
from ..atomic_file import atomic_write
from .ci_tables import ci_markdown, ci_record
from .logs import check_run_folder, read_geffects, read_json, read_metrics
from .plots import plot_compare
from .seed_groups import differences_text, differing, finite_metrics, group_runs, identity
from .tables import compare_updates, metrics_table

# settings under which two runs' metrics and G-effects mean different things (model, data, what and how
# evaluation measures); a run folder's config.json records each
COMPARABLE = ("model", "size", "data_dir", "authors", "split", "preset", "template", "max_length_resolved",
              "eval_size", "eval_max_length", "gen_mode", "ps_protocol", "truth_ratio_agg")


def distinct_labels(run_dirs: Sequence[Path]) -> List[str]:
    """Each folder's name, with as many parent folders as it takes for no two runs to share one
    (``a/tnpo`` and ``b/tnpo``), so that no run hides another in the table or the plot."""
    for depth in range(1, max(len(d.parts) for d in run_dirs) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in run_dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def differing_settings(configs: Mapping[str, Mapping]) -> Dict[str, Dict[str, object]]:
    """The :data:`COMPARABLE` settings (recorded by every run) whose values differ: name -> run -> value."""
    keys = [k for k in COMPARABLE if all(k in c for c in configs.values())]
    return {k: {run: c[k] for run, c in configs.items()} for k in keys
            if len({json.dumps(c[k], sort_keys=True) for c in configs.values()}) > 1}


def _differences_text(diff: Mapping[str, Mapping[str, object]]) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{run} {v!r}" for run, v in values.items()) for k, values in diff.items())


def seed_intervals(run_dirs: Sequence[Path], label: Mapping[Path, str], configs: Mapping[Path, Mapping],
                   allow_different: bool) -> Tuple[dict, str]:
    """``--ci``: the JSON record and the note of :func:`.ci_tables.ci_record` for runs grouped by setting
    (:func:`.seed_groups.group_runs`). Settings that differ in more than the setting (epochs, data, the
    target, ...) are refused, naming it, unless ``allow_different`` (then the note names it)."""
    by_label = {label[d]: configs[d] for d in run_dirs}
    groups = group_runs(by_label)
    firsts = {g.name: by_label[next(iter(g.runs.values()))] for g in groups}
    diff = differing(firsts, identity)
    if diff and not allow_different:
        raise ValueError(f"the settings compared differ in more than the setting ({differences_text(diff)}): their "
                         "paired differences would mix both; compare settings made alike, or pass --allow-different")
    metrics = {label[d]: finite_metrics(("", read_metrics(d, files.METRICS_AFTER, files.LM_EVAL_AFTER)),
                                        ("uwc ", read_json(d / files.METRICS_UWC))) for d in run_dirs}
    note = f"**Settings made under other conditions too**: {differences_text(diff)}.\n\n" if diff else ""
    return ci_record(groups, metrics), note


def compare(run_dirs: Sequence[Path], out_dir: Optional[Path] = None, allow_different: bool = False,
            ci: bool = False) -> Path:
    """One metrics table and overlaid total G-effect curves of several runs, in ``out_dir``
    (default: a compare folder beside the first run); returns the table's path. Every run's logs
    are read and checked before anything is written. Runs whose :data:`COMPARABLE` settings differ
    are refused, naming them, unless ``allow_different`` (then the summary names them). ``ci``: the
    runs are grouped by setting, one per seed, and the summary adds intervals over seeds and paired
    differences between settings (also written as JSON)."""
    run_dirs = [check_run_folder(d) for d in run_dirs]
    same = [d for i, d in enumerate(run_dirs) if d.resolve() in {e.resolve() for e in run_dirs[:i]}]
    if same:
        raise ValueError(f"{same[0]} is given twice: compare different runs")
    out_dir = Path(out_dir) if out_dir else run_dirs[0].parent / files.COMPARE
    configs = {d: read_json(d / files.CONFIG) or {} for d in run_dirs}
    label = {d: f"{configs[d].get('method', d.name)} ({name})" for d, name in zip(run_dirs, distinct_labels(run_dirs))}
    diff = differing_settings({label[d]: configs[d] for d in run_dirs})
    if diff and not allow_different:
        raise ValueError(f"these runs were made under settings that change what their numbers mean "
                         f"({_differences_text(diff)}): compare runs made alike, or pass --allow-different to "
                         "compare them with these differences named")
    note = f"**Made under different settings**: {_differences_text(diff)}.\n\n" if diff else ""
    table = metrics_table({label[d]: read_metrics(d, files.METRICS_AFTER, files.LM_EVAL_AFTER) for d in run_dirs})
    runs = {label[d]: read_geffects(d / files.GEFFECTS) for d in run_dirs}
    record, ci_note = seed_intervals(run_dirs, label, configs, allow_different) if ci else (None, "")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_compare([(label[d], runs[label[d]]) for d in run_dirs], out_dir / files.COMPARE_PLOT)
    if record is not None:
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(out_dir / files.COMPARE_CI, lambda f: f.write(text.encode("utf-8")))
    out = out_dir / files.COMPARE_SUMMARY
    out.write_text(f"# Comparison (after unlearning)\n\n{note}{ci_note}{table}\n![curves]({files.COMPARE_PLOT})\n"
                   + compare_updates(runs) + ("" if record is None else "\n" + ci_markdown(record)),
                   encoding="utf-8")
    return out
