"""The whole benchmark suite in one call (docs/design.md §7), built so that a short GPU window cannot
lose its results.

1. Builds the extension first (``pip install --no-deps --no-build-isolation -e .`` in a
   subprocess: a device machine gets the sources, not the ``.so``); the outcome is the first line
   of the results. ``--no-build`` skips it.
2. Checks correctness before any timing: both fused kernels and the dot op against float64
   references (real shapes in bf16 and fp16 on a GPU, tiny shapes on CPU), ``correctness.py``.
3. Times: the fused token-weighted loss vs eager / torch.compile / torch chunked linear CE /
   Liger-Kernel / Cut Cross-Entropy at Llama-2-7B and Phi-1.5 LM-head shapes (bf16, 8192 tokens);
   the fused KL vs eager; grouped dot accumulation (``bench_dot``); the G-effect engine and
   per-sample G-effects (``bench_geffect``).

Every section has a share of the time budget (420 s, ``--quick`` 180 s; the build counts against
it), checked inside it between measurements, and is
written to ``--out DIR`` (default ``$OUT`` when set, else ``benchmarks/suite-<time>``) as soon as
it is measured: ``NN-<section>.md`` and ``.json``, plus ``RESULTS.md``, all sections so far, the
table to paste into ``benchmarks/RESULTS.md``. The paper's copy-to-host pattern at 7B scale
(~81 GB of host RAM, ~100 s) only runs with ``--paper``.

    python benchmarks/gpu_suite.py                       # on the GPU machine, ~7 minutes
    python benchmarks/gpu_suite.py --quick               # ~3 minutes
    python benchmarks/gpu_suite.py --device cpu --quick --out /tmp/x --no-build   # CPU check
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# (file stem, title, share of the budget)
SECTIONS = (("correctness", "Correctness against float64 (before any timing)", 0.15),
            ("losses", "Fused token-weighted loss (TNPO weights), forward+backward", 0.30),
            ("kl", "Fused KL regulariser (forward KL, all positions), forward+backward", 0.15),
            ("dot", "Grouped dot accumulation (bench_dot)", 0.15),
            ("geffect", "G-effect engine and per-sample G-effects (bench_geffect)", 0.20),
            ("chunks", "Rows per chunk of the fused loss at a large vocabulary (default vs forced)", 0.05))
TINY_LM_SHAPES = {"tiny": (64, 2000)}
TINY_MODEL = dict(hidden=64, layers=2, inter=128, heads=4, vocab=512, batch=2, seq=32, ps_seq=16)


def build_extension(timeout_s: float = 300) -> str:
    """``pip install -e .`` of this checkout in a subprocess; one line saying how it went."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"build: FAILED (timed out after {timeout_s:.0f} s): {' '.join(cmd)}"
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        return f"build: FAILED (rc {proc.returncode}, {took:.0f} s): " + " / ".join(last)
    return f"build: ok ({took:.0f} s, `pip install --no-deps --no-build-isolation -e .`)"


def generic_table(rows) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    return "\n".join(lines)


def section_runners(device: str, quick: bool, paper: bool):
    """``stem -> (deadline -> (rows, markdown))``."""
    # imported here, after the build, so that the freshly built extension is the one loaded
    import bench_dot
    import bench_geffect
    import bench_losses
    import correctness
    gpu = device == "cuda"
    if gpu:
        shapes = dict(list(bench_losses.GPU_SHAPES.items())[:1]) if quick else bench_losses.GPU_SHAPES
        tokens, methods = 8192, (("eager", "liger", "cce", "ours", "floor") if quick else bench_losses.METHODS)
        reps, dot_scale, model = (3 if quick else 5), (0.5 if quick else 1.0), {}
    else:
        shapes, tokens, methods = TINY_LM_SHAPES, 256, ("eager", "ours", "floor")
        reps, dot_scale, model = 1, 1 / 256, TINY_MODEL
    geffect_skip = set() if paper else {"paper"}
    if quick:
        geffect_skip |= {"loop-b1"}

    def losses(deadline):
        rows = bench_losses.run(device, shapes, tokens, methods=methods, reps=reps, subprocess_cpu=False,
                                deadline=deadline)
        return rows, bench_losses.format_table(rows)

    def kl(deadline):
        rows = bench_losses.run_kl(device, shapes, tokens, reps=reps, deadline=deadline)
        return rows, bench_losses.format_table(rows)

    def dot(deadline):
        rows = bench_dot.run(device, scale=dot_scale, reps=reps, paper=paper, deadline=deadline)
        return rows, bench_dot.format_table(rows)

    def geffect(deadline):
        rows = bench_geffect.run(device, repeats=1 if quick else 2, skip=geffect_skip, deadline=deadline,
                                 ps_batch=16 if gpu else 4, **model)
        return rows, bench_geffect.format_table(rows)

    def chunks(deadline):
        shape = None if gpu else ("tiny", *TINY_LM_SHAPES["tiny"])
        rows = bench_losses.run_chunks(device, shape, None if gpu else tokens, reps=reps, deadline=deadline)
        return rows, bench_losses.format_chunks(rows)

    def check(deadline):
        rows = correctness.run(device, quick=quick, deadline=deadline)
        return rows, correctness.format_table(rows)

    return {"correctness": check, "losses": losses, "kl": kl, "dot": dot, "geffect": geffect,
            "chunks": chunks}


def default_out() -> str:
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return os.path.join(HERE, "suite-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="results folder (default: $OUT when set, else benchmarks/suite-<time>)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats: ~3 minutes on an H200")
    p.add_argument("--budget-s", type=float, help="whole-suite time budget (default 420, --quick 180)")
    p.add_argument("--no-build", action="store_true", help="use the extension as installed")
    p.add_argument("--paper", action="store_true",
                   help="also time the paper's copy-to-host pattern (at 7B: ~81 GB host RAM, ~100 s)")
    p.add_argument("--only", help="comma list of sections to run: " + ",".join(s for s, _, _ in SECTIONS))
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    out = a.out or default_out()
    os.makedirs(out, exist_ok=True)
    budget = a.budget_s if a.budget_s is not None else (180.0 if a.quick else 420.0)
    start = time.perf_counter()
    build = "build: skipped (--no-build)" if a.no_build else build_extension()
    print(build, flush=True)

    cpu = platform.processor() or platform.machine()
    card = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU ({cpu})"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [build + "\n", "# Benchmark results\n",
            f"Device: **{card}**; torch {torch.__version__}; {stamp}; "
            f"`python benchmarks/gpu_suite.py{' --quick' if a.quick else ''}`.\n"]
    if a.device != "cuda":
        head.append("**CPU check run at small shapes, not GPU numbers.**\n")
    head.append("Ratios are against eager PyTorch (materialised logits) in the same run; `floor` is the three "
                "LM-head matmuls a forward+backward needs. Peak MB is the extra memory over the inputs.\n")
    written = []

    def write_results(total_s=None):
        tail = [f"Suite wall time {total_s:.0f} s (budget {budget:.0f} s).\n"] if total_s is not None else []
        with open(os.path.join(out, "RESULTS.md"), "w") as f:
            f.write("\n".join(head + written + tail))

    write_results()
    try:
        runners = section_runners(a.device, a.quick, a.paper)
    except Exception:  # an import failing after a failed build: say so in the results, not only on stderr
        written.append("## Import of the benchmarks\n\nfailed:\n```\n" + traceback.format_exc()[-3000:] + "\n```\n")
        write_results(time.perf_counter() - start)
        raise
    only = set(a.only.split(",")) if a.only else None
    shares = sum(share for stem, _, share in SECTIONS if only is None or stem in only)
    for i, (stem, title, share) in enumerate(SECTIONS, 1):
        if only is not None and stem not in only:
            continue
        now = time.perf_counter()
        left = budget - (now - start)
        # its own share, or more when earlier sections left time unused; never past the whole budget.
        # Checked between measurements, so a section ends at most one measurement late.
        own, later = budget * share / shares, budget * remaining_share(i, only) / shares
        deadline = now + min(left, max(own, left - later))
        rows = []
        if left <= 0:
            body = f"skipped: the suite's {budget:.0f} s budget was used up"
        else:
            try:
                rows, body = runners[stem](deadline)
            except Exception:
                body = "failed:\n```\n" + traceback.format_exc()[-3000:] + "\n```"
            body += f"\n\n({time.perf_counter() - now:.0f} s)"
        if a.device == "cuda":
            torch.cuda.empty_cache()
        text = f"## {title}\n\n{body}\n"
        base = os.path.join(out, f"{i:02d}-{stem}")
        with open(base + ".md", "w") as f:
            f.write(text)
        with open(base + ".json", "w") as f:
            json.dump(dict(section=stem, title=title, device=a.device, card=card, rows=rows), f, indent=1, default=str)
        written.append(text)
        write_results()
        print(text, flush=True)
    write_results(time.perf_counter() - start)
    print(f"wrote {out}/RESULTS.md (paste into benchmarks/RESULTS.md)")


def remaining_share(i: int, only) -> float:
    """The budget shares of the sections after the i-th (1-based) that will run."""
    return sum(share for stem, _, share in SECTIONS[i:] if only is None or stem in only)


if __name__ == "__main__":
    main()
