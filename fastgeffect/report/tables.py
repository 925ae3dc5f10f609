"""The report's markdown: metrics and G-effect tables, and the text of a run's summary."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

from .. import run_files as files
from .geffect_stats import (
    GROUP_EFFECTS,
    RISKS,
    group_shares,
    groups_of,
    prediction_quality,
    predictors_of,
    tied_shares,
    with_outcome,
)

# the settings the summary's first line shows (the objective's hyper-parameters follow them)
SUMMARY_KEYS = ("benchmark", "method", "regularizer", "lam", "split", "model", "preset", "size", "data_dir", "authors",
                "epochs", "batch_size", "lr", "seed", "ps_protocol", "gen_mode", "eval_max_length", "truth_ratio_agg")
HEADLINE_METRICS = ("Model Utility", "Forget Quality", "Prob. Forget", "ROUGE Forget", "Prob. Retain", "ROUGE Retain",
                    "PS-exact forget", "PS-perturb forget", "PS-exact retain", "PS-perturb retain")


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
    for risk in RISKS:
        rows = [r for r in records if r["risk"] == risk]
        if rows:
            sums = [sum(r["groups"].get(g, 0.0) for r in rows) for g in groups]
            total = fmt(sum(r["total"] for r in rows))
            lines.append(f"| {risk} | " + " | ".join(fmt(s) for s in sums) + f" | {total} |")
    return "\n".join(lines) + "\n"


# how each prediction tracks the realised change: the columns of the tables, sign agreement first
QUALITY_HEAD = ("sign agrees", "IQR of log |realised/predicted|", "Σ realised / Σ predicted", "Spearman",
                "median realised/predicted")
QUALITY_NOTE = ("Sign agrees: k of n steps where the prediction has the realised change's sign (zero counts as a "
                "sign of its own); the IQR of log|realised/predicted| (steps where both are nonzero) is the spread "
                "of its size, 0 for a constant factor; Σ realised / Σ predicted and a median ratio of 1 are a "
                "calibrated prediction; Spearman is the rank correlation.\n")


def quality_cells(q: Mapping) -> str:
    """The cells of one :func:`prediction_quality` in the order of ``QUALITY_HEAD``."""
    cells = [f"{q['sign_agree']}/{q['steps']}"] + [fmt(q[k]) for k in ("iqr_log_ratio", "sum_ratio", "spearman",
                                                                       "median_ratio")]
    return " | ".join(cells)


def update_tables(records: Sequence[dict]) -> str:
    """Markdown: how each prediction tracks the realised change, and each group's share of the
    cumulative raw G-effect against its share of the cumulative update effect."""
    lines = ["| risk | prediction | " + " | ".join(QUALITY_HEAD) + " |", "| --- | --- |" + " --- |" * len(QUALITY_HEAD)]
    for risk in RISKS:
        rows = with_outcome(records, risk)
        for key, label in predictors_of(rows):
            lines.append(f"| {risk} | {label} | {quality_cells(prediction_quality(rows, key))} |")
    groups = groups_of(records)
    lines += ["", "| risk | share of the cumulative | " + " | ".join(groups) + " |",
              "| --- | --- |" + " --- |" * len(groups)]
    for risk in RISKS:
        for key, label in GROUP_EFFECTS:
            shares = group_shares(records, risk, key)
            lines.append(f"| {risk} | {label} | " + " | ".join(fmt(shares[g]) for g in groups) + " |")
    tied = [(risk, label, t) for risk in RISKS for key, label in GROUP_EFFECTS
            if (t := tied_shares(records, risk, key)) is not None]
    if tied:  # the embedding and LM head share one weight, counted in embed: its share by use
        lines += ["", "| risk | tied embedding's share of the cumulative | input embedding | LM head |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {risk} | {label} | {fmt(t['input'])} | {fmt(t['lm_head'])} |" for risk, label, t in tied]
    return "\n".join(lines) + "\n"


def compare_updates(runs: Mapping[str, Sequence[dict]]) -> str:
    """Markdown: per run, risk and prediction, how well it tracks the realised change ("" when no
    run measured update effects)."""
    lines = []
    for run, records in runs.items():
        for risk in RISKS:
            rows = with_outcome(records, risk)
            if rows:
                lines += [f"| {run} | {risk} | {label} | {quality_cells(prediction_quality(rows, key))} |"
                          for key, label in predictors_of(rows)]
    if not lines:
        return ""
    head = ["| run | risk | prediction | " + " | ".join(QUALITY_HEAD) + " |",
            "| --- | --- | --- |" + " --- |" * len(QUALITY_HEAD)]
    return "\n".join(["## Predicted vs realised risk changes\n", QUALITY_NOTE] + head + lines) + "\n"


def run_name(config: Mapping, default: str) -> str:
    """The name a run's plots and summary carry: its method, with its regulariser if it has one."""
    name = config.get("method", default)
    if config.get("regularizer") not in (None, "none"):  # the plots of GA and of GA + GD must not look alike
        name = f"{name} + {config['regularizer']}"
    return name


def _settings_line(config: Mapping) -> str:
    shown = {k: config.get(k) for k in SUMMARY_KEYS if config.get(k) is not None}
    if config.get("benchmark", "tofu") != "tofu":  # a raw-text run has no TOFU split; its forget corpus instead
        shown.pop("split", None)
        if config.get("benchmark") == "muse":
            shown["muse_forget"] = config.get("muse_forget")
    shown.update(config.get("objective_hparams") or {})
    return "Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + f" (all of them in {files.CONFIG})\n"


def _metrics_section(metrics: Mapping[str, Optional[dict]]) -> List[str]:
    uwc = metrics["uwc"]
    parts = ["## Metrics\n", metrics_table({"before": metrics["before"], "after": metrics["after"],
                                            "UWC-calibrated": uwc})]
    if uwc and "alpha" in uwc:
        parts.append(f"UWC: α = {fmt(uwc['alpha'])} (largest mix keeping retain PS within tolerance)\n")
    return parts


def _attacks_section(attacks: Optional[Mapping]) -> List[str]:
    """attacks.json as tables: the relearning curves (target, retain twin, gap) per k and the forget
    metrics of each quantised model."""
    if not attacks:
        return []
    metrics, parts = attacks["metrics"], ["## Attacks\n"]
    relearn = attacks.get("relearn")
    if relearn:
        curves = [c for c in ("target", "twin", "gap") if relearn.get(c)]
        head = [f"{m} {c}" for m in metrics for c in curves]
        lines = ["| k | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
        for i, k in enumerate(relearn["steps"]):
            lines.append(f"| {k} | " + " | ".join(fmt(relearn[c][i][m]) for m in metrics for c in curves) + " |")
        parts += [f"Relearning: k fine-tuning steps (lr {fmt(relearn['lr'])}) on {len(relearn['train_rows'])} forget "
                  f"rows, measured on the other {len(relearn['eval_rows'])}; the twin (the retain model) is the "
                  "control, gap = target − twin.\n", "\n".join(lines) + "\n"]
    quantize = attacks.get("quantize")
    if quantize:
        lines = ["| weights | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
        for row in quantize["rows"]:
            name = "unquantised" if row["bits"] is None else f"{row['bits']}-bit {row['granularity']}"
            lines.append(f"| {name} | " + " | ".join(fmt(row[m]) for m in metrics) + " |")
        parts += [f"Quantisation (round-to-nearest, {quantize['layers']} linear weights) on all "
                  f"{attacks['forget_rows']} forget rows:\n", "\n".join(lines) + "\n"]
    return parts


def _notes_section(config: Mapping, ks_note: Optional[str] = None) -> List[str]:
    """What a reader needs to read the numbers: where Forget Quality's retain log and PrivLeak's
    reference came from (or why there are none), whether Forget Quality can resolve at the run's rows
    (``ks_note``: :func:`.ks_resolution.resolution_note`) and, with --lora, that the G-effects are over
    the adapters."""
    notes = [config[k] for k in ("forget_quality",) if config.get(k)] + ([ks_note] if ks_note else [])
    notes += [config[k] for k in ("privleak", "geffect_over") if config.get(k)]
    stop = config.get("unlearning_stopped")
    if stop:  # --stop-at-retain-damage ended unlearning early: the numbers after are of a shorter run
        notes.insert(0, f"Unlearning stopped after step {stop['step']} ({stop['steps_taken']} steps taken): the "
                        f"{stop['from']} retain damage {fmt(stop['damage'])} exceeded --stop-at-retain-damage "
                        f"{fmt(stop['threshold'])}")
    return ["## Notes\n\n" + "".join(f"- {n}\n" for n in notes)] if notes else []


def guard_note(records: Sequence[dict]) -> Optional[str]:
    """With --geffect-guard: at how many measured steps it projected the forget gradient (None: no guard)."""
    steps = {r["step"]: r["guard_projected"] for r in records if r.get("guard_projected") is not None}
    if not steps:
        return None
    fired = sum(1 for n in steps.values() if n > 0)
    return (f"--geffect-guard projected the forget gradient away from the retain gradient at {fired} of {len(steps)} "
            f"measured steps ({sum(steps.values()) / len(steps):.2f} layer groups per step on average).\n")


def _geffect_sections(records: Sequence[dict]) -> List[str]:
    parts = [note for note in [guard_note(records)] if note]
    if records:
        parts += ["## Cumulative G-effects\n", geffect_totals(records),
                  "Negative unlearning G-effect: the step removes targeted knowledge; negative retaining "
                  "G-effect: it damages retained knowledge.\n"]
    if any("update_total" in r for r in records):
        parts += ["## Predicted and realised changes\n",
                  "Each step's realised change of a risk, ΔR = R(θ_{t+1}) − R(θ_t) on the same batch, against "
                  "plain gradient descent's prediction −lr·e (the G-effect) and the real optimiser step's −lr·u "
                  "(the update effect: AdamW's clipped step). " + QUALITY_NOTE,
                  update_tables(records)]
    return parts


def summary_markdown(name: str, config: Mapping, metrics: Mapping[str, Optional[dict]], records: Sequence[dict],
                     made: Sequence[str], attacks: Optional[Mapping] = None, ks_note: Optional[str] = None) -> str:
    """The text of a run's summary: settings, metrics ("before", "after", "uwc"), notes (``ks_note``:
    where Forget Quality cannot resolve), the tables of G-effect ``records``, the ``attacks``
    (attacks.json) and links to the files ``made`` (paths relative to the run folder)."""
    on = {"muse": "MUSE", "wmdp": "WMDP"}.get(config.get("benchmark"), "TOFU")
    parts = [f"# {name} run on {on}\n", _settings_line(config), *_metrics_section(metrics), *_attacks_section(attacks),
             *_notes_section(config, ks_note),
             *_geffect_sections(records), "## Files\n", *(f"- [{m}]({m})" for m in made)]
    return "\n".join(parts) + "\n"
