"""G-effect engine benchmark (docs/design.md §4.1, §4.3, §7).

One measurement = the G-effects of the objective gradient (in p.grad) against two risks (forget
and retain NLL), split into the paper groups. Compared in one run:

  ref     risk forward + backward only, each gradient dropped as soon as it is made (the floor:
          activations and one transient parameter gradient; no G-effect)
  naive   flat copies: cat(objective grads), zero_grad, risk backward, cat(risk grads), dot
  paper   the paper's code: three gradient copies kept on the host (objective, two risks), moved
          there every step, dotted there
  engine  fastgeffect.GEffect.measure (streaming hooks + dot_accumulate_)
  update  the same with ``optimizer=`` an AdamW some steps in and ``max_grad_norm=1``: the update
          effects too, the AdamW step predicted per parameter inside the hooks (issue 17)

and per-sample PG-effects at B=16: ghost dot products (closed forms, with and without the
consistency check) vs two naive loops
(``loop-retain``: one backward per sample through the batch graph; ``loop-b1``: one forward and
backward per sample at batch size 1).

Memory: on CUDA, torch.cuda.max_memory_allocated; on CPU, where torch keeps no allocator
statistics, the peak of live bytes of tensor storages created during the measurement, tracked
exactly with a TorchDispatchMode (process RSS was tried first: ±20 MiB noise at this size).
"extra" is the peak during the measurement above the memory held before it (model, objective
gradients); host copies kept between steps by the paper style are added as counted bytes.
Run ``python benchmarks/bench_geffect.py --help`` for size flags; ``--preset llama7b`` is the
Llama-2-7B shape (use on a GPU).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastgeffect.losses as L  # noqa: E402
import fastgeffect.ops as ops  # noqa: E402
from fastgeffect.geffect import GEffect, GradientDotStream, grouped_dots, per_sample_geffects  # noqa: E402

PRESETS = {
    # ~100M parameters, Llama-shaped, with the vocabulary share of a 7B model's order (8k x 768)
    "cpu100m": dict(hidden=768, layers=12, inter=2048, heads=12, vocab=8192, batch=4, seq=64, ps_seq=32,
                    dtype="float32"),
    "llama7b": dict(hidden=4096, layers=32, inter=11008, heads=32, vocab=32000, batch=4, seq=512, ps_seq=128,
                    dtype="bfloat16"),
}


# ---- memory probes ---------------------------------------------------------------------------------

class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created while active and still alive: an exact
    tensor-level peak on CPU, where torch keeps no allocator statistics (autograd's CPU backward
    runs on the calling thread, under the same mode)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (StorageWeakRef, nbytes)
        self.current = self.peak = 0

    def _sweep(self):
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        # outputs aliasing an input (views, in-place ops) are no new memory
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in self.live and key not in inputs and st.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class Peak:
    """Peak memory above the level at entry, in bytes: torch.cuda.max_memory_allocated on CUDA,
    live bytes of tensors created inside the block on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.mode = _LiveBytes()
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.mode.__exit__(*exc)
            self.extra = self.mode.peak


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- model and data ----------------------------------------------------------------------------------

def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, args.ps_seq) + 8)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def batch(b, t, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 4] = -100  # question tokens
    return ids.to(device), labels.to(device)


def nll_of(model, ids, labels):
    return L.nll(model(input_ids=ids).logits, labels)


# ---- the four ways to measure ------------------------------------------------------------------------

def paper_groups(engine):
    return engine.grouping.group_ids, len(engine.group_names)


def run_ref(model, risks, params):
    """Risk forward + backward with every gradient dropped at once: the activation floor."""
    with GradientDotStream(params, [0] * len(params), 1, partners=[None] * len(params)) as s:
        for fn in risks.values():
            s.backward(fn())
    return None


def run_naive(model, risks, params, gids, n_groups):
    sizes = [p.numel() for p in params]
    g_u = torch.cat([p.grad.reshape(-1) for p in params])
    for p in params:
        p.grad = None
    out = {}
    for name, fn in risks.items():
        fn().backward()
        g_r = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        dots = torch.stack([a.double() @ b.double() for a, b in zip(g_r.split(sizes), g_u.split(sizes))])
        out[name] = torch.zeros(n_groups, dtype=torch.float64, device=dots.device).index_add_(
            0, torch.tensor(gids, device=dots.device), dots).cpu()
        del g_r
    for p, g in zip(params, g_u.split(sizes)):
        p.grad = g.view_as(p).clone()
    return out


class PaperStyle:
    """Three gradient copies on the host (objective, forget risk, retain risk), EMA-smoothed, as
    in the paper's code; the copies persist between steps."""

    def __init__(self, params, names, momentum=0.0):
        self.params, self.names, self.m = params, names, momentum
        self.bufs = {}

    def host_bytes(self):
        return sum(b.numel() * b.element_size() for b in self.bufs.values())

    def _update(self, key):
        flat = torch.cat([p.grad.detach().reshape(-1).to("cpu") for p in self.params])
        if key not in self.bufs:
            self.bufs[key] = flat.clone() if flat.device.type == "cpu" else flat
        else:
            self.bufs[key].mul_(self.m).add_(flat, alpha=1 - self.m)

    def __call__(self, risks, gids, n_groups):
        sizes = [p.numel() for p in self.params]
        self._update("objective")
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        out = {}
        for name, fn in risks.items():
            fn().backward()
            self._update(name)
            for p in self.params:
                p.grad = None
            dots = torch.stack([a.double() @ b.double() for a, b in
                                zip(self.bufs[name].split(sizes), self.bufs["objective"].split(sizes))])
            out[name] = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, torch.tensor(gids), dots)
        for p, g in zip(self.params, saved):
            p.grad = g
        return out


class TimedOps:
    """Wraps fastgeffect.ops.dot_accumulate_ to time the accumulation itself (synchronised)."""

    def __init__(self, device):
        self.device, self.seconds, self.calls = device, 0.0, 0
        self.inner = ops.dot_accumulate_

    def __call__(self, *a, **k):
        sync(self.device)
        t = time.perf_counter()
        r = self.inner(*a, **k)
        sync(self.device)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return r

    def __enter__(self):
        ops.dot_accumulate_ = self
        return self

    def __exit__(self, *exc):
        ops.dot_accumulate_ = self.inner


def timed(device, fn, repeats):
    best = math.inf
    out = None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


# ---- per-sample ------------------------------------------------------------------------------------

def per_sample_terms(model, ids, labels, denom):
    lp = L.token_logprobs(model(input_ids=ids).logits, labels)
    mask = L.valid_mask(labels)
    return (lp * mask).sum(1) / denom


def loop_retain(model, params, risk, ids, labels, denom, acc_dtype):
    G = torch.autograd.grad(risk(), params, allow_unused=True)
    terms = per_sample_terms(model, ids, labels, denom)
    vals = []
    for i in range(terms.shape[0]):
        g = torch.autograd.grad(terms[i], params, retain_graph=True, allow_unused=True)
        vals.append(grouped_dots(g, G, [0] * len(params), 1, acc_dtype)[0])
    return torch.stack(vals)


def loop_b1(model, params, risk, ids, labels, denom, acc_dtype):
    G = torch.autograd.grad(risk(), params, allow_unused=True)
    vals = []
    for i in range(ids.shape[0]):
        term = per_sample_terms(model, ids[i:i + 1], labels[i:i + 1], denom)[0]
        g = torch.autograd.grad(term, params, allow_unused=True)
        vals.append(grouped_dots(g, G, [0] * len(params), 1, acc_dtype)[0])
    return torch.stack(vals)


# ---- main ---------------------------------------------------------------------------------------

SIZES = ("hidden", "layers", "inter", "heads", "vocab", "batch", "seq", "ps_seq")
UPDATE = "engine + update effects (AdamW)"


def run(device=None, preset=None, repeats=3, skip=(), ps_batch=16, dtype=None, deadline=None, **sizes):
    """Rows of the two tables (``table`` = "measure" / "accumulation" / "per-sample"). ``preset``
    defaults to llama7b on CUDA, cpu100m otherwise; ``sizes`` (any of ``SIZES``) override it;
    ``skip`` names parts to leave out (naive, paper, update, per-sample, loop-retain, loop-b1); the
    per-sample part is also left out once ``deadline`` (a ``time.perf_counter()`` value) has passed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = dict(PRESETS[preset or ("llama7b" if device.type == "cuda" else "cpu100m")])
    cfg.update({k: v for k, v in sizes.items() if v is not None})
    if dtype is not None:
        cfg["dtype"] = dtype
    args = argparse.Namespace(ps_batch=ps_batch, repeats=repeats, **cfg)
    dtype = getattr(torch, args.dtype)

    model = build(args, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# bench_geffect on {card}: Llama-shaped {n_params / 1e6:.1f}M params {args.dtype}, hidden {args.hidden}, "
          f"{args.layers} blocks, vocab {args.vocab}; measure batch {args.batch}x{args.seq}, two risks")
    print(f"# one gradient copy = {grad_bytes / 2**20:.0f} MiB; largest parameter = {largest / 2**20:.1f} MiB "
          f"({100 * largest / grad_bytes:.1f}%); memory probe: "
          + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
             "peak live bytes of tensors created during the measurement (TorchDispatchMode)"))

    forget, retain = batch(args.batch, args.seq, args.vocab, device, 1), batch(args.batch, args.seq, args.vocab,
                                                                               device, 2)
    risks = {"unlearn": lambda: nll_of(model, *forget), "retain": lambda: nll_of(model, *retain)}
    engine = GEffect(model)
    gids, n_groups = paper_groups(engine)

    def objective_backward():
        model.zero_grad(set_to_none=True)
        ref = torch.full(forget[1].shape, -3.0, device=device)
        L.tnpo(model(input_ids=forget[0]).logits, forget[1], ref).backward()

    objective_backward()
    methods = [("ref (fwd+bwd only)", lambda: run_ref(model, risks, params), lambda: 0),
               ("engine", lambda: engine.measure(risks), lambda: 0)]
    if "update" not in skip:  # AdamW with state (two steps in), allocated before any measurement
        adamw = torch.optim.AdamW(params, lr=1e-6)
        for _ in range(2):
            adamw.step()
            objective_backward()
        methods.append((UPDATE, lambda: engine.measure(risks, optimizer=adamw, max_grad_norm=1.0), lambda: 0))
    if "naive" not in skip:
        methods.append(("naive flat copies", lambda: run_naive(model, risks, params, gids, n_groups), lambda: 0))
    if "paper" not in skip:
        paper = PaperStyle(params, list(risks))
        methods.append(("paper (3 host copies)", lambda: paper(risks, gids, n_groups), paper.host_bytes))
    outputs, peaks, times = {}, {name: math.inf for name, _, _ in methods}, {name: math.inf for name, _, _ in methods}
    for _name, fn, _ in methods:
        fn()  # warm-up (also allocates the paper style's persistent host copies)
    for _ in range(1 if device.type == "cpu" else 2):  # exact on CPU; on CUDA the lower of two rounds
        for name, fn, _ in methods:
            with Peak(device) as pk:
                outputs[name] = fn()
            peaks[name] = min(peaks[name], pk.extra)
    for _ in range(args.repeats):  # round-robin, best of: the machine may be shared
        for name, fn, _ in methods:
            times[name] = min(times[name], timed(device, fn, 1)[0])
    rows = [(name, peaks[name], host(), times[name]) for name, _, host in methods]
    # the accumulation's share of the risk backward, both timed in the same rounds
    acc_seconds, tb = math.inf, math.inf
    for _ in range(args.repeats):
        with TimedOps(device) as to:
            engine.measure(risks)
        acc_seconds, acc_calls = min(acc_seconds, to.seconds), to.calls
        with GradientDotStream(params, [0] * len(params), 1, partners=[None] * len(params)) as s:
            t_b = 0.0
            for fn in risks.values():
                value = fn()
                sync(device)
                t0 = time.perf_counter()
                s.backward(value)
                sync(device)
                t_b += time.perf_counter() - t0
        tb = min(tb, t_b)
    res_engine = outputs["engine"]
    res_naive, res_paper = outputs.get("naive flat copies"), outputs.get("paper (3 host copies)")
    # agreement
    for name in risks:
        e = torch.tensor([res_engine[name].groups[g] for g in engine.group_names], dtype=torch.float64)
        for label, other in (("naive", res_naive), ("paper", res_paper)):
            if other is not None:
                err = float((e - other[name]).abs().max() / other[name].abs().sum().clamp_min(1e-30))
                print(f"# {name}: engine vs {label} max group diff / sum|groups| = {err:.1e}")

    ref_t, ref_mem = rows[0][3], rows[0][1]
    out = [dict(table="measure", method=name, extra_mib=extra / 2**20, beyond_ref_mib=(extra - ref_mem + host) / 2**20,
                beyond_ref_pct=100 * (extra - ref_mem + host) / grad_bytes, host_mib=host / 2**20, s=t,
                vs_ref=t / ref_t) for name, extra, host, t in rows]
    out.append(dict(table="accumulation", s=acc_seconds, calls=acc_calls, pct_of_backward=100 * acc_seconds / tb,
                    backward_s=tb))
    if UPDATE in times:
        out.append(dict(table="update", pct_time=100 * (times[UPDATE] / times["engine"] - 1),
                        extra_mib=(peaks[UPDATE] - peaks["engine"]) / 2**20,
                        pct_of_copy=100 * (peaks[UPDATE] - peaks["engine"]) / grad_bytes))
    if "per-sample" in skip or (deadline is not None and time.perf_counter() > deadline):
        return out
    # ---- per-sample PG-effects ----
    B = args.ps_batch
    ids, labels = batch(B, args.ps_seq, args.vocab, device, 3)
    r_ids, r_labels = batch(args.batch, args.ps_seq, args.vocab, device, 4)
    denom = L.valid_mask(labels).sum()
    risk = lambda: nll_of(model, r_ids, r_labels)  # noqa: E731
    acc_dtype = torch.float64 if device.type == "cpu" else torch.float32
    model.zero_grad(set_to_none=True)
    def ghost():
        return per_sample_geffects(model, risk, lambda: per_sample_terms(model, ids, labels, denom),
                                   accumulate_dtype=acc_dtype)

    def ghost_unchecked():  # back-propagates to module outputs only (no weight-gradient matmuls)
        return per_sample_geffects(model, risk, lambda: per_sample_terms(model, ids, labels, denom),
                                   accumulate_dtype=acc_dtype, check=False)

    # ghost timed before and after each (slow, run once) loop; best of all ghost runs
    t_ghost, v_ghost = timed(device, ghost, 1)
    t_fast, v_fast = timed(device, ghost_unchecked, 1)
    prow = [["ghost (closed forms, checked)", t_ghost, v_ghost], ["ghost, check=False", t_fast, v_fast]]
    loops = [("loop-retain (B backwards)", loop_retain), ("loop-b1 (B fwd+bwd at batch 1)", loop_b1)]
    for name, fn in loops:
        if name.split(" ")[0] in skip:
            continue
        t, v = timed(device, lambda: fn(model, params, risk, ids, labels, denom, acc_dtype), 1)
        prow.append([name, t, v])
        prow[0][1] = t_ghost = min(t_ghost, timed(device, ghost, 1)[0])
        prow[1][1] = t_fast = min(t_fast, timed(device, ghost_unchecked, 1)[0])
    ref_v = prow[-1][2].cpu().double()
    for name, t, v in prow:
        err = float((v.cpu().double() - ref_v).abs().max() / ref_v.abs().max().clamp_min(1e-30))
        out.append(dict(table="per-sample", method=name, batch=B, tokens=args.ps_seq, s=t, vs_ghost=t / t_ghost,
                        vs_unchecked=t / t_fast, rel_err=err))
    return out


def format_table(rows):
    """The markdown tables of ``run``'s rows."""
    lines = ["| method | extra peak (MiB) | beyond ref (MiB) | beyond ref / one grad copy | kept on host (MiB) "
             "| time (s) | time / ref |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["table"] == "measure":
            lines.append(f"| {r['method']} | {r['extra_mib']:.1f} | {r['beyond_ref_mib']:.1f} | "
                         f"{r['beyond_ref_pct']:.1f}% | {r['host_mib']:.0f} | {r['s']:.3f} | {r['vs_ref']:.2f} |")
        elif r["table"] == "accumulation":
            lines.append(f"\ndot accumulation inside engine.measure: {r['s']:.3f} s in {r['calls']} dot_accumulate_ "
                         f"calls = {r['pct_of_backward']:.1f}% of the two risk backwards ({r['backward_s']:.3f} s)")
        elif r["table"] == "update":
            lines.append(f"\nupdate effects over the plain G-effect measurement: {r['pct_time']:+.1f}% time, "
                         f"{r['extra_mib']:+.1f} MiB peak ({r['pct_of_copy']:+.1f}% of one gradient copy)")
    ps = [r for r in rows if r["table"] == "per-sample"]
    if ps:
        lines += [f"\nper-sample PG-effects, B={ps[0]['batch']} x {ps[0]['tokens']} tokens\n",
                  "| method | time (s) | × ghost (checked) | × ghost (check=False) | max |diff| / max |value| |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['s']:.3f} | {r['vs_ghost']:.1f} | {r['vs_unchecked']:.1f} | "
                  f"{r['rel_err']:.1e} |" for r in ps]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model/batch sizes (default: llama7b on CUDA, cpu100m otherwise)")
    for k in SIZES:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    ap.add_argument("--ps-batch", type=int, default=16, help="batch size of the per-sample comparison")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of, round-robin)")
    ap.add_argument("--skip", default="",
                    help="comma list of parts to skip: naive,paper,update,per-sample,loop-retain,loop-b1")
    args = ap.parse_args(argv)
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    skip = set(filter(None, args.skip.split(",")))
    rows = run(device=args.device, preset=args.preset, repeats=args.repeats, skip=skip, ps_batch=args.ps_batch,
               dtype=args.dtype, **{k: getattr(args, k) for k in SIZES})
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
