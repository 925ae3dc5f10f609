"""``python -m fastgeffect.attacks``: the relearning and quantisation attacks on any saved model,
over the forget rows of a TOFU split, written to ``--out/attacks.json`` and ``attacks_relearn.png``."""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

from ..cli_help import HelpFormatter
from ..data.tofu import RETAIN_OF
from .quantize import BITS, GROUP_SIZE
from .relearn import BATCH_SIZE, LR, MAX_LENGTH, SEED, STEPS
from .report import ATTACKS, FILE


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastgeffect.attacks", formatter_class=HelpFormatter,
                                description="Relearning and quantisation attacks on a model's forget rows "
                                            "(does the forgotten data come back?).")
    p.add_argument("--model", required=True, help="a causal LM: local folder, hub name, .gguf file or an alias")
    p.add_argument("--retain-model", help="the retain twin (never saw the forget rows): the relearning control")
    p.add_argument("--uwc-original", help="attack the UWC-calibrated model (1 - a)*theta_o + a*theta_u instead of "
                                          "--model (theta_u, the unlearned model): the original model theta_o")
    p.add_argument("--uwc-alpha", type=float, help="the UWC mixing weight a in [0, 1] (a run's metrics_uwc.json: "
                                                   "alpha); needs --uwc-original")
    p.add_argument("--split", default="forget05", choices=sorted(RETAIN_OF), help="TOFU forget split")
    p.add_argument("--data-dir", help="folder of TOFU JSON-lines files (default: the hub, locuslab/TOFU)")
    p.add_argument("--template", default=None, choices=["phi", "llama2", "chat"],
                   help="prompt template (default: chat for a tokenizer with a chat template, else phi)")
    p.add_argument("--attacks", type=_names, default=list(ATTACKS), help="comma-separated: " + ",".join(ATTACKS))
    p.add_argument("--steps", type=_int_list, default=list(STEPS), help="relearning step counts k, increasing")
    p.add_argument("--seed", type=int, default=SEED, help="the forget split into trained/measured rows and the batches")
    p.add_argument("--lr", type=float, default=LR, help="relearning AdamW learning rate (constant)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="relearning rows per step")
    p.add_argument("--bits", type=_int_list, default=list(BITS), help="quantisation bit widths (8, 4)")
    p.add_argument("--group-size", type=int, default=GROUP_SIZE,
                   help="inputs per scale of the grouped variant (the per-channel variant always runs)")
    p.add_argument("--no-lm-head", action="store_true", help="leave the LM head unquantised")
    p.add_argument("--rouge", action="store_true", help="also ROUGE-L recall of greedy answers (slower)")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="token length of prompt + answer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {FILE} in --out")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="weights' dtype")
    p.add_argument("--device", help="cpu / cuda / cuda:N (default: cuda when available)")
    return p


def check_mixture(original, alpha):
    """``--uwc-original`` and ``--uwc-alpha`` together, α a number in [0, 1]: what attacks.json records
    as the attacked model (None without them)."""
    if (original is None) != (alpha is None):
        raise ValueError("--uwc-original and --uwc-alpha go together: the UWC model is the mixture of --model "
                         "and the original at alpha")
    if original is None:
        return None
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"--uwc-alpha must be in [0, 1], got {alpha}")
    return {"uwc": {"original": str(original), "alpha": float(alpha)}}


def run(args) -> int:
    import torch  # here: --help stays instant

    from ..data.templates import choose_template
    from ..data.tofu import load_tofu_split
    from ..eval.uwc import mixed_weights
    from ..model_loading import load_causal_lm
    from .report import check_attack_args, run_attacks

    out = Path(args.out)
    if (out / FILE).exists() and not args.overwrite:
        raise ValueError(f"{out / FILE} exists: not overwritten; pass --overwrite to replace it, or another --out")
    forget = load_tofu_split(args.split, args.data_dir)
    kw = dict(attacks=args.attacks, steps=args.steps, seed=args.seed, lr=args.lr, batch_size=args.batch_size,
              bits=args.bits, group_sizes=(None, args.group_size))
    check_attack_args(forget, **kw)  # before the (slow) models load
    mixture = check_mixture(args.uwc_original, args.uwc_alpha)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_causal_lm(args.model, dtype=dtype, device=device)
    twin = load_causal_lm(args.retain_model, dtype=dtype, device=device)[0] if args.retain_model else None
    template = choose_template(tokenizer, args.template)
    original = load_causal_lm(args.uwc_original, dtype=dtype, device=device)[0] if mixture else None
    # the UWC model exists only as this mixture (a run saves the unlearned model, never the mixture)
    with mixed_weights(model, original, args.uwc_alpha) if mixture else contextlib.nullcontext():
        res = run_attacks(model, tokenizer, template, forget, out_dir=out, twin=twin,
                          include_lm_head=not args.no_lm_head, rouge=args.rouge, max_length=args.max_length,
                          model_info=mixture, **kw)
    print(summary(res))
    print(f"written to {out / FILE}")
    return 0


def summary(res: dict) -> str:
    """A plain-text table of the results (one line per step count and per quantisation)."""
    metrics = res["metrics"]
    lines = []
    if "relearn" in res:
        r = res["relearn"]
        head = "  ".join(f"{m:>20}" for m in metrics)
        lines.append("relearn k  " + head + ("  (target / twin)" if r["twin"] else ""))
        for i, t in enumerate(r["target"]):
            c = r["twin"][i] if r["twin"] else None
            cells = [f"{t[m]:.4f}" + (f" / {c[m]:.4f}" if c else "") for m in metrics]
            lines.append(f"{t['step']:>10}  " + "  ".join(f"{x:>20}" for x in cells))
    if "quantize" in res:
        lines.append("quantize   " + "  ".join(f"{m:>20}" for m in metrics))
        for q in res["quantize"]["rows"]:
            name = "none" if q["bits"] is None else f"{q['bits']}b {q['granularity']}"
            lines.append(f"{name:>10}  " + "  ".join(f"{q[m]:>20.4f}" for m in metrics))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # bad input, a missing file, a full disk: named, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
