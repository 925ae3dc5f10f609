"""Reports of unlearning runs: paper-style plots, a markdown summary, and run comparison.

    python -m fastgeffect.report show DIR            # (re)draw plots and summary.md of one run
    python -m fastgeffect.report compare DIR1 DIR2   # one table and overlaid curves
    python -m fastgeffect.report compare --ci runs/sweep/*-seed*   # intervals over seeds, paired differences

A run folder holds ``geffect.jsonl`` (one line per step and risk), ``train_log.jsonl``,
``pg_effects.jsonl`` (optional), ``token_weights.jsonl`` (optional), ``metrics_before.json`` /
``metrics_after.json`` / ``metrics_uwc.json`` (optional) and ``config.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import run_files as files
from ..cli_help import HelpFormatter, examples
from .comparison import compare
from .run_summary import write_report


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastgeffect.report", description=__doc__.split("\n\n")[0],
                                 epilog=examples(__doc__), formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{show,compare}")
    one = sub.add_parser("show", help=f"(re)draw the plots and {files.SUMMARY} of one run folder",
                         description=f"(Re)draw the plots and {files.SUMMARY} of one run folder.",
                         formatter_class=HelpFormatter)
    one.add_argument("run_dir", type=Path, help=f"a run folder (holds {files.CONFIG})")
    cmp_ = sub.add_parser("compare", help="compare several run folders: one table, overlaid curves",
                          description="Compare several run folders: one table, overlaid G-effect curves.",
                          formatter_class=HelpFormatter)
    cmp_.add_argument("run_dirs", type=Path, nargs="+", help=f"run folders (each holds {files.CONFIG})")
    cmp_.add_argument("--out", type=Path, default=None, help=f"output folder (default: <parent>/{files.COMPARE})")
    cmp_.add_argument("--allow-different", action="store_true",
                      help="compare runs made with another model, data, split or evaluation (refused by default), "
                           "naming the differences in the summary")
    cmp_.add_argument("--ci", action="store_true",
                      help="group the runs by setting, one run per seed, and add per metric the mean over seeds with "
                           "its 95%% t-interval (the headline) and percentile bootstrap interval, and between "
                           f"settings the paired differences over the same seeds ({files.COMPARE_CI} too)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "show":
            path = write_report(args.run_dir)
        else:
            path = compare(args.run_dirs, args.out, args.allow_different, args.ci)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"))
    return 0
