"""Evaluation of a run's model on the main process: TOFU's metrics and logs, PS-exact/PS-perturb,
the retain model's log behind Forget Quality, and UWC calibration (docs/design.md §5; §13 for the
settings of :func:`eval_options`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from transformers import AutoModelForCausalLM

from ..data.tofu import RETAIN_OF, load_tofu_split
from ..distributed import write_json_main
from ..eval import evaluate_tofu, ps_report, uwc_calibrate
from ..eval.ps_samples import protocol_samples
from .artefacts import before_fingerprint, cached, load_json_dict, retain_log_fingerprint
from .presets import PRESETS, Preset
from .targets import Target


def eval_options(args, target: Target) -> dict:
    """How the run evaluates: the flags, else the preset's (``args.preset`` is resolved by
    run_study): TOFU's 200 tokens and generation batching for phi/llama, the training length and
    batching-independent generation for the embedded target; Truth Ratio geometric by default."""
    preset = PRESETS[args.preset]
    return {"max_length": args.eval_max_length or preset.eval_max_length or target.max_length,
            "gen_mode": args.gen_mode or preset.gen_mode, "truth_ratio": args.truth_ratio_agg}


def evaluate(model, target: Target, sets, out_dir: Path, args, retain_log) -> dict:
    """TOFU metrics (logs written to ``out_dir``) and PS-exact/PS-perturb on retain and forget."""
    res = evaluate_tofu(model, target.tokenizer, target.template, sets, out_dir=out_dir, retain_log=retain_log,
                        ds_size=args.eval_size, batch_size=args.eval_batch_size, progress=not args.no_progress,
                        **eval_options(args, target))
    metrics = dict(res["metrics"])
    metrics.update(ps_metrics(model, target, sets, args))
    return metrics


def ps_samples(target: Target, sets, args) -> dict:
    """The rows ``--ps-protocol`` scores (fastgeffect.eval.ps_samples)."""
    return protocol_samples(args.ps_protocol, lambda name: load_tofu_split(name, target.data_dir), args.split,
                            sets, args.eval_size)


def ps_metrics(model, target: Target, sets, args) -> dict:
    """PS-exact/PS-perturb on retain and forget under ``--ps-protocol``."""
    samples = ps_samples(target, sets, args)
    return ps_report(model, target.tokenizer, target.template, samples["exact"], perturb_sets=samples["perturb"],
                     protocol=args.ps_protocol, family=PRESETS[args.preset].uwc, batch_size=args.eval_batch_size)


def before_metrics(model, target: Target, sets, args, shared: Path, retain_log) -> dict:
    """The evaluation before unlearning (logs in ``shared/eval_before``), kept in ``shared`` with
    its fingerprint: computed once per model, data and evaluation size."""
    def compute(path: Path) -> dict:
        metrics = evaluate(model, target, sets, shared / "eval_before", args, retain_log)
        write_json_main(path, metrics)
        return metrics
    fingerprint = {**before_fingerprint(target, args.split, args.eval_size, retain_log, args.ps_protocol),
                   "eval": eval_options(args, target)}
    return cached(shared / "metrics_before.json", fingerprint, compute, load_json_dict, recompute=args.overwrite,
                  lock_dir=shared)


def retain_model_log(target: Target, sets, args, shared: Path, preset: Preset) -> Optional[str]:
    """The forget-set log of a retain-only model, for Forget Quality: ``--retain-log``, computed for
    the embedded twin (kept in ``shared``), or TOFU's published one in ``--data-dir/retain_model_logs``."""
    if args.retain_log:
        return args.retain_log
    if target.retain_model_path is not None:
        def compute(path: Path) -> str:
            twin = AutoModelForCausalLM.from_pretrained(target.retain_model_path)
            evaluate_tofu(twin, target.tokenizer, target.template, {"forget": sets["forget"]},
                          out_dir=path.parent, ds_size=args.eval_size, batch_size=args.eval_batch_size,
                          progress=not args.no_progress, **eval_options(args, target))
            return str(path)

        def check(path: Path) -> str:
            load_json_dict(path)
            return str(path)
        options = eval_options(args, target)
        # the log depends on how it is generated, not on how it is aggregated
        fingerprint = {**retain_log_fingerprint(target, args.split, args.eval_size),
                       "eval": {k: options[k] for k in ("max_length", "gen_mode")}}
        return cached(shared / "retain_model" / "eval_log_forget.json", fingerprint, compute, check,
                      recompute=args.overwrite, lock_dir=shared)
    if preset.retain_log_name and target.data_dir:
        name = f"{preset.retain_log_name}_{RETAIN_OF[args.split]}_wd0.01_eval_log_forget.json"
        path = Path(target.data_dir) / "retain_model_logs" / name
        if path.exists():
            return str(path)
    print("note: no retain-model log: Forget Quality is not reported (pass --retain-log)", file=sys.stderr)
    return None


def uwc_metrics(model, target: Target, sets, out_dir: Path, args, preset: Preset, device, reference_ps,
                retain_log) -> dict:
    """UWC: mix the unlearned weights with the original's until retain PS matches ``reference_ps``
    (the original's), and evaluate the calibrated model fully, as :func:`evaluate` does (TOFU's
    metrics with Model Utility and Forget Quality, logs in ``out_dir``, and PS)."""
    original = target.load_original().to(device)
    samples = ps_samples(target, sets, args)
    res = uwc_calibrate(original, model, target.tokenizer, target.template,
                        samples["exact"]["retain"], samples["exact"]["forget"],
                        preset=preset.uwc, batch_size=args.eval_batch_size, reference_ps=reference_ps,
                        ps_protocol=args.ps_protocol,
                        report_fn=lambda mixed: evaluate(mixed, target, sets, out_dir, args, retain_log))
    return {"alpha": res["alpha"], "tolerance": res["tolerance"], "reference_ps": res["reference_ps"],
            **res["metrics"]}
