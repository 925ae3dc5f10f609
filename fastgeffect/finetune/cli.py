"""``python -m fastgeffect.finetune``: TOFU's fine-tuning of any causal LM, plus its retain-only twin.

Layout of ``--out DIR`` (every part written atomically; ``--resume`` continues an interrupted run)::

    DIR/data/            --authors N: the TOFU subset (the driver's --authors rule, data.splits.subset_tofu)
    DIR/target/          a plain Hugging Face folder (LoRA: merged weights; adapters in target/adapter/)
                         + train_report.json, train_log.jsonl
    DIR/retain/          --retain-twin: the same, trained on the retain split of --forget-split,
                         + eval_log_forget.json (the log behind Forget Quality) and metrics.json
    DIR/manifest.json    model, data, author subset, template, recipe, fingerprints, reports
    DIR/.work/           resumable states and the run's settings (removed when the run completes)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch
from transformers import AutoConfig, AutoTokenizer

from ..data.qa import QADataset
from ..data.splits import author_counts, subset_tofu
from ..data.templates import TEMPLATES, Template, choose_template
from ..data.tofu import RETAIN_OF, load_tofu_split
from ..embedded.cache import atomic_dir, cached_dir
from ..eval import evaluate_tofu
from ..jsonfile import read_json, write_json
from ..model_loading import ModelLoadError, load_causal_lm, model_fingerprint, resolve_model_spec
from .loop import LOG_FILE, Stopped, train
from .recipe import Recipe, default_lr

TARGET_SPLITS = ("full", "retain90", "retain95", "retain99")
WORK = ".work"
SETTINGS = "settings.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastgeffect.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="hub name, local Hugging Face folder, .gguf file, or alias (smollm2-135m)")
    p.add_argument("--data-dir", required=True, help="a folder of TOFU JSON-lines files")
    p.add_argument("--out", required=True, help="output folder (see the layout above)")
    p.add_argument("--split", default="full", choices=TARGET_SPLITS, help="the target's training split")
    p.add_argument("--authors", type=int, default=None,
                   help="train on N TOFU authors (TOFU's proportions, as the driver's --authors)")
    p.add_argument("--forget-split", default="forget10", choices=sorted(RETAIN_OF),
                   help="the forget split whose retain split the twin learns (default forget10 -> retain90)")
    p.add_argument("--retain-twin", action="store_true",
                   help="also train the retain-only twin and write its eval_log_forget.json")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (0: full)")
    p.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                   help="prompt format (default: chat when the tokenizer has a chat template, else phi)")
    r = p.add_argument_group("recipe (TOFU's defaults)")
    r.add_argument("--epochs", type=int, default=5)
    r.add_argument("--lr", type=float, default=None,
                   help="default: 1e-5 Llama, 2e-5 Phi, 1e-5 other families; 1e-4 with --lora")
    r.add_argument("--weight-decay", type=float, default=0.01)
    r.add_argument("--batch-size", type=int, default=32, help="effective batch (samples per optimiser step)")
    r.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step (memory only)")
    r.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then linear decay")
    r.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    r.add_argument("--max-length", type=int, default=500, help="tokens per QA pair")
    r.add_argument("--max-steps", type=int, default=None, help="stop each model after N steps (a short run)")
    r.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("running")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    o.add_argument("--save-every", type=int, default=0, help="steps between resumable states (0: epoch ends)")
    o.add_argument("--stop-after", type=int, default=None,
                   help="stop after N steps of a model, as if interrupted: state saved, exit status 3 (see --resume)")
    o.add_argument("--eval-size", type=int, default=300, help="forget rows in the twin's log (TOFU's ds_size)")
    o.add_argument("--eval-batch-size", type=int, default=8)
    o.add_argument("--bf16", action="store_true", help="load and train in bfloat16")
    o.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    o.add_argument("--cache-dir", default=None, help="where GGUF models are converted (default: $FASTGEFFECT_CACHE)")
    o.add_argument("--no-progress", action="store_true")
    return p


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def check_args(args) -> None:
    """Everything that can be refused before a model is loaded."""
    data = Path(args.data_dir)
    if not data.is_dir():
        raise SystemExit(f"error: --data-dir {data} is not a folder")
    if args.authors is not None and args.authors < 1:
        raise SystemExit(f"error: --authors must be >= 1, got {args.authors}")
    if args.retain_twin and args.split != "full":
        raise SystemExit(f"error: --retain-twin is the twin of a target trained on full; --split {args.split} "
                         "already trains a retain model")
    for name in ("eval_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.stop_after is not None and args.stop_after < 0:
        raise SystemExit("error: --stop-after must be >= 0")
    if args.device is not None:
        try:
            kind = torch.device(args.device).type
        except RuntimeError as e:
            raise SystemExit(f"error: --device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from e
        if kind == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {args.device}: this torch sees no CUDA device")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file")
    if not args.resume and out.is_dir() and any(out.iterdir()):
        raise SystemExit(f"error: --out {out} is not empty: pass --resume to continue the run there, "
                         "or choose a new folder")


def settings_of(args, source: str, model_type: str, template: Template, recipe: Recipe) -> dict:
    """What the run's outputs depend on: a resumed run must have the same."""
    return {"model": args.model, "model_source": source, "model_fingerprint": model_fingerprint(source),
            "model_type": model_type, "data_dir": str(Path(args.data_dir).resolve()), "authors": args.authors,
            "author_subset": author_counts(args.authors) if args.authors else None, "split": args.split,
            "forget_split": args.forget_split, "retain_twin": args.retain_twin, "template": template.name,
            "dtype": "bfloat16" if args.bf16 else "float32", "eval_size": args.eval_size, "recipe": recipe.to_dict()}


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to continue a run (in progress, or complete) that had other settings."""
    for path in (out / WORK / SETTINGS, out / "manifest.json"):
        if path.is_file():
            saved = read_json(path)
            diff = [k for k in settings if saved.get(k) != settings[k]]
            if diff:
                raise SystemExit(f"error: --out {out} holds a run with other settings ({', '.join(diff)}): "
                                 "resume it with the same flags, or choose a new folder")
            break
    (out / WORK).mkdir(parents=True, exist_ok=True)
    write_json(out / WORK / SETTINGS, settings)


def add_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model  # optional dependency: only --lora needs it
    except ImportError as e:
        raise SystemExit("error: --lora needs the package peft: pip install peft") from e
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_phase(name: str, rows: List[dict], args, source: str, template: Template, recipe: Recipe,
                out: Path, device: torch.device, forget_rows: Optional[List[dict]] = None) -> dict:
    """Train one model (``target`` or ``retain``) into ``out/name`` unless it is there already;
    with ``forget_rows`` also write its forget log for Forget Quality. Returns its report."""
    final = out / name
    if (final / "train_report.json").is_file():
        return read_json(final / "train_report.json")
    model, tokenizer = load_causal_lm(source, dtype=torch.bfloat16 if args.bf16 else None, device=device)
    if recipe.lora:
        model = add_lora(model, recipe.lora)
    dataset = QADataset(rows, tokenizer, template, recipe.max_length)
    work = out / WORK / name
    stats = train(model, dataset, recipe, work, stop_after=args.stop_after, progress=not args.no_progress)
    report = {**stats, "n_train": len(dataset), "trainable_parameters":
              sum(p.numel() for p in model.parameters() if p.requires_grad)}
    with atomic_dir(final) as tmp:
        if recipe.lora:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()  # the target is a plain HF folder either way
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(work / LOG_FILE, tmp / LOG_FILE)
        if forget_rows is not None:
            res = evaluate_tofu(model, tokenizer, template, {"forget": forget_rows}, out_dir=tmp,
                                ds_size=args.eval_size, max_length=recipe.max_length,
                                batch_size=args.eval_batch_size, progress=not args.no_progress)
            report["forget_metrics"] = res["metrics"]
        write_json(tmp / "train_report.json", report)
    shutil.rmtree(work)  # the resumable state is no longer needed
    return report


def run(args) -> dict:
    check_args(args)
    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        source = resolve_model_spec(args.model, args.cache_dir)
        model_type = AutoConfig.from_pretrained(source).model_type
        template = choose_template(AutoTokenizer.from_pretrained(source), args.template)
    except (ModelLoadError, OSError, ValueError) as e:
        raise SystemExit(f"error: --model {args.model}: {e}") from e
    recipe = Recipe(lr=args.lr if args.lr is not None else default_lr(model_type, args.lora), epochs=args.epochs,
                    batch_size=args.batch_size, grad_accum=args.grad_accum, weight_decay=args.weight_decay,
                    warmup_epochs=args.warmup_epochs, max_grad_norm=args.max_grad_norm, max_length=args.max_length,
                    lora=args.lora, save_every=args.save_every, seed=args.seed, max_steps=args.max_steps)
    try:
        recipe.check()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    settings = settings_of(args, source, model_type, template, recipe)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    data = Path(args.data_dir)
    if args.authors is not None:
        data = cached_dir(out / "data", lambda tmp: subset_tofu(args.data_dir, tmp, args.authors))
    target_rows = load_tofu_split(args.split, data)
    reports = {"target": train_phase("target", target_rows, args, source, template, recipe, out, device)}
    if args.retain_twin:
        reports["retain"] = train_phase("retain", load_tofu_split(RETAIN_OF[args.forget_split], data), args, source,
                                        template, recipe, out, device,
                                        forget_rows=load_tofu_split(f"{args.forget_split}_perturbed", data))
    used = [args.split] + ([RETAIN_OF[args.forget_split], f"{args.forget_split}_perturbed"] if args.retain_twin else [])
    manifest = {**settings, "data": str(data.resolve()),
                "data_fingerprints": {s: _sha256(data / f"{s}.json") for s in used},
                "outputs": {"target": str((out / "target").resolve()),
                            **({"retain": str((out / "retain").resolve()),
                                "retain_log": str((out / "retain" / "eval_log_forget.json").resolve())}
                               if args.retain_twin else {})},
                "reports": reports}
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = run(args)
    except Stopped as e:
        print(f"fine-tune: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from e
    print(json.dumps({"outputs": manifest["outputs"], "template": manifest["template"]}, indent=1))
    return 0
