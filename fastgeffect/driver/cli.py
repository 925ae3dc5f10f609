"""The command line of ``python -m fastgeffect.run``: one flag per setting, each with its help.

Objective hyper-parameter flags are generated from the objective registry (one flag per
hyper-parameter name, default: each objective's own), so a new objective needs no change here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..cli_help import HelpFormatter, examples
from ..data.tofu import RETAIN_OF
from ..objectives import HPARAMS, OBJECTIVES, REGULARIZER_NAMES, REGULARIZERS
from ..tensorboard import tensorboard_missing
from .presets import PRESETS

PROG = "python -m fastgeffect.run"
# fastgeffect.eval's GEN_MODES and TRUTH_RATIO_AGGS, spelled out: importing the evaluator would load
# scipy for --help (tests/test_eval_parity.py pins them equal)
GEN_MODES = ("tofu", "independent")
TRUTH_RATIO_AGGS = ("geometric", "arithmetic")

# the only flags that may differ when resuming: where the run is, the resume switches, progress bars,
# when the resumable state is saved, whether the final model is saved and whether TensorBoard files are
# written; they change no number of the run. Every other flag must agree with config.json (docs: README
# "What is safe")
MAY_CHANGE_ON_RESUME = ("out", "resume", "overwrite", "no_progress", "stop_at_step", "save_every", "save_model",
                        "report_to")
NAME_KEYS = ("method", "regularizer", "split", "seed")  # spelled out in the default run folder's name

# "-1e-3", "-.5", "-inf": values, not flags (argparse's own pattern only knows "-1" and "-1.5")
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads negative numbers in scientific notation as values, so that
    ``--lr -1e-3`` reaches the range check instead of failing as "expected one argument"."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self._negative_number_matcher = NEGATIVE_NUMBER


def _defaults_of(name: str) -> str:
    """Which objectives / regularisers take hyper-parameter ``name``, with their defaults."""
    users = [f"{t.name} {t.defaults[name]}" for t in OBJECTIVES.values() if name in t.defaults]
    users += [f"{r.name} regulariser {r.defaults[name]}" for r in REGULARIZERS.values() if name in r.defaults]
    return "; ".join(users)


def build_parser(doc: str = "") -> argparse.ArgumentParser:
    ap = Parser(prog=PROG, description=doc.strip().split("\n\n")[0] if doc else None,
                                 epilog=examples(doc), formatter_class=HelpFormatter)
    g = ap.add_argument_group("objective")
    g.add_argument("--method", default="tnpo", choices=sorted(OBJECTIVES),
                   help="unlearning objective (" + ", ".join(t.name for t in OBJECTIVES.values()
                                                             if t.needs_reference_model) +
                        ": reads the original model's full logits at every step, so a second, frozen copy of "
                        "the target is kept in memory, not the cached reference log-probs)")
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
                   help="with --data-dir: real TOFU text restricted to N authors (TOFU's proportions), on the "
                        "embedded tiny model pipeline, or with --model on the subset it was fine-tuned on (checked "
                        "against the manifest.json next to its folder, when there is one)")
    g.add_argument("--size", default="default", choices=("default", "tiny"),
                   help="size of the embedded target (tiny: seconds, for tests)")
    g.add_argument("--max-length", type=int, default=None, help="token length of QA items (default: the preset's)")
    g.add_argument("--retain-log", default=None,
                   help="eval_log_forget.json of the target's retain-only twin for Forget Quality (default: computed "
                        "for the embedded target or --retain-model; TOFU's published log only for the checkpoint it "
                        "belongs to; otherwise Forget Quality is reported as unavailable)")
    g.add_argument("--cache-dir", default=None, help="cache of embedded models and TOFU author subsets (default: "
                                                      "$FASTGEFFECT_CACHE, else ~/.cache/fastgeffect)")
    g.add_argument("--shared-dir", default=None,
                   help="folder for what only depends on the target and data (reference log-probs, the "
                        "retain model's log, evaluation before unlearning), reused by runs that share them "
                        "(sweeps) (default: the run folder)")

    g = ap.add_argument_group("bring your own model")
    g.add_argument("--retain-model", default=None,
                   help="with --model: its retain-only twin (fine-tuned like it on the retain split, e.g. DIR/retain "
                        "of python -m fastgeffect.finetune --retain-twin); its forget log, computed once, gives "
                        "Forget Quality")
    # fastgeffect.data.templates.TEMPLATES, written out (test_cli pins them equal)
    g.add_argument("--template", default=None, choices=("phi", "llama2", "chat"),
                   help="with --model: the prompt format (default: chat when the tokenizer has a chat template, "
                        "else the preset's: phi, or llama2 for --preset llama)")
    g.add_argument("--lora", type=int, default=None, metavar="R",
                   help="unlearn through rank-R LoRA adapters on the blocks' projections (the reference θ_o is the "
                        "model with its adapters disabled); G-effects are then over the adapter parameters")

    g = ap.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5, help="passes over the forget set")
    g.add_argument("--batch-size", type=int, default=16, help="forget samples per optimiser step (+ as many retain)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (exact accumulation)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length, then linear decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping threshold (global L2 norm; 0: no clipping)")
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
    g.add_argument("--update-effects", default="on", choices=("on", "off"),
                   help="also predict each risk's change under the real (clipped AdamW) step and measure the "
                        "realised change after it (one more forward per risk and step)")
    g.add_argument("--pg-steps", default="0,-1",
                   help="comma-separated steps with per-sample PG-effects (-1: the last step; empty: none)")

    g = ap.add_argument_group("evaluation and outputs")
    g.add_argument("--eval", default="full", choices=("full", "none"),
                   help="TOFU metrics + PS before/after + UWC calibration, or none")
    g.add_argument("--eval-size", type=int, default=300, help="rows per evaluation set (TOFU's ds_size)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="sequences per evaluation batch")
    g.add_argument("--no-uwc", action="store_true", help="skip UWC calibration")
    # fastgeffect.eval.ps_protocols.PS_PROTOCOLS, written out: importing fastgeffect.eval would make --help slow
    g.add_argument("--ps-protocol", default=None, choices=("paper", "uwc-linear", "clean"),
                   help="how PS is computed: 'paper' as the public code behind the paper's Table 1, 'uwc-linear' "
                        "as UWC's per-model scripts (both with their own prompt, rows and batching), 'clean' "
                        "fastgeffect's own (training template, --eval-size rows); docs/design.md, PS protocols "
                        "(default: paper for the phi/llama presets, clean for embedded and for a --model in "
                        "the chat format)")
    g.add_argument("--eval-max-length", type=int, default=None,
                   help="token length of evaluation items and generations (default: the preset's: TOFU's 200 "
                        "for phi/llama, the training length for embedded)")
    g.add_argument("--gen-mode", default=None, choices=GEN_MODES,
                   help="evaluation generation: tofu (TOFU's batches of 30 in order, budget max length minus the "
                        "batch's padded prompt length) or independent (each prompt's own budget, results "
                        "independent of batching) (default: tofu for phi/llama, independent for embedded)")
    g.add_argument("--truth-ratio-agg", default="geometric", choices=TRUTH_RATIO_AGGS,
                   help="Truth Ratio's mean of the perturbed probabilities: geometric (TOFU's "
                        "aggregate_eval_stat.py) or arithmetic (TOFU's utils.get_model_utility)")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/<method>-<regularizer>-<split>-seed<seed>, plus -<hash> "
                        "of the other settings that differ from their defaults)")
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
    g.add_argument("--report-to", default="none", choices=("none", "tensorboard"),
                   help="also write TensorBoard event files to <out>/tensorboard: losses, objective-weight "
                        "statistics and G-effects per group at every step, evaluation metrics before and after")
    return ap


def _finite(lo: float, strict: bool = False, hi: float = math.inf):
    """A check that a number is finite and at least ``lo`` (above it when ``strict``) and below ``hi``."""
    return lambda v: math.isfinite(v) and (v > lo if strict else v >= lo) and v < hi


# every number a run reads but the objectives' hyper-parameters (HPARAMS owns their bounds): (flag, check,
# what it must be); None means "the default" and is not checked
NUMBER_CHECKS = (
    ("lr", _finite(0, strict=True), "a finite number > 0"),
    ("weight_decay", _finite(0), "a finite number >= 0"),
    ("warmup_epochs", _finite(0), "a finite number >= 0"),
    ("max_grad_norm", _finite(0), "a finite number >= 0 (0: no clipping)"),
    ("lam", _finite(0), "a finite number >= 0"),
    ("epochs", _finite(1), "an integer >= 1"),
    ("batch_size", _finite(1), "an integer >= 1"),
    ("grad_accum", _finite(1), "an integer >= 1"),
    ("geffect_batch", _finite(1), "an integer >= 1"),
    ("geffect_every", _finite(0), "an integer >= 0 (0: never)"),
    ("eval_size", _finite(1), "an integer >= 1"),
    ("eval_batch_size", _finite(1), "an integer >= 1"),
    ("max_length", _finite(1), "an integer >= 1"),
    ("eval_max_length", _finite(1), "an integer >= 1"),
    ("authors", _finite(1), "an integer >= 1"),
    ("lora", _finite(1), "an integer >= 1 (the adapters' rank)"),
    ("save_every", _finite(0), "an integer >= 0 (0: epoch ends only)"),
    ("stop_at_step", _finite(0), "an integer >= 0"),
    ("seed", _finite(0, hi=2 ** 32), "an integer in [0, 2^32)"),
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for flag values out of range, before anything is read or written."""
    for name, ok, want in NUMBER_CHECKS:
        value = getattr(args, name)
        if value is not None and not ok(value):
            ap.error(f"{flag(name)} must be {want}, got {value}")
    for name, hp in HPARAMS.items():  # the bounds the losses and get_objective check, from the one table
        value = getattr(args, name)
        if value is not None:
            try:
                hp.check(value, args.method)
            except ValueError as e:
                ap.error(f"{flag(name)} {str(e).split(f'{name} ', 1)[1]}")
    for name in ("model", "data_dir", "retain_log", "retain_model", "cache_dir", "shared_dir", "out"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            ap.error(f"{flag(name)} is empty: give a path, or leave the flag out for its default")
    check_own_model_flags(ap, args)
    if args.batch_size % args.grad_accum:
        ap.error(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}: every "
                 "micro-batch takes batch-size / grad-accum samples")
    try:
        steps = pg_steps(args)
    except ValueError:
        ap.error(f"--pg-steps must be comma-separated integers (-1: the last step), got {args.pg_steps!r}")
    if any(s < -1 for s in steps):
        ap.error(f"--pg-steps: steps are >= 0, or -1 for the last step, got {args.pg_steps!r}")
    if args.device is not None:
        check_device(ap, args.device)
    if args.report_to == "tensorboard" and tensorboard_missing():
        ap.error(f"--report-to tensorboard: {tensorboard_missing()}")


def check_own_model_flags(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flag combinations of ``--retain-model``, ``--template`` and ``--lora``."""
    if args.template is not None and args.model is None:
        ap.error("--template needs --model (the embedded target has its own format)")
    if args.retain_model is not None and args.model is None:
        ap.error("--retain-model needs --model (the embedded target trains and evaluates its own retain twin)")
    if args.retain_model is not None and args.retain_log is not None:
        ap.error("--retain-model and --retain-log both give Forget Quality's retain log: pass one of them")
    if args.lora is not None and args.fsdp2:
        ap.error("--lora with --fsdp2 is not supported: shard LoRA unlearning with DDP (torchrun without --fsdp2)")


def check_device(ap: argparse.ArgumentParser, name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        ap.error(f"--device {name!r} is not a device: use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {name!r}: only cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"--device {name}: CUDA is not available here (use --device cpu, or leave --device out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            ap.error(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")


def settings(args: argparse.Namespace) -> dict:
    """The flags that define a run's results: all but :data:`MAY_CHANGE_ON_RESUME`."""
    return {k: v for k, v in vars(args).items() if k not in MAY_CHANGE_ON_RESUME}


def default_out(args: argparse.Namespace, defaults: argparse.Namespace) -> Path:
    """``runs/<method>-<regularizer>-<split>-seed<seed>``, plus ``-<8 hex>`` hashing every other setting
    that differs from its default, so runs over any hyper-parameter never share a folder."""
    regularizer = args.regularizer or OBJECTIVES[args.method].default_regularizer
    name = f"{args.method}-{regularizer}-{args.split}-seed{args.seed}"
    ref = settings(defaults)
    changed = {k: v for k, v in settings(args).items() if k not in NAME_KEYS and v != ref[k]}
    if changed:
        name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / name


def parse_args(argv: Optional[Sequence[str]] = None, doc: str = "") -> argparse.Namespace:
    """The parsed flags, checked (usage errors otherwise), with ``--out`` resolved."""
    ap = build_parser(doc)
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.out is None:
        args.out = str(default_out(args, ap.parse_args([])))
    return args


def pg_steps(args) -> tuple:
    return tuple(int(s) for s in args.pg_steps.split(",") if s.strip())
