"""Hyper-parameter grids and method comparisons under UWC calibration (paper Tables 1–10).

    python -m fastgeffect.sweep --method wga --alpha 0.05,0.1,0.5,1,2,4,5,7,10 --split forget05
    python -m fastgeffect.sweep --methods ga,npo,tnpo,wtnpo --regularizer gd
    python -m fastgeffect.sweep --method tnpo --beta 1,4 -- --epochs 3      # after --: any run flag

Runs are sequential, one folder each under ``--out``; they share the cached target model and a
``shared/`` folder with the reference log-probs, the retain model's log and the evaluation before
unlearning. A finished run is reused when the sweep is run again; an interrupted one is resumed.
The table (``sweep.md``, ``sweep.json``) gives, per setting, UWC-calibrated PS-exact and
PS-perturb on retain (↑) and forget (↓) data as in the paper's Tables 2–10, plus the calibrated
α, Model Utility and Forget Quality after unlearning.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .objectives import OBJECTIVES
from .run import main as run_main

GRID_FLAGS = ("alpha", "beta", "lam", "lr", "delta", "steering_coeff")
COLUMNS = (("PS-exact retain", "PS-exact retain ↑"), ("PS-exact forget", "PS-exact unlearn ↓"),
           ("PS-perturb retain", "PS-perturb retain ↑"), ("PS-perturb forget", "PS-perturb unlearn ↓"))


def parse_grid(text: str, flag: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{flag.replace('_', '-')}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"--{flag.replace('_', '-')}: empty grid")
    return values


def settings(args) -> List[Dict[str, object]]:
    """Every (method, hyper-parameter values) combination of the sweep."""
    methods = args.methods.split(",") if args.methods else [args.method]
    unknown = [m for m in methods if m not in OBJECTIVES]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(OBJECTIVES)}")
    grids = {f: parse_grid(getattr(args, f), f) for f in GRID_FLAGS if getattr(args, f)}
    out = []
    for method in methods:
        for values in itertools.product(*grids.values()):
            out.append({"method": method, **dict(zip(grids, values))})
    return out


def run_name(setting: Dict[str, object]) -> str:
    return "-".join([str(setting["method"])] + [f"{k}{v:g}" for k, v in setting.items() if k != "method"])


def run_one(setting: Dict[str, object], out: Path, args, extra: Sequence[str]) -> Path:
    folder = out / run_name(setting)
    if (folder / "summary.md").exists():
        return folder  # finished earlier: reuse
    argv = ["--method", str(setting["method"]), "--split", args.split, "--out", str(folder),
            "--shared-dir", str(out / "shared"), "--seed", str(args.seed)]
    if args.regularizer:
        argv += ["--regularizer", args.regularizer]
    for k, v in setting.items():
        if k != "method":
            argv += [f"--{k.replace('_', '-')}", repr(v)]
    if (folder / "config.json").exists():
        argv.append("--resume")
    run_main(argv + list(extra))
    return folder


def read_metrics(folder: Path) -> Dict[str, float]:
    row: Dict[str, float] = {}
    for name, prefix in (("metrics_after.json", ""), ("metrics_uwc.json", "uwc ")):
        p = folder / name
        if p.exists():
            row.update({prefix + k: v for k, v in json.loads(p.read_text()).items() if isinstance(v, (int, float))})
    return row


def table(rows: Sequence[Dict[str, object]]) -> str:
    head = ["setting"] + [c for _, c in COLUMNS] + ["UWC α", "MU", "FQ"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def f(v):
        return "–" if v is None else f"{v:.3f}"
    for r in rows:
        m = r["metrics"]
        cells = [r["name"]] + [f(m.get("uwc " + k)) for k, _ in COLUMNS]
        cells += [f(m.get("uwc alpha")), f(m.get("Model Utility")), f(m.get("Forget Quality"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastgeffect.sweep", description=__doc__.split("\n\n")[0],
                                 epilog="Arguments after -- go to every run (python -m fastgeffect.run --help).")
    ap.add_argument("--method", default="tnpo", help="the objective whose hyper-parameters are swept")
    ap.add_argument("--methods", default=None, help="comma-separated objectives to compare (Table-1 style)")
    ap.add_argument("--regularizer", default=None, help="regulariser of every run (default: each objective's)")
    for f in GRID_FLAGS:
        ap.add_argument(f"--{f.replace('_', '-')}", default=None, help=f"comma-separated values of {f}")
    ap.add_argument("--split", default="forget10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/sweep-<methods>-<split>)")
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    combos = settings(args)
    out = args.out or Path(f"runs/sweep-{(args.methods or args.method).replace(',', '_')}-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(combos, 1):
        print(f"[{i}/{len(combos)}] {run_name(s)}", flush=True)
        folder = run_one(s, out, args, extra)
        rows.append({"name": run_name(s), "setting": s, "folder": str(folder), "metrics": read_metrics(folder)})
        # written after every run, so an interrupted sweep keeps what it has
        (out / "sweep.json").write_text(json.dumps(rows, indent=2))
        (out / "sweep.md").write_text(f"# Sweep ({args.split}), UWC-calibrated\n\n" + table(rows))
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
