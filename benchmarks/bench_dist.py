"""G-effect overhead per unlearning step at 1 and 2 processes, under DDP, FSDP2 and DeepSpeed
ZeRO-3 (CPU gloo; CUDA/NCCL when GPUs exist).

    python benchmarks/bench_dist.py [--steps 4]

Each configuration trains the same tiny Llama (fp32, GA+GD, global batch 8) with and without
G-effects (unlearn + retain risk every step) and prints ms/step and the overhead ratio, in one table.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder, out, every, steps, strategy, q):
    from test_distributed import _data, _model  # the test's tiny data and model
    from fastgeffect.distributed import fully_shard_blocks, shutdown
    from fastgeffect.objectives import get_objective
    from fastgeffect.unlearn import UnlearnConfig, Unlearner

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available()
    accelerator = None
    if strategy == "zero3":  # through accelerate, which starts the process group
        from accelerate import Accelerator, DeepSpeedPlugin
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3, zero3_init_flag=False))
    elif world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    model = _model(folder, torch.float32).to(dev)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    elif strategy == "fsdp2":
        model = fully_shard_blocks(model)
    cfg = UnlearnConfig(epochs=steps, batch_size=8, lr=1e-3, geffect_every=every, geffect_batch=8)
    u = Unlearner(model, get_objective("ga", regularizer="gd"), _data(folder), cfg,
                  Path(out) / f"{strategy}-{world}-{every}", device=dev, progress=False, accelerator=accelerator)
    t = time.perf_counter()
    u.run()
    dt = (time.perf_counter() - t) / u.step
    if rank == 0:
        q.put(dt)
    shutdown()  # all ranks done before the group is torn down


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="epochs of 9 samples (2 steps each)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from test_distributed import _rows
    from fastgeffect.embedded.tokenizer import TokenizerConfig, train_tokenizer

    tmp = tempfile.mkdtemp()
    texts = [r["question"] + " " + r["answer"] for r in _rows(40, 0) + _rows(40, 100) + _rows(40, 200)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300))
    tok.save_pretrained(tmp)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(tmp)
    ctx = mp.get_context("spawn")
    n = 2 if not torch.cuda.is_available() else min(2, torch.cuda.device_count())
    runs = [(1, "none")] + [(n, s) for s in ("ddp", "fsdp2", "zero3") if n > 1]
    try:
        import deepspeed  # noqa: F401
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
            mp.spawn(_worker, args=(world, _port(), tmp, tmp, every, args.steps, strategy, q), nprocs=world,
                     join=True)
            res[every] = q.get()
        print(f"| {world} | {strategy} | {res[0] * 1e3:.1f} | {res[1] * 1e3:.1f} | {res[1] / res[0]:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
