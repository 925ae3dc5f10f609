"""Correctness before timing (docs/design.md §7): every fused kernel and the dot op against float64
references computed on the same device from the same (low-precision) inputs.

Rows: one per (check, shape, dtype) with the relative error of the loss (or of the group sums)
and of each gradient (‖x − x_ref‖ / ‖x_ref‖), the tolerance, and ``ok``. On a GPU the shapes are
the benchmark's real ones (Llama-2-7B / Phi-1.5 LM heads at 8192 tokens, the 7B gradient list);
on CPU tiny ones (the Triton kernels then run in the interpreter).

    python benchmarks/correctness.py --device cpu
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_dot  # noqa: E402
import bench_losses  # noqa: E402

import fastgeffect.ops as ops  # noqa: E402
from fastgeffect.kernels import fused_linear_kl, fused_linear_token_weighted  # noqa: E402
from fastgeffect.losses.kl import kl_terms  # noqa: E402

# loss and gradients of a bf16/fp16 GEMM pipeline against exact arithmetic on the same inputs
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TINY_SHAPES = {"tiny": (32, 500)}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def token_weighted_ref(h, w, labels, ref):
    """The TNPO-weighted NLL of bench_losses in float64."""
    logits = h.double() @ w.double().t()
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return bench_losses.weighted_from_logp(logp, ref.double(), mask)


def kl_ref(h, w, rh, rw):
    """Forward KL(p_ref ‖ p_θ) averaged over rows, in float64."""
    logq = torch.log_softmax(h.double() @ w.double().t(), -1)
    logp = torch.log_softmax(rh.double() @ rw.double().t(), -1)
    return kl_terms(logp, logq).mean()


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


def check_kernels(device: str, shapes: Dict[str, tuple], n_tokens: int, dtypes) -> List[Dict]:
    rows = []
    for name, (hidden, vocab) in shapes.items():
        for dtype in dtypes:
            h, w, labels, ref = bench_losses.make_inputs(n_tokens, hidden, vocab, dtype, device, 0.5)
            loss = fused_linear_token_weighted(h, w, labels, objective="tnpo", ref_logprobs=ref, beta=bench_losses.BETA)
            got = [loss.detach(), *_grads(loss, h, w)]
            h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            loss64 = token_weighted_ref(h64, w64, labels, ref)
            want = [loss64.detach(), *_grads(loss64, h64, w64)]
            rows.append(_row("fused_linear_token_weighted (tnpo)", name, hidden, vocab, n_tokens, dtype, got, want))
            del got, want, h64, w64
            rh, _, _, _ = bench_losses.make_inputs(n_tokens, hidden, vocab, dtype, device, 0.0, seed=1)
            rw = (w.detach() + 0.01 * torch.randn_like(w)).to(dtype)
            loss = fused_linear_kl(h, w, rh.detach(), rw)
            got = [loss.detach(), *_grads(loss, h, w)]
            h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            loss64 = kl_ref(h64, w64, rh.detach(), rw)
            want = [loss64.detach(), *_grads(loss64, h64, w64)]
            rows.append(_row("fused_linear_kl (forward)", name, hidden, vocab, n_tokens, dtype, got, want))
            del h, w, rh, rw, got, want, h64, w64
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _row(check, name, hidden, vocab, n_tokens, dtype, got, want) -> Dict:
    errs = [rel_err(g, r) for g, r in zip(got, want)]
    tol = TOLERANCE[dtype]
    return dict(check=check, shape=f"{name} (H={hidden}, V={vocab}, N={n_tokens})", dtype=_name(dtype),
                loss_err=errs[0], grad_h_err=errs[1], grad_w_err=errs[2], tol=tol,
                ok=all(math.isfinite(e) and e <= tol for e in errs))


def _name(dtype):
    return str(dtype).replace("torch.", "")


def check_dot(device: str, scale: float, dtypes) -> List[Dict]:
    """``ops.dot_accumulate_`` (compiled op where built, else the torch fallback) into float32 and
    float64 accumulators against float64 group sums; the error is relative to Σ|a·b| per group,
    the scale that cancellation in nearly orthogonal gradients has to be measured against."""
    shapes = bench_dot.llama_grad_shapes(scale)
    backend = "ext" if ops.extension_available(device) else "torch"
    rows = []
    for dtype in dtypes:
        ta, tb, gids = bench_dot.make_pairs(shapes, dtype, device)
        exact = torch.zeros(5, dtype=torch.float64, device=device)
        magnitude = torch.zeros_like(exact)
        for a, b, g in zip(ta, tb, gids):
            prod = a.double() * b.double()
            exact[g] += prod.sum()
            magnitude[g] += prod.abs().sum()
            del prod
        previous = ops.get_backend()
        ops.set_backend(backend)
        try:
            for acc_dtype in (torch.float32, torch.float64):
                acc = ops.dot_accumulate_(torch.zeros(5, dtype=acc_dtype, device=device), ta, tb, gids)
                err = float(((acc.double() - exact).abs() / magnitude.clamp_min(1e-300)).max())
                tol = 1e-5 if acc_dtype == torch.float32 else 1e-12
                rows.append(dict(check=f"dot_accumulate_ ({backend}, acc {_name(acc_dtype)})",
                                 shape=f"7B list × {scale:g} ({len(shapes)} tensors)", dtype=_name(dtype),
                                 group_err=err, tol=tol, ok=math.isfinite(err) and err <= tol))
        finally:
            ops.set_backend(previous)
        del ta, tb
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(device: str = "cpu", quick: bool = False, deadline: Optional[float] = None) -> List[Dict]:
    """All checks: real shapes in bf16 and fp16 on CUDA (the first LM-head shape only when
    ``quick``), tiny shapes in float32 and bf16 on CPU; stops (with a row saying so) at ``deadline``."""
    if device == "cuda":
        shapes = dict(list(bench_losses.GPU_SHAPES.items())[:1 if quick else None])
        n_tokens, dtypes, scale = 8192, (torch.bfloat16, torch.float16), 0.25 if quick else 1.0
    else:
        shapes, n_tokens, dtypes, scale = TINY_SHAPES, 64, (torch.float32, torch.bfloat16), 1 / 256
    rows = []
    for name, shape in shapes.items():
        if deadline is not None and time.perf_counter() > deadline:
            rows.append(dict(check="fused kernels", shape=name, skipped="time budget used up", ok=False))
            continue
        rows += check_kernels(device, {name: shape}, n_tokens, dtypes)
    if deadline is not None and time.perf_counter() > deadline:
        rows.append(dict(check="dot_accumulate_", skipped="time budget used up", ok=False))
    else:
        rows += check_dot(device, scale, dtypes)
    return rows


def format_table(rows: List[Dict]) -> str:
    lines = ["| check | shape | dtype | loss / group err | grad hidden err | grad weight err | tol | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['check']} | {r.get('shape', '')} | | skipped: {r['skipped']} | | | | no |")
            continue
        first = r.get("loss_err", r.get("group_err"))
        rest = [f"{r[k]:.1e}" if k in r else "" for k in ("grad_h_err", "grad_w_err")]
        lines.append(f"| {r['check']} | {r['shape']} | {r['dtype']} | {first:.1e} | {rest[0]} | {rest[1]} | "
                     f"{r['tol']:.0e} | {'yes' if r['ok'] else '**NO**'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(format_table(run(a.device, a.quick)))


if __name__ == "__main__":
    main()
