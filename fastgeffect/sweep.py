"""Hyper-parameter grids and method comparisons under UWC calibration (paper Tables 1–10).

    python -m fastgeffect.sweep --method wga --alpha 0.05,0.1,0.5,1,2,4,5,7,10 --split forget05
    python -m fastgeffect.sweep --methods ga,npo,tnpo,wtnpo --regularizer gd
    python -m fastgeffect.sweep --method tnpo --beta 1,4 -- --epochs 3      # after --: any run flag
    python -m fastgeffect.sweep --methods ga,npo --seeds 0,1,2              # one run per method and seed

Runs are sequential, one folder each under ``--out``; they share the cached target model and a
``shared/`` folder with the reference log-probs, the retain model's log and the evaluation before
unlearning (each kept with the fingerprint of the model and data it was computed for). Every run of
the grid is checked before the first starts. ``runs.json`` records the flags each run was started
with: when the sweep is run again, a run started with the same settings is reused (finished) or
resumed (interrupted); one started with other settings (another --seed, --regularizer, or flags
after --) is refused, naming them: give the sweep another --out, or pass ``-- --overwrite``.
The table (``sweep.md``, ``sweep.json``) gives, per setting, UWC-calibrated PS-exact and
PS-perturb on retain (↑) and forget (↓) data as in the paper's Tables 2–10, plus the calibrated
α, Model Utility and Forget Quality after unlearning.

``--seeds 0,1,2`` runs every setting once per seed (run ``<setting>-seed<s>``): the seed changes the
unlearning order, the retain pairing and the rows the G-effect risks are measured on, while every run
unlearns one embedded target (``--target-seed``, 0 by default, passed to every run; a --model target is
one anyway). sweep.md then adds per setting the mean over seeds with its 95 % t-interval (the headline)
and percentile bootstrap interval (fastgeffect/report/intervals.py says why), and sweep.json becomes
``{"runs": [...], "over_seeds": [...]}``; ``python -m fastgeffect.report compare --ci`` gives paired
differences between settings too.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import run_files as files
from .atomic_file import atomic_write
from .cli_help import HelpFormatter, examples
from .data.tofu import RETAIN_OF
from .dataclass_cli import flag
from .distributed import write_json_main
from .driver.artefacts import load_json_dict
from .driver.cli import build_parser as build_run_parser
from .driver.cli import parse_args as parse_run_args
from .driver.config import with_defaults
from .driver.presets import resolve_preset
from .objectives import HPARAMS, OBJECTIVES, get_objective
from .report import intervals
from .run import main as run_main

GRID_FLAGS = ("alpha", "beta", "lam", "lr", "delta", "steering_coeff")
COLUMNS = (("PS-exact retain", "PS-exact retain ↑"), ("PS-exact forget", "PS-exact unlearn ↓"),
           ("PS-perturb retain", "PS-perturb retain ↑"), ("PS-perturb forget", "PS-perturb unlearn ↓"))
RUNS_FILE = "runs.json"  # {run name: the run flags it was started with}
# flags a reused run may have been started with differently: stricter than resuming one run
# (driver.config.MAY_CHANGE_ON_RESUME), since a finished run is reused as it is: --save-model or
# --save-every given now would not be honoured by it; the sweep sets --out and --shared-dir itself
IGNORED = ("no_progress", "resume", "overwrite", "stop_at_step", "out", "shared_dir")
UNSET = object()


def parse_grid(text: str, dest: str) -> List[float]:
    """Comma-separated finite numbers, each once and each with its own run name."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag(dest)}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag(dest)}: empty grid {text!r}; give at least one value, or leave the flag out")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"{flag(dest)}: {bad[0]} is not a finite number")
    names = [f"{dest}{v:g}" for v in values]
    for i, name in enumerate(names):
        if name in names[:i]:
            j = names.index(name)
            raise SystemExit(f"{flag(dest)}: {values[j]!r} and {values[i]!r} are the same setting (run {name}); "
                             "give each value once (at most 6 significant digits)")
    return values


def parse_methods(args) -> List[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None \
        else [args.method]
    if not methods:
        raise SystemExit(f"--methods: empty list {args.methods!r}; give comma-separated objectives")
    unknown = [m for m in methods if m not in OBJECTIVES]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(OBJECTIVES)}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise SystemExit(f"--methods: {', '.join(twice)} given twice; give each method once")
    return methods


def settings(args) -> List[Dict[str, object]]:
    """Every (method, hyper-parameter values) combination of the sweep."""
    methods = parse_methods(args)
    grids = {f: parse_grid(getattr(args, f), f) for f in GRID_FLAGS if getattr(args, f) is not None}
    out = []
    for method in methods:
        for values in itertools.product(*grids.values()):
            out.append({"method": method, **dict(zip(grids, values))})
    return out


def run_name(setting: Dict[str, object]) -> str:
    return "-".join([str(setting["method"])] + [f"{k}{v:g}" for k, v in setting.items() if k != "method"])


def parse_seeds(text: str) -> List[int]:
    """``--seeds``: comma-separated integers, each once."""
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise SystemExit(f"--seeds: empty list {text!r}; give at least one seed, or use --seed")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise SystemExit(f"--seeds: {', '.join(map(str, twice))} given twice; give each seed once")
    return seeds


def runs_of(args, combos: Sequence[Dict[str, object]]) -> List[Tuple[str, Dict[str, object], int]]:
    """(run name, setting, seed) of every run: one per setting, or with --seeds one per setting and seed."""
    if args.seeds is None:
        return [(run_name(s), s, args.seed) for s in combos]
    seeds = parse_seeds(args.seeds)
    return [(f"{run_name(s)}-seed{seed}", s, seed) for s in combos for seed in seeds]


def target_flags(args, extra: Sequence[str]) -> List[str]:
    """``--target-seed`` for every run: with --seeds (0 by default: the seeds vary the unlearning, not the
    target) or when given; never for a --model target, which is one target whatever the seed."""
    if args.target_seed is None and args.seeds is None:
        return []
    if build_run_parser().parse_known_args(list(extra))[0].model is not None:
        if args.target_seed is not None:
            raise SystemExit("--target-seed needs the embedded target (--model after -- is a target of its own)")
        return []
    return ["--target-seed", str(0 if args.target_seed is None else args.target_seed)]


def run_argv(setting: Dict[str, object], out: Path, args, extra: Sequence[str], name: Optional[str] = None,
             seed: Optional[int] = None) -> List[str]:
    """The flags of one run (without --resume): run ``name`` (default: the setting's) with ``seed``
    (default: --seed)."""
    name = run_name(setting) if name is None else name
    argv = ["--method", str(setting["method"]), "--split", args.split, "--out", str(out / name),
            "--shared-dir", str(out / "shared"), "--seed", str(args.seed if seed is None else seed)]
    argv += target_flags(args, extra)
    if args.regularizer:
        argv += ["--regularizer", args.regularizer]
    for k, v in setting.items():
        if k != "method":
            argv += [flag(k), repr(v)]
    return argv + list(extra)


def check_extra(extra: Sequence[str], swept: Sequence[str]) -> None:
    """Flags after -- must not set what the sweep sets itself (argparse's last value would win)."""
    owned = ["method", "out", "shared_dir", "seed", "target_seed", "split", "regularizer", "resume", *swept]
    parser = build_run_parser()
    parser.set_defaults(**{d: UNSET for d in owned})
    try:
        parsed = parser.parse_args(list(extra))
    except SystemExit as e:
        raise SystemExit("sweep: the run flags after -- are invalid (see above); nothing was run") from e
    given = [d for d, v in vars(parsed).items() if d in owned and v is not UNSET]
    if given:
        raise SystemExit(f"after --: {', '.join(flag(d) for d in given)} is set by the sweep; give it to the sweep "
                         "itself (python -m fastgeffect.sweep --help)")


def check_run(name: str, argv: Sequence[str]) -> None:
    """What the run would refuse at its start: its flags, and the objective with its hyper-parameters."""
    try:
        cfg = parse_run_args(list(argv))
    except SystemExit as e:
        raise SystemExit(f"sweep: run {name} has invalid flags (see above); nothing was run") from e
    hp = {n: getattr(cfg, n) for n in HPARAMS if getattr(cfg, n) is not None}
    regularizer = cfg.regularizer or OBJECTIVES[cfg.method].default_regularizer
    try:
        get_objective(cfg.method, regularizer=regularizer, lam=cfg.lam, **hp)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"sweep: run {name} would fail: {e}; nothing was run") from None


def resolved_settings(argv: Sequence[str]) -> dict:
    """A run command line's settings with the preset's defaults filled in (as the run itself
    compares them on resume): ``--lr`` left out and ``--lr`` at the preset's value are one setting."""
    cfg = parse_run_args(list(argv))
    return asdict(with_defaults(cfg, resolve_preset(cfg.preset, cfg.model)))


def settings_diff(started: Sequence[str], now: Sequence[str]) -> Dict[str, tuple]:
    """Run settings (flag → (then, now)) that differ between two run command lines."""
    try:
        then = resolved_settings(started)
    except SystemExit:
        return {"(flags)": (" ".join(started), " ".join(now))}
    current = resolved_settings(now)
    return {flag(k): (then.get(k), current.get(k)) for k in sorted(set(then) | set(current))
            if k not in IGNORED and then.get(k) != current.get(k)}


def started_with(folder: Path, recorded: Dict[str, List[str]]) -> Optional[List[str]]:
    """The flags the run in ``folder`` was started with: from the sweep's record, else its config."""
    if folder.name in recorded:
        return recorded[folder.name]
    try:
        return list(json.loads((folder / files.CONFIG).read_text())["argv"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan(runs: Sequence[Tuple[str, Dict[str, object], int]], out: Path, args, extra: Sequence[str]) -> List[tuple]:
    """(name, argv, action) per run of :func:`runs_of`, action "run", "resume" or "reuse"; refuses, before
    any run, a grid that some run would refuse and run folders holding a run with other settings."""
    recorded = read_recorded(out)
    overwrite = "--overwrite" in extra
    steps = []
    for name, setting, seed in runs:
        argv = run_argv(setting, out, args, extra, name, seed)
        check_run(name, argv)
        folder = out / name
        action = "run"
        if (folder / files.CONFIG).exists() and not overwrite:
            started = started_with(folder, recorded)
            if started is None:
                raise SystemExit(f"{folder} holds a run whose flags are unknown (no {RUNS_FILE} entry, no argv in "
                                 "config.json); remove it, or pass -- --overwrite to rerun every run")
            diff = settings_diff(started, argv)
            if diff:
                changes = "; ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in diff.items())
                raise SystemExit(f"{folder} holds a run with other settings ({changes}); nothing was run. Give the "
                                 "sweep another --out, or pass -- --overwrite to rerun every run")
            action = "reuse" if (folder / files.SUMMARY).exists() else "resume"
        steps.append((name, argv, action))
    return steps


def read_recorded(out: Path) -> Dict[str, List[str]]:
    path = out / RUNS_FILE
    if not path.exists():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except ValueError as e:
        raise SystemExit(f"{path} is not valid JSON ({e}); remove it (runs are then checked against their "
                         "config.json)") from None
    if not isinstance(recorded, dict):
        raise SystemExit(f"{path} is not a JSON object of run name → flags; remove it")
    return recorded


def run_one(name: str, argv: List[str], action: str, out: Path) -> Tuple[Path, int]:
    """Run (or resume, or reuse) one run of the sweep: its folder and its exit code (0: done)."""
    folder = out / name
    if action == "reuse":
        return folder, 0
    recorded = read_recorded(out)
    if action == "run":  # a resumed run keeps the flags it was started with
        write_json_main(out / RUNS_FILE, {**recorded, name: argv})
    return folder, run_main(argv + (["--resume"] if action == "resume" else []))


def read_metrics(folder: Path) -> Dict[str, float]:
    row: Dict[str, float] = {}
    for name, prefix in ((files.METRICS_AFTER, ""), (files.METRICS_UWC, "uwc ")):
        p = folder / name
        if p.exists():
            try:
                metrics = load_json_dict(p)
            except ValueError as e:
                raise SystemExit(f"{e}; rerun that run: python -m fastgeffect.sweep ... -- --overwrite") from None
            row.update({prefix + k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return row


TABLE_KEYS = tuple("uwc " + k for k, _ in COLUMNS) + ("uwc alpha", "Model Utility", "Forget Quality")
HEAD = ["setting"] + [c for _, c in COLUMNS] + ["UWC α", "MU", "FQ"]


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def table(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    for r in rows:
        lines.append("| " + " | ".join([r["name"]] + [_f(r["metrics"].get(k)) for k in TABLE_KEYS]) + " |")
    return "\n".join(lines) + "\n"


def over_seeds(rows: Sequence[Dict[str, object]]) -> List[dict]:
    """Per setting (in run order), per column of the table: the mean over the seeds that have it, with
    its t-interval and bootstrap interval (:func:`fastgeffect.report.intervals.interval`)."""
    by_setting: Dict[str, List[dict]] = {}
    for r in rows:
        by_setting.setdefault(run_name(r["setting"]), []).append(r)
    out = []
    for name, runs in by_setting.items():
        metrics = {}
        for k in TABLE_KEYS:
            values = [r["metrics"][k] for r in runs if isinstance(r["metrics"].get(k), (int, float))
                      and math.isfinite(r["metrics"][k])]
            if values:
                metrics[k] = intervals.interval(values).to_dict()
        out.append({"setting": name, "seeds": [r["seed"] for r in runs], "metrics": metrics})
    return out


def seeds_table(summary: Sequence[dict], kind: str) -> str:
    """sweep.md's table over seeds: ``mean [low, high]`` with the ``kind`` ("t", "boot") interval."""
    lines = ["| " + " | ".join(HEAD[:1] + ["seeds"] + HEAD[1:]) + " |", "|" + " --- |" * (len(HEAD) + 1)]
    for s in summary:
        cells = [s["setting"], ",".join(map(str, s["seeds"]))]
        for k in TABLE_KEYS:
            it = s["metrics"].get(k)
            low = None if it is None else it[f"{kind}_low"]
            cells.append("–" if it is None else _f(it["mean"]) + ("" if low is None else
                                                                  f" [{_f(low)}, {_f(it[f'{kind}_high'])}]"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: Sequence[dict], split: str, seeds: bool) -> None:
    """sweep.json and sweep.md; with --seeds also the tables over seeds."""
    text = f"# Sweep ({split}), UWC-calibrated\n\n" + table(rows)
    summary = over_seeds(rows) if seeds else None
    write_json_main(out / "sweep.json", {"runs": rows, "over_seeds": summary} if seeds else rows)
    if seeds:
        text += (f"\n## Over seeds: mean [{intervals.LEVEL:.0%} t-interval] (headline)\n\n" + seeds_table(summary, "t")
                 + f"\n## Over seeds: mean [{intervals.LEVEL:.0%} percentile bootstrap interval, "
                 f"{intervals.RESAMPLES} resamples]\n\nWith 2–3 seeds the bootstrap interval cannot reach beyond the "
                 "observed values (it covers the mean at most 50 % of the time at 2 seeds, 75 % at 3): the t-interval "
                 "above is the headline.\n\n" + seeds_table(summary, "boot"))
    write_text_atomic(out / "sweep.md", text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastgeffect.sweep", description=__doc__.split("\n\n")[0],
                                 epilog=examples(__doc__) + "\n\nArguments after -- go to every run "
                                 "(python -m fastgeffect.run --help).", formatter_class=HelpFormatter)
    ap.add_argument("--method", default="tnpo", help="the objective whose hyper-parameters are swept")
    ap.add_argument("--methods", default=None, help="comma-separated objectives to compare (Table-1 style); "
                                                    "replaces --method")
    ap.add_argument("--regularizer", default=None, help="regulariser of every run (default: each objective's own)")
    for f in GRID_FLAGS:
        ap.add_argument(f"--{f.replace('_', '-')}", default=None, help=f"comma-separated values of {f}")
    ap.add_argument("--split", default="forget10", choices=sorted(RETAIN_OF), help="TOFU forget split")
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="seed of every run")
    seeds.add_argument("--seeds", default=None, help="comma-separated seeds: every setting runs once per seed "
                                                    "(run names end in -seed<s>), one target for all")
    ap.add_argument("--target-seed", type=int, default=None,
                    help="seed of the embedded target every run unlearns (default: 0 with --seeds; with --seed "
                         "the run's own: its --seed)")
    ap.add_argument("--out", type=Path, default=None, help="sweep folder (default: runs/sweep-<methods>-<split>)")
    return ap


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    runs = runs_of(args, settings(args))
    check_extra(extra, [f for f in GRID_FLAGS if getattr(args, f) is not None])
    out = args.out or Path(f"runs/sweep-{(args.methods or args.method).replace(',', '_')}-{args.split}")
    steps = plan(runs, out, args, extra)  # everything checked before the first run
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((name, run_flags, action), (_, s, seed)) in enumerate(zip(steps, runs), 1):
        print(f"[{i}/{len(steps)}] {name}" + (" (finished earlier: reused)" if action == "reuse" else ""),
              flush=True)
        folder, code = run_one(name, run_flags, action, out)
        if code:  # interrupted (Ctrl-C: 130) or failed: the sweep stops with the run's status
            print(f"run {name} exited with status {code}: the sweep stops here; the same command continues it "
                  "(finished runs are reused, this one resumes)", file=sys.stderr, flush=True)
            return code
        rows.append({"name": name, "setting": s, "seed": seed, "folder": str(folder), "metrics": read_metrics(folder)})
        write_tables(out, rows, args.split, args.seeds is not None)  # after every run: an interrupted sweep keeps them
    print((out / "sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
