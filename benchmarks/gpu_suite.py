"""The whole GPU benchmark suite in one call (docs/design.md §7), writing a markdown table with the
GPU's name to ``benchmarks/RESULTS.md``.

Sections: fused token-weighted loss vs eager / torch.compile / torch chunked linear CE /
Liger-Kernel / Cut Cross-Entropy at Llama-2-7B and Phi-1.5 LM-head shapes (bf16, 8192 tokens);
the fused KL regulariser vs eager; ``bench_dot.run`` (grouped dot accumulation) and
``bench_geffect.run`` when those scripts exist. A time budget (default 420 s) skips what is
left, with a note, so the call finishes within 8 minutes.

``python benchmarks/gpu_suite.py`` on a GPU machine; ``python benchmarks/gpu_suite.py --small
--out /tmp/suite.md`` checks the script on CPU at small shapes (it never overwrites RESULTS.md
from a CPU run).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_losses  # noqa: E402

SMALL_SHAPES = {"small": (64, 2000)}


def generic_table(rows):
    keys = sorted({k for r in rows for k in r})
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    return "\n".join(lines)


def optional_section(module_name, device, small):
    """``module.run(device=...)`` rows as a table, or the reason it was skipped."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        return f"skipped: benchmarks/{module_name}.py not importable ({e})"
    run = getattr(mod, "run", None)
    if not callable(run):
        return f"skipped: benchmarks/{module_name}.py exposes no run() function"
    kwargs = {"device": device}
    if small and module_name == "bench_dot":
        kwargs.update(scale=1 / 256, reps=1, paper=False)
    try:
        rows = run(**kwargs)
    except TypeError:
        rows = run(device)
    fmt = getattr(mod, "format_table", None)
    return fmt(rows) if callable(fmt) else generic_table(rows if isinstance(rows, list) else [rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU check of the script)")
    p.add_argument("--out", help="markdown output (default benchmarks/RESULTS.md on CUDA)")
    p.add_argument("--budget-s", type=float, default=420.0)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = a.out or (os.path.join(HERE, "RESULTS.md") if device == "cuda" else None)
    if out is None:
        p.error("no GPU here: pass --out PATH (RESULTS.md is only written from a GPU run)")
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    shapes = SMALL_SHAPES if a.small else None
    tokens = 256 if a.small else None
    sections = []

    def section(title, fn):
        left = a.budget_s - (time.perf_counter() - start)
        if left <= 0:
            sections.append((title, f"skipped: the suite's {a.budget_s:.0f} s budget was used up"))
            return
        t0 = time.perf_counter()
        try:
            body = fn()
        except Exception:
            body = "failed:\n```\n" + traceback.format_exc()[-2000:] + "\n```"
        sections.append((title, body + f"\n\n({time.perf_counter() - t0:.0f} s)"))
        print(f"== {title}\n{body}\n", flush=True)

    methods = ("eager", "ours", "floor") if a.small else bench_losses.METHODS
    section("Fused token-weighted loss (TNPO weights), forward+backward",
            lambda: bench_losses.format_table(bench_losses.run(device, shapes, tokens, methods=methods,
                                                               subprocess_cpu=False)))
    section("Fused KL regulariser (forward KL, all positions), forward+backward",
            lambda: bench_losses.format_table(bench_losses.run_kl(device, shapes, tokens)))
    section("Grouped dot accumulation (bench_dot)", lambda: optional_section("bench_dot", device, a.small))
    section("G-effect engine (bench_geffect)", lambda: optional_section("bench_geffect", device, a.small))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = ["# Benchmark results\n", f"Device: **{gpu}**; torch {torch.__version__}; {stamp}; "
            f"suite wall time {time.perf_counter() - start:.0f} s (`python benchmarks/gpu_suite.py`).\n"]
    if device != "cuda":
        text.append("**CPU check run at small shapes, not GPU numbers.**\n")
    text.append("Ratios are against eager PyTorch (materialised logits) in the same run; `floor` is the three "
                "LM-head matmuls a forward+backward needs. Peak MB is the extra memory over the inputs.\n")
    for title, body in sections:
        text.append(f"## {title}\n\n{body}\n")
    with open(out, "w") as f:
        f.write("\n".join(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
