"""Time the default run (``python -m fastgeffect.run``): first run (empty cache) and cached run.

    python benchmarks/bench_run.py [--method tnpo] [--size default] [--keep DIR]

Each run is a separate process with its own empty output folder; the first uses an empty
embedded-model cache, the second reuses it. Per-phase times come from the run's ``timing.json``
(setup = data, tokenizer and target/retain models; reference = cached log-probs; eval_before
includes the retain twin's forget log; unlearn includes the G-effects). Targets on a 2-core CPU:
first run ≤ 300 s, cached run ≤ 120 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("setup", "reference", "eval_before", "unlearn", "eval_after", "uwc", "total")


def one_run(cache: Path, out: Path, method: str, size: str) -> dict:
    env = {**os.environ, "FASTGEFFECT_CACHE": str(cache)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastgeffect.run", "--method", method, "--size", size, "--out", str(out),
                    "--no-progress"], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    timing = json.loads((out / "timing.json").read_text())[-1]
    return {"wall (process)": wall, **{k: timing.get(k, float("nan")) for k in PHASES}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="tnpo")
    ap.add_argument("--size", default="default", choices=("default", "tiny"))
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders and cache here")
    args = ap.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="fg-bench-run-"))
    cache = root / "cache"
    rows = {"first run": one_run(cache, root / "first", args.method, args.size),
            "cached run": one_run(cache, root / "cached", args.method, args.size)}
    cols = ["wall (process)", *PHASES]
    print(f"default run ({args.method}, size {args.size}), seconds, {os.cpu_count()} CPUs")
    print("| run | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    ok = rows["first run"]["wall (process)"] <= 300 and rows["cached run"]["wall (process)"] <= 120
    print(f"targets (first ≤ 300 s, cached ≤ 120 s): {'met' if ok else 'NOT met'}")
    print(f"run folders: {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
