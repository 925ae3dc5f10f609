"""G-effect overhead per unlearning step, 1 and 2 processes, DDP / FSDP2 / DeepSpeed ZeRO-3.

CPU processes talk over gloo; on GPUs, NCCL.

    python benchmarks/bench_dist.py [--steps 4] [--size tiny]

Each configuration trains the embedded target (``fastgeffect.embedded``, built once into the cache,
``$FASTGEFFECT_CACHE`` or ``~/.cache/fastgeffect``) on its forget10 split (fp32, GA+GD, global
batch 4) with and without G-effects (unlearn + retain risk every step) and prints ms/step and the
overhead ratio, in one table.
"""
import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastgeffect.data.unlearning import load_unlearning_data  # noqa: E402
from fastgeffect.distributed import fully_shard_blocks, shutdown  # noqa: E402
from fastgeffect.embedded import SIZES, build_embedded  # noqa: E402
from fastgeffect.objectives import get_objective  # noqa: E402
from fastgeffect.unlearn import UnlearnConfig, Unlearner  # noqa: E402

BATCH = 4  # divisible by 2 processes


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, size, out, every, epochs, strategy, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    accelerator = None
    if strategy == "zero3":  # through accelerate, which starts the process group
        from accelerate import Accelerator, DeepSpeedPlugin  # optional: only for the ZeRO-3 row
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3, zero3_init_flag=False))
    elif world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    emb = build_embedded(size=size)  # built by the parent: read from the cache
    data = load_unlearning_data(emb.data_dir, emb.forget_split, emb.tokenizer, emb.template, emb.max_length)
    model = emb.load_target().float().to(dev)
    model.config.use_cache = False
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    elif strategy == "fsdp2":
        model = fully_shard_blocks(model)
    cfg = UnlearnConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, geffect_every=every, geffect_batch=BATCH)
    u = Unlearner(model, get_objective("ga", regularizer="gd"), data, cfg,
                  Path(out) / f"{strategy}-{world}-{every}", device=dev, progress=False, accelerator=accelerator)
    t = time.perf_counter()
    u.run()
    dt = (time.perf_counter() - t) / u.step
    if rank == 0:
        q.put(dt)
    shutdown()  # all ranks done before the group is torn down


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="epochs over the forget split")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES), help="embedded target size")
    args = ap.parse_args()
    build_embedded(size=args.size)
    tmp = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    n = 2 if not torch.cuda.is_available() else min(2, torch.cuda.device_count())
    runs = [(1, "none")] + [(n, s) for s in ("ddp", "fsdp2", "zero3") if n > 1]
    try:
        import deepspeed  # noqa: F401  (optional: only for the ZeRO-3 row)
    except ImportError:
        runs = [r for r in runs if r[1] != "zero3"]
        print("(DeepSpeed not installed: no ZeRO-3 row)")
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (gloo)'}")
    print("| processes | sharding | ms/step without G-effects | ms/step with G-effects | overhead |")
    print("|---|---|---|---|---|")
    for world, strategy in runs:
        res = {}
        for every in (0, 1):
            q = ctx.SimpleQueue()
            mp.spawn(_worker, args=(world, _port(), args.size, tmp, every, args.steps, strategy, q), nprocs=world,
                     join=True)
            res[every] = q.get()
        print(f"| {world} | {strategy} | {res[0] * 1e3:.1f} | {res[1] * 1e3:.1f} | {res[1] / res[0]:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
