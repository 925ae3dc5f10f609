"""The command line of ``python -m fastgeffect.run``: one flag per setting, each with its help.

Objective hyper-parameter flags are generated from the objective registry (one flag per
hyper-parameter name, default: each objective's own), so a new objective needs no change here.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli_help import HelpFormatter, examples
from ..data.tofu import RETAIN_OF
from ..objectives import HPARAMS, OBJECTIVES, REGULARIZER_NAMES, REGULARIZERS
from .presets import PRESETS

PROG = "python -m fastgeffect.run"

# flags that must agree with the saved config when resuming
RESUME_KEYS = ("method", "regularizer", "split", "size", "data_dir", "authors", "model", "preset", "seed",
               "epochs", "batch_size", "grad_accum", "lr", "lam", "alpha", "beta", "geffect_every")


def _defaults_of(name: str) -> str:
    """Which objectives / regularisers take hyper-parameter ``name``, with their defaults."""
    users = [f"{t.name} {t.defaults[name]}" for t in OBJECTIVES.values() if name in t.defaults]
    users += [f"{r.name} regulariser {r.defaults[name]}" for r in REGULARIZERS.values() if name in r.defaults]
    return "; ".join(users)


def build_parser(doc: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=doc.strip().split("\n\n")[0] if doc else None,
                                 epilog=examples(doc), formatter_class=HelpFormatter)
    g = ap.add_argument_group("objective")
    g.add_argument("--method", default="tnpo", choices=sorted(OBJECTIVES), help="unlearning objective")
    g.add_argument("--regularizer", default=None, choices=REGULARIZER_NAMES,
                   help="retain regulariser (default: the objective's own: " + ", ".join(
                       f"{t.name} {t.default_regularizer}" for t in OBJECTIVES.values()
                       if t.default_regularizer != "none") + ", none otherwise)")
    g.add_argument("--lam", type=float, default=1.0, help="weight λ of the regulariser")
    for name, hp in HPARAMS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=hp.type, default=None, choices=hp.choices,
                       help=f"{hp.help} (default: the objective's own: {_defaults_of(name)})")
    g.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                   help="fused LM-head losses that never hold (tokens × vocab) logits (Triton on CUDA, chunked "
                        "torch on CPU) for the token-weighted objectives, GD and KL; auto: on when the model "
                        "exposes a plain linear LM head")

    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="hub name or local path of the target model (default: the embedded offline target)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="paper hyper-parameters and template (default: embedded, or phi with --model)")
    g.add_argument("--split", default="forget10", choices=sorted(RETAIN_OF), help="TOFU forget split")
    g.add_argument("--data-dir", default=None,
                   help="folder of TOFU JSON-lines files (e.g. a copy of the hub's locuslab/TOFU); with --model "
                        "and no --data-dir TOFU is downloaded from the hub")
    g.add_argument("--authors", type=int, default=None,
                   help="with --data-dir and no --model: real TOFU text restricted to N authors, on the embedded "
                        "tiny model pipeline")
    g.add_argument("--size", default="default", choices=("default", "tiny"),
                   help="size of the embedded target (tiny: seconds, for tests)")
    g.add_argument("--max-length", type=int, default=None, help="token length of QA items (default: the preset's)")
    g.add_argument("--retain-log", default=None,
                   help="eval_log_forget.json of a retain-only model for Forget Quality (default: computed for "
                        "the embedded target, TOFU's published log in --data-dir/retain_model_logs otherwise)")
    g.add_argument("--cache-dir", default=None, help="cache of embedded models (default: $FASTGEFFECT_CACHE, "
                                                      "else ~/.cache/fastgeffect)")
    g.add_argument("--shared-dir", default=None,
                   help="folder for what only depends on the target and data (reference log-probs, the "
                        "retain model's log, evaluation before unlearning), reused by runs that share them "
                        "(sweeps) (default: the run folder)")

    g = ap.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5, help="passes over the forget set")
    g.add_argument("--batch-size", type=int, default=16, help="forget samples per optimiser step (+ as many retain)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (exact accumulation)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length, then linear decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping threshold (global L2 norm)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order, retain pairing and embedded target")
    g.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda when available)")
    g.add_argument("--fsdp2", action="store_true",
                   help="under torchrun: shard with torch's FSDP2 (fully_shard per decoder block) instead of DDP "
                        "(under accelerate launch, use configs/accelerate/fsdp.yaml instead)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights for a --model target (default: on with CUDA, off on CPU)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward for a --model target (default: on with CUDA, off "
                        "on CPU)")

    g = ap.add_argument_group("G-effects")
    g.add_argument("--geffect-every", type=int, default=1, help="measure every K steps (0: never)")
    g.add_argument("--geffect-batch", type=int, default=16, help="samples in each risk batch")
    g.add_argument("--geffect-groups", default="paper", choices=("paper", "blocks", "params"),
                   help="layer groups: the paper's (embed, shallow, middle, deep, lm), one per block, or one "
                        "per parameter")
    g.add_argument("--pg-steps", default="0,-1",
                   help="comma-separated steps with per-sample PG-effects (-1: the last step; empty: none)")

    g = ap.add_argument_group("evaluation and outputs")
    g.add_argument("--eval", default="full", choices=("full", "none"),
                   help="TOFU metrics + PS before/after + UWC calibration, or none")
    g.add_argument("--eval-size", type=int, default=300, help="rows per evaluation set (TOFU's ds_size)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="sequences per evaluation batch")
    g.add_argument("--no-uwc", action="store_true", help="skip UWC calibration")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/<method>-<regularizer>-<split>-seed<seed>)")
    once = g.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue the run in --out")
    once.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--save-model", action="store_true", help="save the unlearned model to <out>/model")
    g.add_argument("--checkpoint-epochs", action="store_true",
                   help="save the model after every epoch to <out>/checkpoints/epoch-K (post-hoc G-effects)")
    g.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (0: epoch ends only)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after N steps with the state saved, as if interrupted (continue with --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def parse_args(argv: Optional[Sequence[str]] = None, doc: str = "") -> argparse.Namespace:
    return build_parser(doc).parse_args(argv)


def pg_steps(args) -> tuple:
    return tuple(int(s) for s in args.pg_steps.split(",") if s.strip())
