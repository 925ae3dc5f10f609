"""``python -m fastgeffect.finetune``: TOFU's fine-tuning of any causal LM, plus its retain-only twin.

Layout of ``--out DIR`` (every part written atomically; ``--resume`` continues an interrupted run)::

    DIR/data/            --authors N: the TOFU subset (the driver's --authors rule, data.splits.subset_tofu)
    DIR/target/          a plain Hugging Face folder (LoRA: merged weights; adapters in target/adapter/)
                         + train_report.json, train_log.jsonl
    DIR/retain/          --retain-twin: the same, trained on the retain split of --forget-split,
                         + eval_log_forget.json (the log behind Forget Quality) and metrics.json
    DIR/manifest.json    model, data, author subset, template, recipe, fingerprints, reports
    DIR/.work/           resumable states and the run's settings (removed when the run completes),
                         error.json when it failed

A run that fails before anything resumable exists removes the folder it created, so the corrected
command runs as it is; otherwise the error says whether to continue (``--resume``, same flags) or
start again (``--overwrite``).
"""
from __future__ import annotations

import argparse
import contextlib
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
from ..data.templates import Template, choose_template
from ..data.tofu import RETAIN_OF, load_tofu_split
from ..dataclass_cli import first_error
from ..embedded.cache import atomic_dir, cached_dir
from ..eval import evaluate_tofu
from ..jsonfile import read_json, write_json
from ..model_loading import ModelLoadError, load_causal_lm, model_fingerprint, resolve_model_spec
from ..training.backend import STATE_FILE
from . import config
from .config import FinetuneConfig
from .loop import LOG_FILE, Stopped, train
from .recipe import Recipe, default_lr

WORK = ".work"
SETTINGS = "settings.json"
ERROR = "error.json"
PHASES = ("target", "retain")


def build_parser() -> argparse.ArgumentParser:
    return config.build_parser(__doc__)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def check_config(cfg: FinetuneConfig) -> None:
    """Everything that can be refused before a model is loaded."""
    data = Path(cfg.data_dir)
    if not data.is_dir():
        raise SystemExit(f"error: --data-dir {data} is not a folder")
    error = first_error(cfg)
    if error:
        raise SystemExit(f"error: {error}")
    if cfg.retain_twin and cfg.split != "full":
        raise SystemExit(f"error: --retain-twin is the twin of a target trained on full; --split {cfg.split} "
                         "already trains a retain model")
    if cfg.batch_size % cfg.grad_accum:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum}")
    if cfg.device is not None:
        try:
            kind = torch.device(cfg.device).type
        except RuntimeError as e:
            raise SystemExit(f"error: --device {cfg.device!r} is not a device (cpu, cuda, cuda:1, ...)") from e
        if kind == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {cfg.device}: this torch sees no CUDA device")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file")
    if cfg.resume and cfg.overwrite:
        raise SystemExit("error: --resume continues the fine-tune in --out, --overwrite replaces it: pass one")
    if out.is_dir() and any(out.iterdir()) and not cfg.resume:
        if not holds_finetune(out):
            raise SystemExit(f"error: --out {out} is not empty and holds no fine-tune (no manifest.json, no "
                             f"{WORK}/{SETTINGS}): choose a new folder" + (" (--overwrite never replaces such a "
                                                                           "folder)" if cfg.overwrite else ""))
        if not cfg.overwrite:
            error = out / WORK / ERROR
            failed = f" (it holds a fine-tune that failed: {read_json(error)['error']})" if error.is_file() else ""
            raise SystemExit(f"error: --out {out} is not empty{failed}: pass --resume to continue the run there "
                             "(with its flags), --overwrite to start it again, or choose a new folder")


def holds_finetune(out: Path) -> bool:
    return (out / "manifest.json").is_file() or (out / WORK / SETTINGS).is_file()


def resumable_parts(out: Path) -> List[str]:
    """What a --resume would not redo: trained models, saved training states."""
    done = [f"the trained {p} model" for p in PHASES if (out / p / "train_report.json").is_file()]
    return done + [f"the {p} model's training state" for p in PHASES if (out / WORK / p / STATE_FILE).is_file()]


def after_failure(out: Path, created: bool, error: BaseException) -> str:
    """Clean up after a failed run and say how to restart: a folder this run created, holding nothing
    resumable, is removed; otherwise the error is recorded in ``.work/error.json``."""
    kept = resumable_parts(out)
    if created and not kept:
        shutil.rmtree(out, ignore_errors=True)
        return f"nothing could be kept: --out {out} was removed, so the corrected command runs as it is"
    with contextlib.suppress(OSError):
        (out / WORK).mkdir(parents=True, exist_ok=True)
        write_json(out / WORK / ERROR, {"error": f"{type(error).__name__}: {error}", "kept": kept})
    if kept:
        return (f"--out {out} keeps {', '.join(kept)}: once the cause is fixed, continue with --resume and the same "
                "flags (other flags are refused), or start again with --overwrite")
    return f"nothing in --out {out} can be resumed: start again with --overwrite"


def settings_of(cfg: FinetuneConfig, source: str, model_type: str, template: Template, recipe: Recipe) -> dict:
    """What the run's outputs depend on: a resumed run must have the same."""
    return {"model": cfg.model, "model_source": source, "model_fingerprint": model_fingerprint(source),
            "model_type": model_type, "data_dir": str(Path(cfg.data_dir).resolve()), "authors": cfg.authors,
            "author_subset": author_counts(cfg.authors) if cfg.authors else None, "split": cfg.split,
            "forget_split": cfg.forget_split, "retain_twin": cfg.retain_twin, "template": template.name,
            "dtype": "bfloat16" if cfg.bf16 else "float32", "eval_size": cfg.eval_size, "recipe": recipe.to_dict()}


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to continue a run (in progress, or complete) that had other settings."""
    for path in (out / WORK / SETTINGS, out / "manifest.json"):
        if path.is_file():
            saved = read_json(path)
            diff = [k for k in settings if saved.get(k) != settings[k]]
            if diff:
                raise SystemExit(f"error: --out {out} holds a run with other settings ({', '.join(diff)}): "
                                 "resume it with the same flags, start again with --overwrite, or choose a new "
                                 "folder")
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


def train_phase(name: str, rows: List[dict], cfg: FinetuneConfig, source: str, template: Template, recipe: Recipe,
                out: Path, device: torch.device, forget_rows: Optional[List[dict]] = None) -> dict:
    """Train one model (``target`` or ``retain``) into ``out/name`` unless it is there already;
    with ``forget_rows`` also write its forget log for Forget Quality. Returns its report."""
    final = out / name
    if (final / "train_report.json").is_file():
        return read_json(final / "train_report.json")
    model, tokenizer = load_causal_lm(source, dtype=torch.bfloat16 if cfg.bf16 else None, device=device)
    if recipe.lora:
        model = add_lora(model, recipe.lora)
    dataset = QADataset(rows, tokenizer, template, recipe.max_length)
    work = out / WORK / name
    stats = train(model, dataset, recipe, work, stop_after=cfg.stop_after, progress=not cfg.no_progress)
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
                                ds_size=cfg.eval_size, max_length=recipe.max_length,
                                batch_size=cfg.eval_batch_size, progress=not cfg.no_progress)
            report["forget_metrics"] = res["metrics"]
        write_json(tmp / "train_report.json", report)
    shutil.rmtree(work)  # the resumable state is no longer needed
    return report


def run(cfg: FinetuneConfig) -> dict:
    check_config(cfg)
    out = Path(cfg.out)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        source = resolve_model_spec(cfg.model, cfg.cache_dir)
        model_type = AutoConfig.from_pretrained(source).model_type
        template = choose_template(AutoTokenizer.from_pretrained(source), cfg.template)
    except (ModelLoadError, OSError, ValueError) as e:
        raise SystemExit(f"error: --model {cfg.model}: {e}") from e
    recipe = cfg.recipe(cfg.lr if cfg.lr is not None else default_lr(model_type, cfg.lora))
    try:
        recipe.check()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    settings = settings_of(cfg, source, model_type, template, recipe)
    for split in needed_splits(cfg):  # a missing file is found before anything is replaced or written
        load_tofu_split(split, cfg.data_dir)
    if cfg.overwrite and out.is_dir():
        shutil.rmtree(out)  # check_config made sure it holds a fine-tune
    created = not out.is_dir() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    try:
        return train_all(cfg, out, source, template, recipe, settings, device)
    except Stopped:
        raise
    except Exception as e:
        e.restart_hint = after_failure(out, created, e)  # read by main
        raise


def needed_splits(cfg: FinetuneConfig) -> List[str]:
    twin = [RETAIN_OF[cfg.forget_split], f"{cfg.forget_split}_perturbed"] if cfg.retain_twin else []
    return [cfg.split] + twin


def train_all(cfg: FinetuneConfig, out: Path, source: str, template: Template, recipe: Recipe, settings: dict,
              device: torch.device) -> dict:
    """The target (and its twin) trained into ``out``, then the manifest."""
    data = Path(cfg.data_dir)
    if cfg.authors is not None:
        data = cached_dir(out / "data", lambda tmp: subset_tofu(cfg.data_dir, tmp, cfg.authors))
    target_rows = load_tofu_split(cfg.split, data)
    reports = {"target": train_phase("target", target_rows, cfg, source, template, recipe, out, device)}
    if cfg.retain_twin:
        reports["retain"] = train_phase("retain", load_tofu_split(RETAIN_OF[cfg.forget_split], data), cfg, source,
                                        template, recipe, out, device,
                                        forget_rows=load_tofu_split(f"{cfg.forget_split}_perturbed", data))
    used = needed_splits(cfg)
    manifest = {**settings, "data": str(data.resolve()),
                "data_fingerprints": {s: _sha256(data / f"{s}.json") for s in used},
                "outputs": {"target": str((out / "target").resolve()),
                            **({"retain": str((out / "retain").resolve()),
                                "retain_log": str((out / "retain" / "eval_log_forget.json").resolve())}
                               if cfg.retain_twin else {})},
                "reports": reports}
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    cfg = config.parse_args(argv, __doc__)
    try:
        manifest = run(cfg)
    except Stopped as e:
        print(f"fine-tune: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        hint = getattr(e, "restart_hint", None)
        raise SystemExit(f"error: {e}" + (f"\n{hint}" if hint else "")) from e
    except Exception as e:
        hint = getattr(e, "restart_hint", None)
        if hint:
            print(f"fine-tune failed: {hint}", file=sys.stderr)
        raise
    print(json.dumps({"outputs": manifest["outputs"], "template": manifest["template"]}, indent=1))
    return 0
