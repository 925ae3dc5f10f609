"""Reports of unlearning runs: paper-style plots, a markdown summary, and run comparison.

    python -m fastgeffect.report show DIR            # (re)draw plots and summary.md of one run
    python -m fastgeffect.report compare DIR1 DIR2   # one table and overlaid curves

A run folder holds ``geffect.jsonl`` (one line per step and risk), ``train_log.jsonl``,
``pg_effects.jsonl`` (optional), ``token_weights.jsonl`` (optional), ``metrics_before.json`` /
``metrics_after.json`` / ``metrics_uwc.json`` (optional) and ``config.json``.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from . import run_files as files
from .cli_help import HelpFormatter, examples  # noqa: E402
from .geffect import read_geffect_log  # noqa: E402
from .jsonl import read_jsonl  # noqa: E402

GROUP_ORDER = ("embed", "shallow", "middle", "deep", "lm")
SUMMARY_KEYS = ("method", "regularizer", "lam", "split", "model", "preset", "size", "data_dir", "authors", "epochs",
                "batch_size", "lr", "seed", "ps_protocol", "gen_mode", "eval_max_length", "truth_ratio_agg")
HEADLINE_METRICS = ("Model Utility", "Forget Quality", "Prob. Forget", "ROUGE Forget", "Prob. Retain", "ROUGE Retain",
                    "PS-exact forget", "PS-perturb forget", "PS-exact retain", "PS-perturb retain")


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
PREDICTORS = (("predicted_gd", "raw G-effect, −lr·e"), ("predicted_opt", "update effect, −lr·u"))
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
        raise ValueError(f"{run_dir} is not a run folder: it has no config.json (pass the --out folder of a "
                         "`python -m fastgeffect.run`)")
    return run_dir


def read_geffects(path: Path) -> List[dict]:
    """The checked records of a run's G-effect log (none when absent)."""
    return check_records(path, read_geffect_log(path), GEFFECT_KEYS, {"update_total": UPDATE_KEYS}) \
        if path.exists() else []


def series(records: Sequence[dict], risk: str, key: Optional[str] = None) -> tuple:
    """(steps, values) of one risk: the total, or group ``key``."""
    rows = [r for r in records if r["risk"] == risk]
    steps = [r["step"] for r in rows]
    vals = [r["total"] if key is None else r["groups"].get(key, float("nan")) for r in rows]
    return steps, vals


def groups_of(records: Sequence[dict]) -> List[str]:
    seen = []
    for r in records:
        for g in r["groups"]:
            if g not in seen:
                seen.append(g)
    return [g for g in GROUP_ORDER if g in seen] + [g for g in seen if g not in GROUP_ORDER]


def cumulative(values: Sequence[float]) -> List[float]:
    out, s = [], 0.0
    for v in values:
        s += v
        out.append(s)
    return out


def plot_geffects(records: Sequence[dict], path: Path, title: str) -> None:
    """Per-step and cumulative unlearning / retaining G-effects, total and per layer group."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for col, risk in enumerate(("unlearn", "retain")):
        for g in groups_of(records):
            steps, vals = series(records, risk, g)
            axes[0, col].plot(steps, vals, label=g, lw=1)
            axes[1, col].plot(steps, cumulative(vals), label=g, lw=1)
        steps, vals = series(records, risk)
        axes[0, col].plot(steps, vals, label="total", color="k", lw=1.6)
        axes[1, col].plot(steps, cumulative(vals), label="total", color="k", lw=1.6)
        axes[0, col].set_title(f"{'unlearning' if risk == 'unlearn' else 'retaining'} G-effect per step")
        axes[1, col].set_title("cumulative")
        axes[1, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_risks(records: Sequence[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for risk, label in (("unlearn", "forget NLL"), ("retain", "held-out retain NLL")):
        rows = [r for r in records if r["risk"] == risk]
        ax.plot([r["step"] for r in rows], [r["risk_value"] for r in rows], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("risk (token-mean NLL)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(train_log: Sequence[dict], path: Path, title: str) -> bool:
    """Objective weights (mean with min–max band) and GA's inverse confidence 1/p over steps."""
    rows = [r for r in train_log if "weights" in r]
    inv = [r for r in train_log if "inv_conf" in r]
    if not rows and not inv:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["weights"]["mean"] for r in rows], label="mean objective weight")
        ax.fill_between(steps, [r["weights"]["min"] for r in rows], [r["weights"]["max"] for r in rows], alpha=0.2,
                        label="min–max")
    if inv:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in inv], [r["inv_conf"] for r in inv], color="tab:red", lw=1,
                 label="mean 1/p (GA inverse confidence)")
        ax2.set_yscale("log")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(title)
    if rows:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_pg_effects(pg: Sequence[dict], path: Path, title: str) -> bool:
    """PG-effect of each sample against its objective (sequence) weight, one colour per step (Fig. 5b)."""
    pg = [r for r in pg if "seq_weights" in r]  # RMU has no objective weights to plot against
    if not pg:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in pg:
        ax.scatter(r["seq_weights"], r["pg_effect"], s=12, label=f"step {r['step']}")
    ax.set_xlabel("objective weight of the sample")
    ax.set_ylabel("PG-effect ⟨∇R, ∇ℓ_i⟩")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def token_weights_html(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Heat-map of per-token objective weights of a few forget samples, one line per epoch."""
    if not rows:
        return False
    top = max(max(r["weights"]) for r in rows) or 1.0
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h2>{html.escape(title)}</h2><p>colour: token weight / {top:.3g} (white 0, red max)</p>"]
    for index in sorted({r["index"] for r in rows}):
        parts.append(f"<h3>forget sample {index}</h3><table>")
        for r in sorted((r for r in rows if r["index"] == index), key=lambda r: r["epoch"]):
            cells = []
            for tok, w in zip(r["tokens"], r["weights"]):
                a = max(0.0, min(1.0, w / top))
                cells.append(f"<span title='{w:.3g}' style='background:rgba(220,30,30,{a:.3f})'>"
                             f"{html.escape(tok)}</span>")
            parts.append(f"<tr><td>epoch {r['epoch']}</td>"
                         f"<td style='font-family:monospace'>{' '.join(cells)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return True


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def metrics_table(columns: Dict[str, Optional[dict]]) -> str:
    cols = {k: v for k, v in columns.items() if v}
    if not cols:
        return "(no metrics)\n"
    keys = [k for k in HEADLINE_METRICS if any(k in v for v in cols.values())]
    keys += sorted({k for v in cols.values() for k in v if k not in keys and isinstance(v[k], (int, float))})
    lines = ["| metric | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt(v.get(k)) for v in cols.values()) + " |")
    return "\n".join(lines) + "\n"


def geffect_totals(records: Sequence[dict]) -> str:
    """Cumulative G-effect per group over the run (the area under the paper's curves)."""
    groups = groups_of(records)
    lines = ["| risk | " + " | ".join(groups) + " | total |", "| --- |" + " --- |" * (len(groups) + 1)]
    for risk in ("unlearn", "retain"):
        rows = [r for r in records if r["risk"] == risk]
        if rows:
            sums = [sum(r["groups"].get(g, 0.0) for r in rows) for g in groups]
            total = fmt(sum(r["total"] for r in rows))
            lines.append(f"| {risk} | " + " | ".join(fmt(s) for s in sums) + f" | {total} |")
    return "\n".join(lines) + "\n"


def with_outcome(records: Sequence[dict], risk: str) -> List[dict]:
    """The records of ``risk`` holding a finite realised change and both predictions of it."""
    keys = ("realised",) + tuple(k for k, _ in PREDICTORS)
    return [r for r in records if r["risk"] == risk and all(isinstance(r.get(k), (int, float)) for k in keys)]


def prediction_quality(rows: Sequence[dict], key: str) -> Dict[str, Optional[float]]:
    """How well ``key`` predicts the realised change over steps: Pearson correlation and the
    median of realised / predicted (None where undefined: < 2 steps, a constant series)."""
    pairs = [(r[key], r["realised"]) for r in rows]
    ratios = [real / pred for pred, real in pairs if pred != 0]
    try:
        corr = statistics.correlation(*zip(*pairs)) if len(pairs) >= 2 else None
    except statistics.StatisticsError:  # a constant series has no correlation
        corr = None
    return {"corr": corr, "median_ratio": statistics.median(ratios) if ratios else None, "steps": len(pairs)}


def group_shares(records: Sequence[dict], risk: str, key: str) -> Dict[str, float]:
    """Each group's share of Σ_g |Σ_steps effect_g| of ``risk`` (``key``: "groups" for the raw
    G-effect, "update_groups" for the update effect): which layers the steps move, on one scale."""
    rows = [r for r in records if r["risk"] == risk and key in r]
    sums = {g: sum(r[key].get(g, 0.0) for r in rows) for g in groups_of(records)}
    norm = sum(abs(v) for v in sums.values()) or 1.0
    return {g: v / norm for g, v in sums.items()}


def update_tables(records: Sequence[dict]) -> str:
    """Markdown: how each prediction tracks the realised change, and each group's share of the
    cumulative raw G-effect against its share of the cumulative update effect."""
    lines = ["| risk | prediction | correlation | median realised/predicted | steps |",
             "| --- | --- | --- | --- | --- |"]
    for risk in ("unlearn", "retain"):
        rows = with_outcome(records, risk)
        for key, label in PREDICTORS:
            q = prediction_quality(rows, key)
            lines.append(f"| {risk} | {label} | {fmt(q['corr'])} | {fmt(q['median_ratio'])} | {q['steps']} |")
    groups = groups_of(records)
    lines += ["", "| risk | share of the cumulative | " + " | ".join(groups) + " |",
              "| --- | --- |" + " --- |" * len(groups)]
    for risk in ("unlearn", "retain"):
        for key, label in (("groups", "raw G-effect"), ("update_groups", "update effect")):
            shares = group_shares(records, risk, key)
            lines.append(f"| {risk} | {label} | " + " | ".join(fmt(shares[g]) for g in groups) + " |")
    return "\n".join(lines) + "\n"


def compare_updates(runs: Mapping[str, Sequence[dict]]) -> str:
    """Markdown: per run and risk, how well each prediction tracks the realised change ("" when no
    run measured update effects)."""
    lines = []
    for run, records in runs.items():
        for risk in ("unlearn", "retain"):
            rows = with_outcome(records, risk)
            if rows:
                q = [prediction_quality(rows, key) for key, _ in PREDICTORS]
                lines.append(f"| {run} | {risk} | " + " | ".join(f"{fmt(x['corr'])} | {fmt(x['median_ratio'])}"
                                                              for x in q) + " |")
    if not lines:
        return ""
    head = ["| run | risk | corr. −lr·e | median ratio −lr·e | corr. −lr·u | median ratio −lr·u |",
            "| --- | --- | --- | --- | --- | --- |"]
    return "\n".join(["## Predicted vs realised risk changes (realised/predicted)\n"] + head + lines) + "\n"


def plot_updates(records: Sequence[dict], path: Path, title: str) -> None:
    """Top: per step, the realised change of each risk against both predictions. Bottom: per
    group, its share of the cumulative raw G-effect next to its share of the update effect."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    groups = groups_of(records)
    for col, risk in enumerate(("unlearn", "retain")):
        rows = with_outcome(records, risk)
        steps = [r["step"] for r in rows]
        ax = axes[0, col]
        ax.plot(steps, [r["realised"] for r in rows], color="k", lw=1.6, label="realised ΔR")
        for key, label in PREDICTORS:
            ax.plot(steps, [r[key] for r in rows], lw=1, label=label)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_title(f"{'forget' if risk == 'unlearn' else 'retain'} risk: change per step")
        ax.set_xlabel("step")
        ax = axes[1, col]
        x = range(len(groups))
        for k, (key, label) in enumerate((("groups", "raw G-effect"), ("update_groups", "update effect"))):
            shares = group_shares(records, risk, key)
            ax.bar([i + (k - 0.5) * 0.4 for i in x], [shares[g] for g in groups], width=0.4, label=label)
        ax.set_xticks(list(x), groups)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title("share of the cumulative effect per group")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path) -> Path:
    """Plots and ``summary.md`` of one run folder; returns the summary's path."""
    run_dir = check_run_folder(run_dir)
    cfg = read_json(run_dir / files.CONFIG) or {}
    name = cfg.get("method", run_dir.name)
    if cfg.get("regularizer") not in (None, "none"):  # the plots of GA and of GA + GD must not look alike
        name = f"{name} + {cfg['regularizer']}"
    records = read_geffects(run_dir / files.GEFFECTS)
    train_log = read_log(run_dir / files.TRAIN_LOG, when=TRAIN_KEYS)
    pg_effects = read_log(run_dir / files.PG_EFFECTS, PG_KEYS)
    token_weights = read_log(run_dir / files.TOKEN_WEIGHTS, TOKEN_WEIGHT_KEYS)
    before, after, uwc = (read_json(run_dir / f"metrics_{k}.json") for k in ("before", "after", "uwc"))
    plots = run_dir / files.PLOTS
    plots.mkdir(exist_ok=True)
    made = []
    if records:
        plot_geffects(records, plots / "geffect.png", f"G-effects of {name}")
        plot_risks(records, plots / "risk.png", f"risks during {name}")
        made += ["plots/geffect.png", "plots/risk.png"]
    updates = any("update_total" in r for r in records)
    if updates:
        plot_updates(records, plots / "updates.png", f"predicted and realised risk changes of {name}")
        made.append("plots/updates.png")
    if plot_weights(train_log, plots / "weights.png", f"objective weights of {name}"):
        made.append("plots/weights.png")
    if plot_pg_effects(pg_effects, plots / "pg_effects.png", f"PG-effects of {name}"):
        made.append("plots/pg_effects.png")
    if token_weights_html(token_weights, run_dir / files.TOKEN_WEIGHTS_HTML, f"token weights of {name} across epochs"):
        made.append(files.TOKEN_WEIGHTS_HTML)
    shown = {k: cfg.get(k) for k in SUMMARY_KEYS if cfg.get(k) is not None}
    shown.update(cfg.get("objective_hparams") or {})
    parts = [f"# {name} run\n", "Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()) +
             " (all of them in config.json)\n",
             "## Metrics\n", metrics_table({"before": before, "after": after, "UWC-calibrated": uwc})]
    if uwc and "alpha" in uwc:
        parts.append(f"UWC: α = {fmt(uwc['alpha'])} (largest mix keeping retain PS within tolerance)\n")
    # what a reader needs to read the numbers: where Forget Quality's retain log came from (or why
    # there is none) and, with --lora, that the G-effects are over the adapters
    notes = [cfg[k] for k in ("forget_quality", "geffect_over") if cfg.get(k)]
    if notes:
        parts.append("## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    if records:
        parts += ["## Cumulative G-effects\n", geffect_totals(records),
                  "Negative unlearning G-effect: the step removes targeted knowledge; negative retaining "
                  "G-effect: it damages retained knowledge.\n"]
    if updates:
        parts += ["## Predicted and realised changes\n",
                  "Each step's realised change of a risk, ΔR = R(θ_{t+1}) − R(θ_t) on the same batch, against "
                  "plain gradient descent's prediction −lr·e (the G-effect) and the real optimiser step's −lr·u "
                  "(the update effect: AdamW's clipped step). A median ratio of 1 is a calibrated prediction.\n",
                  update_tables(records)]
    parts += ["## Files\n"] + [f"- [{m}]({m})" for m in made]
    out = run_dir / files.SUMMARY
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def compare(run_dirs: Sequence[Path], out_dir: Optional[Path] = None) -> Path:
    """One metrics table and overlaid total G-effect curves of several runs."""
    run_dirs = [check_run_folder(d) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir else run_dirs[0].parent / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    label = {d: f"{(read_json(d / 'config.json') or {}).get('method', d.name)} ({d.name})" for d in run_dirs}
    table = metrics_table({label[d]: read_json(d / files.METRICS_AFTER) for d in run_dirs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = {label[d]: read_geffects(d / files.GEFFECTS) for d in run_dirs}
    for d in run_dirs:
        records = runs[label[d]]
        for ax, risk in zip(axes, ("unlearn", "retain")):
            steps, vals = series(records, risk)
            ax.plot(steps, cumulative(vals), label=label[d])
    for ax, risk in zip(axes, ("unlearning", "retaining")):
        ax.set_title(f"cumulative {risk} G-effect")
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=110)
    plt.close(fig)
    (out_dir / "compare.md").write_text("# Comparison (after unlearning)\n\n" + table + "\n![curves](compare.png)\n"
                                        + compare_updates(runs), encoding="utf-8")
    return out_dir / "compare.md"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastgeffect.report", description=__doc__.split("\n\n")[0],
                                 epilog=examples(__doc__), formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{show,compare}")
    one = sub.add_parser("show", help="(re)draw the plots and summary.md of one run folder",
                         description="(Re)draw the plots and summary.md of one run folder.",
                         formatter_class=HelpFormatter)
    one.add_argument("run_dir", type=Path, help="a run folder (holds config.json)")
    cmp_ = sub.add_parser("compare", help="compare several run folders: one table, overlaid curves",
                          description="Compare several run folders: one table, overlaid G-effect curves.",
                          formatter_class=HelpFormatter)
    cmp_.add_argument("run_dirs", type=Path, nargs="+", help="run folders (each holds config.json)")
    cmp_.add_argument("--out", type=Path, default=None, help="output folder (default: <parent>/compare)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = write_report(args.run_dir) if args.cmd == "show" else compare(args.run_dirs, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
