"""Peak memory and forward+backward time of the token-weighted unlearning losses (docs/design.md §7).

Compares, in one run and on the same inputs, ways to compute a token-weighted log-likelihood
(TNPO by default: ``mean_t w_t·logp_t`` with ``w_t = 2σ(β(logp_t − logp_ref_t))`` detached)
from final hidden states (N, H) and an LM head (V, H):

- ``eager``: materialised logits + fp32 log-softmax (what ``fastgeffect.losses`` does on
  ``model(...).logits``);
- ``compile``: ``torch.compile`` of the eager function (where it compiles);
- ``torch_chunked``: ``torch.nn.functional.linear_cross_entropy`` with
  ``LinearCrossEntropyOptions`` (torch's chunked path), ``reduction="none"``;
- ``liger``: Liger-Kernel's fused linear cross entropy, ``reduction="none"`` (CUDA only);
- ``cce``: Cut Cross-Entropy, ``reduction="none"`` (CUDA only);
- ``ours``: ``fastgeffect.kernels.fused_linear_token_weighted`` (Triton on CUDA, chunked torch on CPU).
The per-token methods get their weights from ``-ce`` detached, exactly like ours. ``floor`` is
the three LM-head matmuls a fwd+bwd needs (time only). Peak memory is the extra memory over the
inputs during forward+backward (gradients included): on CUDA ``max_memory_allocated``; on CPU
each method runs in its own process and the peak RSS (VmHWM, reset after set-up) is read.

Run: ``python benchmarks/bench_losses.py`` (CPU, small shapes) or ``--device cuda``; as a
pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (``test_bench_kernels.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fastgeffect.kernels import fused_linear_token_weighted  # noqa: E402

METHODS = ("eager", "compile", "torch_chunked", "liger", "cce", "ours", "floor")
BETA = 4.0  # TNPO default

GPU_SHAPES = {"llama2-7b": (4096, 32000), "phi-1.5": (2048, 51200)}
CPU_SHAPES = {"cpu-v32000": (256, 32000), "cpu-v8000": (128, 8000)}


def make_inputs(n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, masked: float, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(n_tokens, hidden, generator=gen)).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / math.sqrt(hidden)).to(device, dtype)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    labels[torch.rand(n_tokens, generator=gen) < masked] = -100
    ref = (-torch.rand(n_tokens, generator=gen) * 8).to(device)
    return h.requires_grad_(), w.requires_grad_(), labels.to(device), ref


def weighted_from_logp(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = 2.0 * torch.sigmoid(BETA * (logp.detach() - ref))
    return torch.where(mask, w * logp, torch.zeros_like(logp)).sum() / mask.sum()


def eager_loss(h, w, labels, ref):
    logits = h @ w.t()
    logp = -F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    return weighted_from_logp(logp, ref, labels != -100)


def loss_fn(method: str, device: str) -> Optional[Callable]:
    """The loss function of a method, or raise ``RuntimeError`` with the reason it cannot run."""
    if method == "eager":
        return eager_loss
    if method == "compile":
        return torch.compile(eager_loss, dynamic=False)
    if method == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise RuntimeError(f"torch {torch.__version__} has no chunked linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions()

        def f(h, w, labels, ref):
            ce = F.linear_cross_entropy(h, w, labels, reduction="none", ignore_index=-100, options=opts)
            return weighted_from_logp(-ce.float(), ref, labels != -100)
        return f
    if method == "liger":
        if device != "cuda":
            raise RuntimeError("Liger-Kernel's Triton kernels need CUDA (the interpreter would not be a timing)")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError as e:
            raise RuntimeError(f"liger-kernel not installed ({e})") from e

        def f(h, w, labels, ref):
            ce = liger_fused_linear_cross_entropy(h, w, labels, reduction="none")
            return weighted_from_logp(-ce.float(), ref, labels != -100)
        return f
    if method == "cce":
        if device != "cuda":
            raise RuntimeError("Cut Cross-Entropy's kernels need CUDA")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise RuntimeError(f"cut-cross-entropy not installed ({e})") from e

        def f(h, w, labels, ref):
            ce = linear_cross_entropy(h, w, labels, reduction="none")
            return weighted_from_logp(-ce.float(), ref, labels != -100)
        return f
    if method == "ours":
        return lambda h, w, labels, ref: fused_linear_token_weighted(h, w, labels, objective="tnpo",
                                                                   ref_logprobs=ref, beta=BETA)
    raise ValueError(f"unknown method {method!r}")


def floor_step(h, w, labels, ref):
    """The three LM-head matmuls of a fwd+bwd (logits, d hidden, d weight): the time floor."""
    with torch.no_grad():
        logits = h @ w.t()
        _ = logits @ w
        _ = logits.t() @ h


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def median_ms(step: Callable, reps: int, device: str) -> float:
    """Median wall time of ``reps`` calls of ``step`` in ms, the device synchronised around each."""
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(method: str, n_tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: str,
            masked: float, reps: int) -> Dict:
    """Time (median ms, fwd+bwd) and extra peak memory (MB) of one method, in this process."""
    h, w, labels, ref = make_inputs(n_tokens, hidden, vocab, dtype, device, masked)
    if method == "floor":
        step = lambda: floor_step(h, w, labels, ref)  # noqa: E731
    else:
        fn = loss_fn(method, device)

        def step():
            h.grad = w.grad = None
            loss = fn(h, w, labels, ref)
            loss.backward()
            return loss
    # first call: compilation / autotuning / allocator warm-up, and the peak-memory measurement
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass
        base = _rss_kb("VmRSS:") * 1024
    out = step()
    _sync(device)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kb("VmHWM:") * 1024) - base
    loss = float(out) if out is not None else float("nan")
    step()  # a second warm-up (compile may recompile once for grads already allocated)
    ms = median_ms(step, reps, device)
    del h, w
    return dict(method=method, ms=ms, peak_mb=None if method == "floor" else peak / 2**20,
                loss=loss)


def _measure_in_subprocess(method, n_tokens, hidden, vocab, dtype, masked, reps, timeout=900) -> Dict:
    """CPU peak memory is only meaningful per process: run one method in a fresh interpreter."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # large buffers go back to the OS when freed
    env.setdefault("OMP_NUM_THREADS", str(min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--tokens", str(n_tokens),
           "--hidden", str(hidden), "--vocab", str(vocab), "--dtype", str(dtype).replace("torch.", ""),
           "--masked", str(masked), "--reps", str(reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(method=method, skipped=err[:200])
    return json.loads(lines[-1])


def run(device: str = "cpu", shapes: Optional[Dict[str, tuple]] = None, n_tokens: Optional[int] = None,
        dtype: Optional[torch.dtype] = None, methods=METHODS, masked: float = 0.5, reps: Optional[int] = None,
        subprocess_cpu: bool = True, deadline: Optional[float] = None) -> List[Dict]:
    """One row per (shape, method) with ms, peak_mb, and ratios against eager (and the floor);
    methods not started by ``deadline`` (a ``time.perf_counter()`` value) are rows saying so."""
    shapes = shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    n_tokens = n_tokens or (8192 if device == "cuda" else 1024)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    reps = reps or (5 if device == "cuda" else 3)
    rows = []
    for name, (hidden, vocab) in shapes.items():
        results = {}
        for method in methods:
            if deadline is not None and time.perf_counter() > deadline:
                results[method] = dict(method=method, skipped="time budget used up")
                continue
            try:
                if device == "cpu" and subprocess_cpu:
                    r = _measure_in_subprocess(method, n_tokens, hidden, vocab, dtype, masked, reps)
                else:
                    r = measure(method, n_tokens, hidden, vocab, dtype, device, masked, reps)
            except Exception as e:  # a competitor that does not run here is reported, not fatal
                skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
                r = dict(method=method, skipped=skipped)
            if device == "cuda":
                torch.cuda.empty_cache()
            results[method] = r
        eager, floor = results.get("eager", {}), results.get("floor", {})
        for r in results.values():
            r.update(shape=name, hidden=hidden, vocab=vocab, tokens=n_tokens, dtype=str(dtype).replace("torch.", ""),
                     device=device, masked=masked)
            if "ms" in r and "ms" in eager:
                r["time_vs_eager"] = r["ms"] / eager["ms"]
            if r.get("peak_mb") is not None and eager.get("peak_mb"):
                r["mem_vs_eager"] = r["peak_mb"] / eager["peak_mb"]
            if "ms" in r and "ms" in floor:
                r["time_vs_floor"] = r["ms"] / floor["ms"]
            rows.append(r)
        ours = results.get("ours", {})
        for other in ("liger", "cce", "torch_chunked"):
            o = results.get(other, {})
            if "ms" in ours and "ms" in o:
                ours[f"time_vs_{other}"] = ours["ms"] / o["ms"]
            if ours.get("peak_mb") and o.get("peak_mb"):
                ours[f"mem_vs_{other}"] = ours["peak_mb"] / o["peak_mb"]
    return rows


def format_table(rows: List[Dict]) -> str:
    def f(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else ""

    lines = ["| shape (H, V) | tokens | dtype | method | ms fwd+bwd | peak MB | time × eager | mem × eager | "
             "time × floor | loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['shape']} ({r['hidden']}, {r['vocab']}) | {r['tokens']} | {r['dtype']} | {r['method']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"{head} {r['ms']:.1f} | {f(r, 'peak_mb', '.0f')} | {f(r, 'time_vs_eager', '.2f')} | "
                     f"{f(r, 'mem_vs_eager', '.2f')} | {f(r, 'time_vs_floor', '.2f')} | {f(r, 'loss', '.4f')} |")
    extra = [r for r in rows if r["method"] == "ours"]
    for r in extra:
        ratios = ", ".join(f"{k.replace('_vs_', ' × ')} = {v:.2f}" for k, v in r.items()
                           if k.startswith(("time_vs_", "mem_vs_"))
                           and k.split("_vs_")[1] in ("liger", "cce", "torch_chunked"))
        if ratios:
            lines.append(f"\nours at {r['shape']}: {ratios}")
    return "\n".join(lines)


def run_kl(device: str = "cpu", shapes: Optional[Dict[str, tuple]] = None, n_tokens: Optional[int] = None,
           dtype: Optional[torch.dtype] = None, reps: Optional[int] = None,
           deadline: Optional[float] = None) -> List[Dict]:
    """Forward KL(p_ref ‖ p_θ) over all rows: eager (two materialised fp32 log-softmaxes, as
    ``fastgeffect.losses.kl``) vs ours (``fused_linear_kl``); in-process (CUDA peak memory).
    Shapes not started by ``deadline`` are left out."""
    from fastgeffect import losses
    from fastgeffect.kernels import fused_linear_kl
    shapes = shapes or (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    n_tokens = n_tokens or (8192 if device == "cuda" else 1024)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    reps = reps or (5 if device == "cuda" else 3)
    rows = []
    for name, (hidden, vocab) in shapes.items():
        if deadline is not None and time.perf_counter() > deadline:
            break
        h, w, _, _ = make_inputs(n_tokens, hidden, vocab, dtype, device, 0.0)
        rh, _, _, _ = make_inputs(n_tokens, hidden, vocab, dtype, device, 0.0, seed=1)
        rh = rh.detach()
        rw = w.detach().clone()
        fns = {"eager": lambda: losses.kl((h @ w.t())[None], (rh @ rw.t())[None]),
               "ours": lambda: fused_linear_kl(h, w, rh, rw)}
        res = {}
        for method, fn in fns.items():
            def step():
                h.grad = w.grad = None
                loss = fn()
                loss.backward()
                return loss
            gc.collect()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            loss = float(step())
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
            ms = median_ms(step, reps, device)
            res[method] = dict(method=f"kl_{method}", ms=ms, peak_mb=peak, loss=loss)
        for r in res.values():
            r.update(shape=name, hidden=hidden, vocab=vocab, tokens=n_tokens, dtype=str(dtype).replace("torch.", ""),
                     device=device, time_vs_eager=r["ms"] / res["eager"]["ms"])
            if r["peak_mb"] is not None:
                r["mem_vs_eager"] = r["peak_mb"] / res["eager"]["peak_mb"]
            rows.append(r)
        del h, w, rh, rw
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


CHUNK_SHAPES = {"gpu": ("llama3-8b", 4096, 128256), "cpu": ("cpu-v32000", 256, 32000)}


def run_chunks(device: str = "cpu", shape: Optional[tuple] = None, n_tokens: Optional[int] = None,
               dtype: Optional[torch.dtype] = None, rows_list=None, reps: Optional[int] = None,
               deadline: Optional[float] = None) -> List[Dict]:
    """The fused loss (ours, TNPO weights) at one large-vocab shape with the rows per chunk forced
    to each of ``rows_list`` and once at the default (``kernels.common.chunk_rows``): every chunk's
    dW GEMM re-reads the fp32 (V × H) accumulator, so small chunks at large V cost time; the
    default should sit at or near the fastest. Chunk sizes not started by ``deadline`` are left out."""
    from fastgeffect.kernels import common
    name, hidden, vocab = shape or CHUNK_SHAPES["gpu" if device == "cuda" else "cpu"]
    n_tokens = n_tokens or (8192 if device == "cuda" else 1024)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    reps = reps or (5 if device == "cuda" else 2)
    default = common.chunk_rows(n_tokens, vocab, torch.device(device))
    rows_list = rows_list or ((256, 512, 1024, 2048, 4096) if device == "cuda" else (16, 64, 256))
    h, w, labels, ref = make_inputs(n_tokens, hidden, vocab, dtype, device, 0.0)
    rows = []
    for chunk in [None, *sorted(set(rows_list) - {default})]:
        if deadline is not None and time.perf_counter() > deadline:
            break

        def step():
            h.grad = w.grad = None
            loss = fused_linear_token_weighted(h, w, labels, objective="tnpo", ref_logprobs=ref, beta=BETA,
                                             chunk_size=chunk)
            loss.backward()
            return loss
        step()  # compile / warm-up
        ms = median_ms(step, reps, device)
        rows.append(dict(shape=name, hidden=hidden, vocab=vocab, tokens=n_tokens,
                         dtype=str(dtype).replace("torch.", ""), device=device,
                         chunk_rows=chunk or default, default=chunk is None,
                         ms=ms))
    base = rows[0]["ms"] if rows else None
    for r in rows:
        r["time_vs_default"] = r["ms"] / base
    return rows


def format_chunks(rows: List[Dict]) -> str:
    lines = ["| shape (H, V) | tokens | dtype | rows per chunk | ms fwd+bwd | time × default |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['chunk_rows']} (default)" if r["default"] else str(r["chunk_rows"])
        lines.append(f"| {r['shape']} ({r['hidden']}, {r['vocab']}) | {r['tokens']} | {r['dtype']} | {label} | "
                     f"{r['ms']:.1f} | {r['time_vs_default']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--masked", type=float, default=0.5, help="fraction of -100 labels (question + padding)")
    p.add_argument("--reps", type=int)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows as JSON to this path")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    if a.worker:  # one method in this process (CPU peak-memory isolation)
        r = measure(a.worker, a.tokens, a.hidden, a.vocab, dtype, "cpu", a.masked, a.reps)
        print(json.dumps(r))
        return
    shapes = {"custom": (a.hidden, a.vocab)} if a.hidden and a.vocab else None
    rows = run(a.device, shapes, a.tokens, dtype, tuple(a.methods.split(",")), a.masked, a.reps)
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
