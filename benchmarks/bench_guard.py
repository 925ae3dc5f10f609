"""What ``--geffect-guard`` costs: peak memory and time of the unlearning loop, plain against guarded.

    python benchmarks/bench_guard.py                 # a 19M-parameter GPT-2, fp32, CPU (or CUDA)
    python benchmarks/bench_guard.py --n-embd 1024 --layers 12 --device cuda

Each mode (none, pcgrad, gru) runs in its own processes, G-effects off so that only the step is
measured: on CUDA the allocator's peak over the loop; on CPU the peak of the bytes held by tensors
allocated in the loop, from torch's profiler (``profile_memory``: exact per allocation, unlike the
process's RSS), and the time in another process without the profiler. The guard's budget
is one gradient copy (its retain direction); the last lines print each guarded run's peak against the
plain one's, as a ratio and in gradient copies, from the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

MODES = ("none", "pcgrad", "gru")


def one(args) -> dict:
    import torch
    from toy_unlearning import toy_data_and_model  # beside this script

    from fastgeffect.objectives import get_objective
    from fastgeffect.unlearn import UnlearnConfig, Unlearner

    data, model = toy_data_and_model(args)
    cfg = UnlearnConfig(epochs=1, batch_size=args.batch, grad_accum=args.grad_accum, lr=1e-4, geffect_every=0,
                        geffect_guard=args.mode, guard_scope=args.scope)
    cuda = args.device.startswith("cuda")

    def run():
        with tempfile.TemporaryDirectory() as out:
            Unlearner(model, get_objective("ga", regularizer="gd"), data, cfg, out, progress=False).run()

    t = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        extra, seconds = torch.cuda.max_memory_allocated() - base, time.perf_counter() - t
    elif args.measure == "time":
        run()
        extra, seconds = None, time.perf_counter() - t
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        extra, seconds = profiled_peak(prof), None
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"mode": args.mode, "params": sum(p.numel() for p in model.parameters()), "steps": args.steps,
            "seconds": seconds, "extra_MB": None if extra is None else extra / 2 ** 20, "grad_MB": grad_bytes / 2 ** 20,
            "memory": "CUDA allocated" if cuda else "CPU tensors (profiler)"}


def profiled_peak(prof) -> int:
    """The peak of the bytes held by tensors allocated under ``prof``, from its memory events in time
    order (an op's own allocations at its start, a ``[memory]`` event a free)."""
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--scope", default="model", choices=("model", "group"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one process's measurement
    p.add_argument("--measure", choices=("time", "memory"), help=argparse.SUPPRESS)  # CPU: not both at once
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    res = {}
    for mode in MODES:  # on CPU, time without the profiler and memory with it, in two processes
        for measure in ("memory",) if args.device.startswith("cuda") else ("time", "memory"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--measure", measure],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            res[mode] = {**got, **{k: v for k, v in res.get(mode, {}).items() if v is not None}}
        print(res[mode])
    plain = res["none"]
    for mode in MODES[1:]:
        r = res[mode]
        copies = (r["extra_MB"] - plain["extra_MB"]) / plain["grad_MB"]
        ratio, speed = r["extra_MB"] / plain["extra_MB"], r["seconds"] / plain["seconds"]
        print(f"{mode}: {r['params']} parameters, {r['steps']} steps: {r['memory']} over the start "
              f"{plain['extra_MB']:.0f} MB plain -> {r['extra_MB']:.0f} MB guarded ({ratio:.2f}x, {copies:+.2f} "
              f"gradient copies of {plain['grad_MB']:.0f} MB), time {speed:.2f}x")


if __name__ == "__main__":
    main()
