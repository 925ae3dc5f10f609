"""GradNorm (p = 2) per-sample gradient norms: ghost norms from one batched backward vs the
reference loop (one backward per sample, open-unlearning's way), on the same batch of a random
Llama; prints both times, their ratio and the largest relative difference of the norms.

    python benchmarks/bench_gradnorm.py                   # CPU, a small Llama
    python benchmarks/bench_gradnorm.py --device cuda --hidden 1024 --layers 8 --vocab 32000
    python benchmarks/bench_gradnorm.py --quick           # tiny, for the test suite
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastgeffect.eval.gradnorm import per_sample_grad_norms


def _timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tied", action="store_true", help="tie the input embedding and the LM head")
    ap.add_argument("--quick", action="store_true", help="a tiny model and batch (the test suite's run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.vocab, a.batch, a.seq = 16, 1, 50, 3, 12
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=a.tied)
    model = LlamaForCausalLM(cfg).to(a.device).eval()
    x = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)

    def losses():
        lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
        return -lp.gather(-1, x[:, 1:, None])[..., 0].mean(-1)

    per_sample_grad_norms(model, losses)  # warm-up
    ghost, t_ghost = _timed(lambda: per_sample_grad_norms(model, losses), a.device)
    loop, t_loop = _timed(lambda: per_sample_grad_norms(model, losses, force_loop=True), a.device)
    diff = float(((ghost["norms"] - loop["norms"]).abs() / loop["norms"].abs().clamp(min=1e-30)).max())
    row = {"batch": a.batch, "seq": a.seq, "tensors": len(ghost["names"]), "ghost s": t_ghost, "loop s": t_loop,
           "loop / ghost": t_loop / t_ghost, "max rel diff": diff, "ghost fallback": ghost["fallback"]}
    print(f"GradNorm p=2 on {a.device}: batch {a.batch} x {a.seq} tokens, {row['tensors']} tensors | ghost "
          f"{t_ghost:.3f} s | loop {t_loop:.3f} s | loop/ghost {row['loop / ghost']:.1f}x | max rel diff {diff:.2e}"
          f" | ghost fallback: {ghost['fallback'] or 'none'}")
    return row


if __name__ == "__main__":
    main()
