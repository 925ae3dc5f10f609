"""CLI: ``python -m fastgeffect.eval aggregate --logs PATH [--retain-log FILE] [--out FILE]
[--truth-ratio-agg geometric|arithmetic]`` and ``python -m fastgeffect.eval tofu --model PATH
--split forget05 [--data-dir DIR] [--template phi] [--retain-log FILE] [--out DIR]
[--gen-mode tofu|independent] [--truth-ratio-agg geometric|arithmetic]``."""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from ..cli_help import HelpFormatter
from ..data.tofu import RETAIN_OF
from ..jsonfile import JSONFileError, read_json, write_json
from .aggregate import TRUTH_RATIO_AGGS, aggregate, check_retain_log, format_table, load_logs, load_retain_log
from .generate import GEN_MODES

RETAIN_LOG_HELP = ("a retain-only model's eval_log_forget.json, or its open-unlearning TOFU_EVAL.json (for Forget "
                   "Quality)")
TRUTH_RATIO_HELP = ("how Truth Ratio averages the perturbed answers' probabilities: geometric (TOFU's "
                    "aggregate_eval_stat.py, its published numbers) or arithmetic (TOFU's utils.get_model_utility)")


def positive_int(text: str) -> int:
    """argparse type of a count (rows, tokens, batch size): a usage error unless >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_not_smaller(path: Path, metrics: dict) -> None:
    """Refuse to replace an existing metrics file by one that lacks some of its metrics (a
    ``--partial`` aggregation or one without ``--retain-log`` would drop e.g. Forget Quality)."""
    if not path.exists():
        return
    try:
        old = read_json(path)
    except JSONFileError as e:  # a torn file holds no result to keep: it is recomputed
        print(f"note: replacing a broken file: {e}", file=sys.stderr)
        return
    lost = [k for k in old if k not in metrics] if isinstance(old, dict) else ["(not a metrics object)"]
    if lost:
        raise ValueError(f"{path} already holds {len(old)} metrics and this aggregation has {len(metrics)}, "
                         f"without {lost[:4]}{'...' if len(lost) > 4 else ''}: not overwritten; write it "
                         "elsewhere with --out FILE (or pass --retain-log / all four logs to keep them)")


def check_model_path(flag: str, name: str, files=("config.json",)) -> None:
    """A local model folder must hold a saved model: otherwise transformers reads the path as a hub
    name and fails with an unrelated message ("Repo id must be in the form ...")."""
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if path.is_dir():
        if not any((path / f).is_file() for f in files):
            raise FileNotFoundError(f"{flag} {name}: the folder holds no {' or '.join(files)}, so nothing was "
                                    "saved there (save_pretrained writes it); give the saved folder or a hub name")
    elif looks_local or path.exists():
        raise FileNotFoundError(f"{flag} {name}: no such folder (a hub name has the form org/name)")


def _aggregate(args) -> int:
    logs = load_logs(args.logs)
    retain = load_retain_log(args.retain_log) if args.retain_log else None
    try:
        metrics = aggregate(logs, retain, require_all=not args.partial, truth_ratio=args.truth_ratio_agg)
    except ValueError as e:  # the message names the TOFU file: say where it was read from
        where = f"logs: {args.logs}" + (f"; retain log: {args.retain_log}" if args.retain_log else "")
        raise ValueError(f"{e} ({where})") from None
    logs_dir = Path(args.logs) if Path(args.logs).is_dir() else Path(args.logs).parent
    out = Path(args.out) if args.out else logs_dir / "metrics.json"
    if not args.out:
        check_not_smaller(out, metrics)
    print(format_table(metrics))
    write_json(out, metrics)
    print(f"wrote {out}")
    return 0


def default_out(args) -> Path:
    """``MODEL/eval_results/<settings>`` beside a local model folder or ``.gguf`` file, named by every
    setting that changes the logs, so that evaluations under other settings never share a folder. A
    hub name or an alias has no folder of its own: ``--out`` is needed (a path derived from a hub
    name would land in the current folder and shadow the hub model)."""
    if not Path(args.model).exists():
        raise SystemExit(f"--model {args.model} is not a local folder or file: give --out (where to write the logs)")
    base = Path(args.model[:-len(".gguf")] if args.model.endswith(".gguf") else args.model)
    name = (f"{args.split}-ds{args.ds_size}-len{args.max_length}"
            + (f"-new{args.max_new_tokens}" if args.max_new_tokens else "")
            + f"-{args.gen_mode}-{args.template or 'auto'}-{args.truth_ratio_agg}-{args.dtype}")
    if args.tokenizer:
        name += "-tok" + hashlib.sha256(str(Path(args.tokenizer).resolve()).encode()).hexdigest()[:8]
    return base / "eval_results" / name


def check_out(out_dir: Path, overwrite: bool) -> None:
    """Earlier logs in the output folder are never replaced without ``--overwrite``."""
    held = sorted(p.name for p in out_dir.glob("eval_*.json")) if out_dir.is_dir() else []
    if held and not overwrite:
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise SystemExit(f"{out_dir} holds TOFU logs already ({listed}): not overwritten; pass --overwrite to "
                         "replace them, or another --out")


def _tofu(args) -> int:
    # only this subcommand needs torch and transformers: aggregate and --help stay instant
    import torch
    from transformers import AutoTokenizer

    from ..data.templates import choose_template
    from ..model_loading import ALIASES, load_causal_lm
    from .tofu import evaluate_tofu, load_tofu_sets

    # the paths, the data and the retain log are checked before the (slow) model is loaded
    if not args.model.endswith(".gguf") and args.model not in ALIASES:  # those are checked when converted
        check_model_path("--model", args.model)
    if args.tokenizer:
        check_model_path("--tokenizer", args.tokenizer, ("tokenizer_config.json", "tokenizer.json", "config.json"))
    out_dir = Path(args.out) if args.out else default_out(args)
    check_out(out_dir, args.overwrite)
    sets = load_tofu_sets(args.split, args.data_dir)
    retain = None
    if args.retain_log:
        retain = load_retain_log(args.retain_log)
        forget = sets["forget"][:args.ds_size]
        check_retain_log(retain, len(forget), [r["answer"] for r in forget], name=args.retain_log,
                         questions=[r["question"] for r in forget])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model, tokenizer = load_causal_lm(args.model, dtype=dtype,
                                      device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    template = choose_template(tokenizer, args.template)  # chat for a chat tokenizer unless --template says
    res = evaluate_tofu(model, tokenizer, template, sets, out_dir=out_dir,
                        retain_log=retain, ds_size=args.ds_size, max_length=args.max_length,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, gen_mode=args.gen_mode,
                        truth_ratio=args.truth_ratio_agg)
    print(format_table(res["metrics"]))
    print(f"logs written to {out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastgeffect.eval", description="Evaluate on TOFU, or aggregate "
                                "TOFU's per-sample logs into its metrics.", formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{aggregate,tofu}")
    a = sub.add_parser("aggregate", help="aggregate TOFU per-sample logs (TOFU's aggregate_eval_stat)",
                       description="Aggregate TOFU's per-sample logs into its metrics (Model Utility, Forget "
                                   "Quality, ...) and write metrics.json.", formatter_class=HelpFormatter)
    a.add_argument("--logs", required=True, help="folder with the four TOFU logs, or eval_log_aggregated.json")
    a.add_argument("--retain-log", help=RETAIN_LOG_HELP)
    a.add_argument("--out", help="output JSON (default: metrics.json next to the logs, never replaced by fewer "
                   "metrics)")
    a.add_argument("--partial", action="store_true", help="allow fewer than four log files")
    a.add_argument("--truth-ratio-agg", default="geometric", choices=TRUTH_RATIO_AGGS, help=TRUTH_RATIO_HELP)
    t = sub.add_parser("tofu", help="evaluate a model on TOFU and write TOFU's logs",
                       description="Evaluate a causal LM on TOFU's four sets and write TOFU's per-sample logs, "
                                   "the aggregated metrics, and both in open-unlearning's TOFU_EVAL.json / "
                                   "TOFU_SUMMARY.json.", formatter_class=HelpFormatter)
    t.add_argument("--model", required=True, help="a causal LM: local folder, hub name, .gguf file or an alias "
                   "(smollm2-135m)")
    t.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    t.add_argument("--split", default="forget05", choices=sorted(RETAIN_OF), help="TOFU forget split")
    t.add_argument("--data-dir", help="folder of TOFU JSON-lines files (default: the hub, locuslab/TOFU)")
    t.add_argument("--template", default=None, choices=["phi", "llama2", "chat"],
                   help="prompt template (default: chat for a tokenizer with a chat template, else phi)")
    t.add_argument("--retain-log", help=RETAIN_LOG_HELP)
    t.add_argument("--out", help="output folder (default: MODEL/eval_results/<split>-ds<N>-len<L>-...: every setting "
                   "that changes the logs; needed for a hub name or an alias)")
    t.add_argument("--overwrite", action="store_true", help="replace the TOFU logs already in the output folder")
    t.add_argument("--ds-size", type=positive_int, default=300, help="rows per evaluation set (TOFU's ds_size)")
    t.add_argument("--max-length", type=positive_int, default=200, help="token length of prompt + answer (TOFU's)")
    t.add_argument("--max-new-tokens", type=positive_int, help="generation budget (default: TOFU's max_length rule)")
    t.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per loss batch (and generation batch with --gen-mode independent)")
    t.add_argument("--gen-mode", default="tofu", choices=GEN_MODES,
                   help="tofu: TOFU's generation (batches of 30 in order, budget max_length minus the batch's "
                        "padded prompt length); independent: each prompt's budget from its own length, results "
                        "independent of batching (recommended for new work)")
    t.add_argument("--truth-ratio-agg", default="geometric", choices=TRUTH_RATIO_AGGS, help=TRUTH_RATIO_HELP)
    t.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights' dtype")
    t.add_argument("--device", help="cpu / cuda / cuda:N (default: cuda when available)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _aggregate(args) if args.cmd == "aggregate" else _tofu(args)
    except (ValueError, OSError) as e:  # bad input, a missing file, a full disk: named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
