"""Rebuilds every table of docs/studies/smollm2-steer.md from the runs' logs committed under
docs/studies/smollm2-steer/logs/ (one folder per run: config.json, timing.json, geffect.jsonl,
train_log.jsonl, metrics_*.json, as the driver wrote them).

    python docs/studies/smollm2_steer_tables.py            # print the tables
    python docs/studies/smollm2_steer_tables.py --check    # exit 1 unless the document holds them
    python docs/studies/smollm2_steer_tables.py --write    # put them into the document

In the document each table sits between ``<!-- table: NAME -->`` and ``<!-- end table -->``;
``--check`` compares those blocks byte for byte with what this script builds.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout's package, without an install

from fastgeffect.report.geffect_stats import prediction_quality, with_outcome  # noqa: E402

RUNS = HERE / "smollm2-steer" / "logs"  # not "runs/": .gitignore keeps run folders out
DOC = HERE / "smollm2-steer.md"
BLOCK = re.compile(r"(<!-- table: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)
# runs in the order the tables show them, with what each one is
SPECS = (("ga-none", "GA"), ("ga-stop", "GA, stopped on predicted retain damage"),
         ("ga-gd", "GA + GD"), ("ga-gd-gru", "GA + GD, GRU guard"),
         ("npo-none", "NPO"), ("npo-stop", "NPO, stopped on predicted retain damage"),
         ("npo-gd", "NPO + GD"), ("npo-gd-gru", "NPO + GD, GRU guard"))
SECOND_ORDER_RUNS = (("ga-so", "GA"),)


def load_run(runs_dir: Path, name: str) -> Optional[dict]:
    folder = runs_dir / name
    if not folder.is_dir():
        return None

    def js(file):
        p = folder / file
        return json.loads(p.read_text()) if p.exists() else None

    def jsonl(file):
        p = folder / file
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    return {"config": js("config.json"), "timing": js("timing.json"), "before": js("metrics_before.json"),
            "after": js("metrics_after.json"), "uwc": js("metrics_uwc.json"), "geffect": jsonl("geffect.jsonl"),
            "train": jsonl("train_log.jsonl")}


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}"


def table(head: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def phase_seconds(timing: List[dict], phase: str) -> Optional[float]:
    vals = [t[phase] for t in timing or [] if isinstance(t.get(phase), (int, float))]
    return sum(vals) if vals else None


def runs_with(runs: Dict[str, dict], key: str, names=None):
    """(name, label, run) of the study's runs, in the tables' order, that hold a non-empty ``key``."""
    for name, label in SPECS:
        run = runs.get(name)
        if run and run[key] and (names is None or name.endswith(names)):
            yield name, label, run


def steps_run(run: dict) -> int:
    return len({r["step"] for r in run["train"]})


def metrics_table(runs: Dict[str, dict]) -> str:
    """Forget and retain PS, Model Utility after unlearning and after UWC, and what each cost."""
    head = ["run", "steps", "PS-exact forget", "PS-exact retain", "PS-perturb forget", "PS-perturb retain",
            "Model Utility", "UWC α", "UWC PS-exact forget", "UWC PS-exact retain", "UWC Model Utility"]
    before = next((r["before"] for r in runs.values() if r and r["before"]), None)
    rows = []
    if before:
        rows.append(["target (before)", "0"] + [fmt(before.get(k)) for k in
                     ("PS-exact forget", "PS-exact retain", "PS-perturb forget", "PS-perturb retain",
                      "Model Utility")] + ["–"] * 4)
    for _, label, run in runs_with(runs, "after"):
        a, u = run["after"], run["uwc"] or {}
        rows.append([label, str(steps_run(run))] +
                    [fmt(a.get(k)) for k in ("PS-exact forget", "PS-exact retain", "PS-perturb forget",
                                             "PS-perturb retain", "Model Utility")] +
                    [fmt(u.get("alpha")), fmt(u.get("PS-exact forget")), fmt(u.get("PS-exact retain")),
                     fmt(u.get("Model Utility"))])
    return table(head, rows)


def quality_rows(label: str, records: List[dict], keys: List[tuple]) -> List[List[str]]:
    rows = []
    for risk in ("unlearn", "retain"):
        outcome = with_outcome(records, risk)
        if not outcome:
            continue
        for key, what in keys:
            if not all(isinstance(r.get(key), (int, float)) for r in outcome):
                continue
            q = prediction_quality(outcome, key)
            rows.append([label, risk, what, f"{q['sign_agree']} of {q['steps']}", fmt(q["iqr_log_ratio"]),
                         fmt(q["sum_ratio"]), fmt(q["spearman"]), fmt(q["median_ratio"])])
    return rows


QUALITY_HEAD = ["run", "risk", "prediction", "sign right", "IQR of log(real/pred)", "Σreal/Σpred", "Spearman",
                "median real/pred"]


def quality_table(runs: Dict[str, dict]) -> str:
    """The update effect's prediction of each risk's change over the steps of every run."""
    rows = []
    for _, label, run in runs_with(runs, "geffect"):
        rows += quality_rows(label, run["geffect"], [("predicted_opt", "update effect")])
    return table(QUALITY_HEAD, rows)


def second_order_table(runs: Dict[str, dict]) -> str:
    """Per step of the second-order runs: realised change, first- and second-order predictions."""
    head = ["run", "step", "risk", "R before", "realised", "update effect −lr·u", "½ΔθᵀHΔθ",
            "with the second-order term"]
    rows = []
    for name, label in SECOND_ORDER_RUNS:
        run = runs.get(name)
        if not run:
            continue
        for r in run["geffect"]:
            if isinstance(r.get("second_order"), (int, float)):
                rows.append([label, str(r["step"]), r["risk"], fmt(r["risk_value"], 4), fmt(r["realised"]),
                             fmt(r["predicted_opt"]), fmt(r["second_order"]), fmt(r["predicted_opt2"])])
    return table(head, rows)


def second_order_quality_table(runs: Dict[str, dict]) -> str:
    rows = []
    for name, label in SECOND_ORDER_RUNS:
        run = runs.get(name)
        if run:
            rows += quality_rows(label, run["geffect"], [("predicted_opt", "update effect"),
                                                          ("predicted_opt2", "+ ½ΔθᵀHΔθ")])
    return table(QUALITY_HEAD, rows)


def cumulative_change(records: List[dict], risk: str, key: str) -> Optional[float]:
    vals = [r[key] for r in records if r["risk"] == risk and isinstance(r.get(key), (int, float))]
    return math.fsum(vals) if vals else None


def risk_table(runs: Dict[str, dict]) -> str:
    """The two fixed risks over each run: where they started, their realised and predicted change
    (relative to the start), and the raw G-effects summed over steps."""
    head = ["run", "steps", "forget risk R₀", "Δ forget risk (realised)", "retain risk R₀",
            "Δ retain risk / R₀ (realised)", "Δ retain risk / R₀ (predicted)", "Σ retain G-effect"]
    rows = []
    for _, label, run in runs_with(runs, "geffect"):
        g = run["geffect"]
        r0 = {risk: next(r["risk_value"] for r in g if r["risk"] == risk) for risk in ("unlearn", "retain")}
        real_f = cumulative_change(g, "unlearn", "realised")
        real_r, pred_r = cumulative_change(g, "retain", "realised"), cumulative_change(g, "retain", "predicted_opt")
        rows.append([label, str(steps_run(run)), fmt(r0["unlearn"], 4), fmt(real_f), fmt(r0["retain"], 4),
                     fmt(real_r / r0["retain"] if real_r is not None else None),
                     fmt(pred_r / r0["retain"] if pred_r is not None else None),
                     fmt(cumulative_change(g, "retain", "total"))])
    return table(head, rows)


def cost_table(runs: Dict[str, dict]) -> str:
    """Wall seconds per phase (2-core CPU, two runs side by side, one thread each)."""
    head = ["run", "steps", "unlearning s", "s per step", "evaluation after s", "UWC s",
            "after + UWC ≤ unlearning?"]
    rows = []
    for _, label, run in runs_with(runs, "timing"):
        t = run["timing"]
        unl, after, uwc = (phase_seconds(t, p) for p in ("unlearn", "eval_after", "uwc"))
        n = steps_run(run)
        ok = "–" if None in (unl, after, uwc) else ("yes" if after + uwc <= unl else "no")
        rows.append([label, str(n), fmt(unl, 4), fmt(unl / n if unl and n else None, 3), fmt(after, 4),
                     fmt(uwc, 4), ok])
    return table(head, rows)


def guard_table(runs: Dict[str, dict]) -> str:
    """What the GRU guard did at each step (train_log.jsonl) beside the unguarded GD run: the steps it
    projected, the norm it removed against the clipped gradient's, and the two step losses."""
    head = ["run", "steps", "steps projected", "removed norm: median (max)", "gradient norm: median",
            "forget NLL of the last step's batch", "retain NLL of the step's batch: mean over steps"]
    rows = []
    for _, label, run in runs_with(runs, "train", names=("-gd", "-gru")):
        t = run["train"]
        removed = [r["guard_removed_norm"] for r in t if isinstance(r.get("guard_removed_norm"), (int, float))]
        projected = sum(1 for r in t if r.get("guard_projected"))
        rows.append([label, str(len(t)), str(projected) if "guard_projected" in t[0] else "–",
                     f"{fmt(statistics.median(removed))} ({fmt(max(removed))})" if removed else "–",
                     fmt(statistics.median(r["grad_norm"] for r in t)), fmt(t[-1]["forget_nll"]),
                     fmt(statistics.fmean(r["reg_loss"] for r in t))])
    return table(head, rows)


TABLES: Dict[str, Callable[[Dict[str, dict]], str]] = {
    "metrics": metrics_table, "risks": risk_table, "quality": quality_table, "guard": guard_table,
    "second-order": second_order_table, "second-order-quality": second_order_quality_table, "cost": cost_table}


def build(runs_dir: Path = RUNS) -> Dict[str, str]:
    names = [n for n, _ in SPECS + SECOND_ORDER_RUNS]
    runs = {n: load_run(runs_dir, n) for n in names}
    return {name: fn(runs) for name, fn in TABLES.items()}


def fill(doc: str, tables: Dict[str, str]) -> str:
    def sub(m):
        name = m.group("name")
        if name not in tables:
            raise SystemExit(f"unknown table {name!r} in the document; known: {', '.join(tables)}")
        return m.group(1) + tables[name] + m.group(4)
    return BLOCK.sub(sub, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 unless the document holds these tables")
    mode.add_argument("--write", action="store_true", help="write the tables into the document")
    ap.add_argument("--runs", type=Path, default=RUNS, help="the runs' folder (default: the committed one)")
    ap.add_argument("--doc", type=Path, default=DOC, help="the document (default: smollm2-steer.md)")
    args = ap.parse_args(argv)
    if not args.runs.is_dir():
        print(f"--runs {args.runs}: no such folder", file=sys.stderr)
        return 2
    tables = build(args.runs)
    if not (args.check or args.write):
        for name, text in tables.items():
            print(f"<!-- table: {name} -->\n{text}<!-- end table -->\n")
        return 0
    doc = args.doc.read_text()
    found = {m.group("name") for m in BLOCK.finditer(doc)}
    missing = [n for n in tables if n not in found]
    if missing:
        print(f"{args.doc.name} has no block for the tables {missing}", file=sys.stderr)
        return 1
    new = fill(doc, tables)
    if args.write:
        args.doc.write_text(new)
        return 0
    if new != doc:
        print(f"{args.doc.name}: its tables differ from what the logs in {args.runs} give; "
              f"rebuild them with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
