"""CLI: ``python -m fastgeffect.eval aggregate --logs PATH [--retain-log FILE] [--out FILE]`` and
``python -m fastgeffect.eval tofu --model PATH --split forget05 [--data-dir DIR] [--template phi]
[--retain-log FILE] [--out DIR]``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_help import HelpFormatter
from ..data.tofu import RETAIN_OF
from .aggregate import aggregate, format_table, load_logs, load_retain_log


def _aggregate(args) -> int:
    logs = load_logs(args.logs)
    retain = load_retain_log(args.retain_log) if args.retain_log else None
    metrics = aggregate(logs, retain, require_all=not args.partial)
    print(format_table(metrics))
    logs_dir = Path(args.logs) if Path(args.logs).is_dir() else Path(args.logs).parent
    out = Path(args.out) if args.out else logs_dir / "metrics.json"
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")
    return 0


def _tofu(args) -> int:
    # only this subcommand needs torch and transformers: aggregate and --help stay instant
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.templates import get_template
    from .tofu import evaluate_tofu, load_tofu_sets

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    sets = load_tofu_sets(args.split, args.data_dir)
    out_dir = Path(args.out or Path(args.model) / "eval_results" / f"ds_size{args.ds_size}")
    res = evaluate_tofu(model, tokenizer, get_template(args.template), sets, out_dir=out_dir,
                        retain_log=args.retain_log, ds_size=args.ds_size, max_length=args.max_length,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
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
    a.add_argument("--retain-log", help="a retain-only model's eval_log_forget.json (for Forget Quality)")
    a.add_argument("--out", help="output JSON (default: metrics.json next to the logs)")
    a.add_argument("--partial", action="store_true", help="allow fewer than four log files")
    t = sub.add_parser("tofu", help="evaluate a model on TOFU and write TOFU's logs",
                       description="Evaluate a causal LM on TOFU's four sets and write TOFU's per-sample logs "
                                   "and the aggregated metrics.", formatter_class=HelpFormatter)
    t.add_argument("--model", required=True, help="local folder or hub name of a causal LM")
    t.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    t.add_argument("--split", default="forget05", choices=sorted(RETAIN_OF), help="TOFU forget split")
    t.add_argument("--data-dir", help="folder of TOFU JSON-lines files (default: the hub, locuslab/TOFU)")
    t.add_argument("--template", default="phi", choices=["phi", "llama2", "chat"], help="prompt template")
    t.add_argument("--retain-log", help="a retain-only model's eval_log_forget.json (for Forget Quality)")
    t.add_argument("--out", help="output folder (default: MODEL/eval_results/ds_sizeN)")
    t.add_argument("--ds-size", type=int, default=300, help="rows per evaluation set (TOFU's ds_size)")
    t.add_argument("--max-length", type=int, default=200, help="token length of prompt + answer (TOFU's)")
    t.add_argument("--max-new-tokens", type=int, help="generation budget (default: TOFU's max_length rule)")
    t.add_argument("--batch-size", type=int, default=32, help="sequences per evaluation batch")
    t.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights' dtype")
    t.add_argument("--device", help="cpu / cuda / cuda:N (default: cuda when available)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _aggregate(args) if args.cmd == "aggregate" else _tofu(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
