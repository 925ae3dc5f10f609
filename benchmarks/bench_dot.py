"""Grouped gradient dot accumulation: compiled op vs torch fallback vs the paper's copy-to-host.

Over a Llama-2-7B-shaped list of (gradient, partner) pairs (embed, 32 blocks of q/k/v/o,
gate/up/down and two norms, final norm, lm_head: 291 tensors) grouped embed/shallow/middle/
deep/lm as the G-effect engine does. ``scale`` shrinks every width (hidden, intermediate,
vocab) and keeps the 291-tensor list; 1.0 is the real 7B list (27 GB of bf16 reads per call).
On a GPU it also measures device-to-device copy bandwidth, the ≥80% target's yardstick.

    python benchmarks/bench_dot.py                      # CPU, scale 1/16
    python benchmarks/bench_dot.py --device cuda        # GPU, full 7B where memory allows
"""
from __future__ import annotations

import argparse
import gc
import math
import time
from typing import Callable, List

import torch

import fastgeffect.ops as ops

LLAMA2_7B = dict(hidden=4096, intermediate=11008, vocab=32000, layers=32)


def llama_grad_shapes(scale: float = 1.0):
    """(shape, group) per parameter of a Llama-2-7B whose widths are multiplied by ``scale``."""
    h = max(8, int(LLAMA2_7B["hidden"] * scale))
    i = max(8, int(LLAMA2_7B["intermediate"] * scale))
    v = max(8, int(LLAMA2_7B["vocab"] * scale))
    n = LLAMA2_7B["layers"]
    shapes = [((v, h), 0)]  # embed
    for layer in range(n):
        g = 1 + min(2, 3 * layer // n)  # shallow / middle / deep thirds
        shapes += [((h, h), g)] * 4 + [((i, h), g), ((i, h), g), ((h, i), g), ((h,), g), ((h,), g)]
    shapes += [((h,), 3), ((v, h), 4)]  # final norm joins deep; lm_head
    return shapes


def make_pairs(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    a = [torch.randn(s, generator=g, device=device, dtype=dtype) for s, _ in shapes]
    b = [torch.randn(s, generator=g, device=device, dtype=dtype) for s, _ in shapes]
    return a, b, [grp for _, grp in shapes]


def paper_copy_to_host(acc, ta, tb, gids):
    """The paper's code pattern: flatten every gradient to the host in fp32, concatenate, dot."""
    flat_a = torch.cat([t.detach().to("cpu", torch.float32).flatten() for t in ta])
    flat_b = torch.cat([t.detach().to("cpu", torch.float32).flatten() for t in tb])
    sums, start = torch.zeros(acc.numel(), dtype=torch.float64), 0
    for t, grp in zip(ta, gids):
        end = start + t.numel()
        sums[grp] += torch.dot(flat_a[start:end], flat_b[start:end]).item()
        start = end
    acc += sums.to(acc.device, acc.dtype)


def time_it(fn: Callable[[], None], device: str, reps: int, warmup: bool = True) -> float:
    """Best wall time in seconds over ``reps`` runs (after one warm-up run if ``warmup``)."""
    if warmup:
        fn()
    best = math.inf
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run(device: str = "cpu", scale: float | None = None, reps: int | None = None,
        dtypes=(torch.bfloat16, torch.float32), paper: bool = True, deadline: float | None = None) -> List[dict]:
    """Rows: one per (dtype, implementation) with time (ms), bandwidth (GB/s of input read) and
    speed-up vs the torch fallback; on CUDA one more row for device-to-device copy bandwidth.
    Dtypes not started by ``deadline`` (a ``time.perf_counter()`` value) are left out."""
    if scale is None:
        scale = 1.0 if device == "cuda" else 1 / 16
    if reps is None:
        reps = 5 if device == "cuda" else 3
    acc_dtype = torch.float64 if device == "cpu" else torch.float32
    shapes = llama_grad_shapes(scale)
    rows: List[dict] = []
    for dtype in dtypes:
        if deadline is not None and time.perf_counter() > deadline:
            break
        elem = torch.empty((), dtype=dtype).element_size()
        numel = sum(math.prod(s) for s, _ in shapes)
        if device == "cuda":  # both lists plus fallback temporaries must fit
            free, _ = torch.cuda.mem_get_info()
            if 2 * numel * elem * 1.1 > free:
                rows.append(dict(bench="dot_accumulate", device=device, dtype=str(dtype), impl="skipped",
                                 note=f"needs {2 * numel * elem / 1e9:.0f} GB, {free / 1e9:.0f} GB free"))
                continue
        ta, tb, gids = make_pairs(shapes, dtype, device)
        nbytes = 2 * numel * elem
        impls = {"ext": lambda acc: ops.dot_accumulate_(acc, ta, tb, gids),
                 "torch": lambda acc: ops.dot_accumulate_torch_(acc, ta, tb, gids)}
        if paper:
            impls["paper copy-to-host"] = lambda acc: paper_copy_to_host(acc, ta, tb, gids)
        times = {}
        previous = ops.get_backend()
        ops.set_backend("ext")
        try:
            for name, fn in impls.items():
                if name == "ext" and not ops.extension_available(device):
                    continue
                acc = torch.zeros(5, dtype=acc_dtype, device=device)
                slow = name.startswith("paper")  # seconds per call at 7B on a GPU: one cold run
                times[name] = time_it(lambda: fn(acc), device, 1 if slow else reps, warmup=not slow)
        finally:
            ops.set_backend(previous)
        for name, t in times.items():
            rows.append(dict(bench="dot_accumulate", device=device, dtype=str(dtype).replace("torch.", ""),
                             impl=name, tensors=len(shapes), numel=numel, ms=1e3 * t, gbps=nbytes / t / 1e9,
                             speedup_vs_torch=times["torch"] / t))
        del ta, tb
        gc.collect()
    if device == "cuda":
        n = 1 << 30  # 4 GiB fp32 copy: read + write counted
        src = torch.empty(n, device=device)
        dst = torch.empty_like(src)
        t = time_it(lambda: dst.copy_(src), device, reps)
        copy_gbps = 2 * n * 4 / t / 1e9
        rows.append(dict(bench="dot_accumulate", device=device, dtype="float32", impl="d2d copy", ms=1e3 * t,
                         gbps=copy_gbps))
        for r in rows:
            if r.get("impl") == "ext":
                r["fraction_of_copy_bw"] = r["gbps"] / copy_gbps
        del src, dst
        torch.cuda.empty_cache()
    return rows


def format_table(rows: List[dict]) -> str:
    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else ""

    lines = ["| dtype | impl | tensors | elements | ms | GB/s | × torch | of copy bw |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == "skipped":
            lines.append(f"| {r['dtype']} | skipped: {r['note']} | | | | | | |")
            continue
        lines.append(f"| {r['dtype']} | {r['impl']} | {cell(r, 'tensors', 'd')} | {cell(r, 'numel', ',')} | "
                     f"{r['ms']:.2f} | {r['gbps']:.1f} | {cell(r, 'speedup_vs_torch', '.2f')} | "
                     f"{cell(r, 'fraction_of_copy_bw', '.0%')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=None, help="width multiplier of the 7B shapes")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-paper", action="store_true", help="skip the slow copy-to-host pattern")
    args = p.parse_args()
    rows = run(args.device, args.scale, args.reps, paper=not args.no_paper)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"dot_accumulate_ on {name}, torch {torch.__version__}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
