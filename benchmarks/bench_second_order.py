"""What ``--second-order`` costs: peak memory and time of the unlearning loop with and without it.

    python benchmarks/bench_second_order.py                 # a 19M-parameter GPT-2, fp32, CPU (or CUDA)
    python benchmarks/bench_second_order.py --n-embd 1024 --layers 12 --device cuda

Each mode runs in its own process (peak RSS is per process; on CUDA the allocator's peak over the
loop); the last line prints the ratios of the same run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def one(args) -> dict:
    import torch
    from toy_unlearning import toy_data_and_model  # beside this script

    from fastgeffect.objectives import get_objective
    from fastgeffect.unlearn import UnlearnConfig, Unlearner

    data, model = toy_data_and_model(args)
    cfg = UnlearnConfig(epochs=1, batch_size=args.batch, lr=1e-4, geffect_batch=args.batch,
                        second_order=args.mode == "on")
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        Unlearner(model, get_objective("ga", regularizer="gd"), data, cfg, out, progress=False).run()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": args.mode, "params": sum(p.numel() for p in model.parameters()), "steps": args.steps,
            "seconds": time.perf_counter() - t, "extra_MB": (peak - base) / 2 ** 20,
            "memory": "CUDA allocated" if cuda else "peak RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=("on", "off"), help=argparse.SUPPRESS)  # one process's measurement
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    res = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                             capture_output=True, text=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
        print(res[mode])
    off, on = res["off"], res["on"]
    ratio, speed = on["extra_MB"] / off["extra_MB"], on["seconds"] / off["seconds"]
    print(f"{on['params']} parameters, {on['steps']} steps: {on['memory']} over the start {off['extra_MB']:.0f} MB -> "
          f"{on['extra_MB']:.0f} MB ({ratio:.2f}x), time {speed:.2f}x")


if __name__ == "__main__":
    main()
