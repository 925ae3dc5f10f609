"""Evaluation speed: batched PS search vs per-sample loops, and TOFU evaluator throughput.

The embedded target (``fastgeffect.embedded``: generated fictitious authors, a tiny Llama that
memorised them, cached on disk) is evaluated on its forget set; PS-perturb (the paraphrased
question, so searches end at intermediate prefixes) is measured three ways in the same run: the
batched binary search (one generation call per search step for the whole set), the same search
one sample at a time, and UWC's per-sample linear scan. Target: batched ≥ 5× faster than the
per-sample loop. Then ``evaluate_set`` throughput (samples/s, with and without generation) on the
forget set.

    python benchmarks/bench_eval.py                  # CPU, the default embedded target (40 forget rows)
    python benchmarks/bench_eval.py --device cuda    # GPU
    python benchmarks/bench_eval.py --size tiny      # a quick check of the script (5 forget rows)

The first call builds the embedded target into the cache (``$FASTGEFFECT_CACHE``, default
``~/.cache/fastgeffect``); later calls reuse it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgeffect.data.tofu import load_tofu_split  # noqa: E402
from fastgeffect.embedded import SIZES, build_embedded  # noqa: E402
from fastgeffect.eval import evaluate_set, ps_scores  # noqa: E402


def _timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def run(device: str = "cpu", size: str = "default", batch_size: int = 64):
    emb = build_embedded(size=size)
    tok, tpl = emb.tokenizer, emb.template
    recs = load_tofu_split(f"{emb.forget_split}_perturbed", emb.data_dir)
    model = emb.load_target().to(device)
    key = "paraphrased_question"
    ps_scores(model, tok, tpl, recs[:2], question_key=key)  # warm-up
    t_batched, batched = _timed(lambda: ps_scores(model, tok, tpl, recs, question_key=key, batch_size=batch_size),
                                device)
    t_single, single = _timed(lambda: [ps_scores(model, tok, tpl, [r], question_key=key, batch_size=1) for r in recs],
                              device)
    t_linear, linear = _timed(lambda: [ps_scores(model, tok, tpl, [r], question_key=key, search="linear", batch_size=1)
                                       for r in recs], device)
    assert batched["scores"] == [s["scores"][0] for s in single]
    rows = [
        {"bench": "PS-perturb batched binary search", "samples": len(recs), "seconds": t_batched,
         "generate_calls": batched["generate_calls"], "PS": batched["ps"], "speedup": 1.0},
        {"bench": "PS-perturb per-sample binary search", "samples": len(recs), "seconds": t_single,
         "generate_calls": sum(s["generate_calls"] for s in single), "PS": batched["ps"],
         "speedup": t_single / t_batched},
        {"bench": "PS-perturb per-sample linear scan (UWC script)", "samples": len(recs), "seconds": t_linear,
         "generate_calls": sum(s["generate_calls"] for s in linear),
         "PS": sum(s["ps"] for s in linear) / len(linear), "speedup": t_linear / t_batched},
    ]
    for gen in (False, True):
        t, _ = _timed(lambda: evaluate_set(model, tok, tpl, recs, "forget", batch_size=batch_size, generate=gen),
                      device)
        rows.append({"bench": f"evaluate_set forget ({'with' if gen else 'no'} generation)", "samples": len(recs),
                     "seconds": t, "samples_per_s": len(recs) / t})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="default", choices=sorted(SIZES), help="embedded target size")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (tiny models: 1)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows = run(device=args.device, size=args.size)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.threads} thread)"
    print(f"device: {name}")
    for r in rows:
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
