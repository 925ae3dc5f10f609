"""Evaluation of a run's model on the main process: TOFU's metrics and logs, PS-exact/PS-perturb,
the retain model's log behind Forget Quality, and UWC calibration (docs/design.md §5; §13 for the
settings of :func:`eval_options`)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Optional, Tuple

from .. import run_files as files
from ..data.tofu import RETAIN_OF, load_tofu_split
from ..distributed import write_json_main
from ..eval import evaluate_tofu, ps_scores, uwc_calibrate, write_open_unlearning
from ..eval.ps import ps_report_rows
from ..eval.ps_samples import protocol_samples
from .artefacts import before_fingerprint, cached, load_json_dict, model_identity, retain_log_fingerprint, run_inputs
from .config import RunConfig
from .config_checks import uwc_rows_error
from .presets import PRESETS, Preset, is_published_checkpoint
from .privacy import PrivacyInputs, privacy_metrics
from .targets import Target


def eval_options(cfg: RunConfig, target: Target) -> dict:
    """How the run evaluates: the settings, else the preset's (``cfg.preset`` is resolved:
    :func:`.config.with_defaults`): TOFU's 200 tokens and generation batching for phi/llama, the training length and
    batching-independent generation for the embedded target; Truth Ratio geometric by default."""
    preset = PRESETS[cfg.preset]
    return {"max_length": cfg.eval_max_length or preset.eval_max_length or target.max_length,
            "gen_mode": cfg.gen_mode or preset.gen_mode, "truth_ratio": cfg.truth_ratio_agg}


def check_eval_length(target: Target, sets, cfg: RunConfig) -> None:
    """Every evaluated prompt must leave room for an answer token within the evaluation length: found
    before anything is computed, naming the flag and the length that fits, not deep in the evaluation."""
    max_length = eval_options(cfg, target)["max_length"]
    add_special = not target.template.chat
    longest, where = 0, None
    for name, records in sets.items():
        for r in records[:cfg.eval_size]:
            n = len(target.tokenizer(target.template.prompt(r["question"], target.tokenizer),
                                     add_special_tokens=add_special)["input_ids"])
            if n > longest:
                longest, where = n, f"{name}: {str(r['question'])[:60]!r}"
    if longest >= max_length:
        flag = "--eval-max-length" if cfg.eval_max_length else "--eval-max-length (the default is the preset's)"
        raise SystemExit(f"evaluation length {max_length} tokens leaves no answer token for the longest prompt "
                         f"({longest} tokens, {where}): set {flag} to more than {longest}")


def evaluate(model, target: Target, sets, out_dir: Path, cfg: RunConfig, retain_log,
             privacy: Optional[PrivacyInputs] = None) -> dict:
    """TOFU metrics (logs written to ``out_dir``), PS-exact/PS-perturb on retain and forget, and the
    privacy and memorisation metrics ``privacy`` asks for (None: TOFU's metrics and PS only)."""
    families = ("tofu",) if privacy is None else privacy.families
    metrics, res = {}, None
    if "tofu" in families:
        res = evaluate_tofu(model, target.tokenizer, target.template, sets, out_dir=out_dir, retain_log=retain_log,
                            ds_size=cfg.eval_size, batch_size=cfg.eval_batch_size, progress=not cfg.no_progress,
                            **eval_options(cfg, target))
        metrics.update(res["metrics"])
    metrics.update(ps_metrics(model, target, sets, cfg, out_dir))
    if privacy is not None:
        extra = privacy_metrics(model, target, sets, cfg, privacy, out_dir, eval_options(cfg, target)["max_length"])
        metrics.update(extra)
        if res is not None and extra:  # open-unlearning's files of this evaluation, with these metrics too
            write_open_unlearning(out_dir, res["logs"], res["metrics"], extra=extra)
    return metrics


def ps_samples(target: Target, sets, cfg: RunConfig) -> dict:
    """The rows ``--ps-protocol`` scores (fastgeffect.eval.ps_samples)."""
    return protocol_samples(cfg.ps_protocol, lambda name: load_tofu_split(name, target.data_dir), cfg.split,
                            sets, cfg.eval_size)


def ps_metrics(model, target: Target, sets, cfg: RunConfig, out_dir: Optional[Path] = None) -> dict:
    """PS-exact/PS-perturb on retain and forget under ``--ps-protocol``; each metric's rows (scores,
    m and n in row order: :func:`~fastgeffect.eval.ps.ps_report_rows`) in ``out_dir/ps_rows.json``."""
    samples = ps_samples(target, sets, cfg)
    rows = ps_report_rows(model, target.tokenizer, target.template, samples["exact"], perturb_sets=samples["perturb"],
                          protocol=cfg.ps_protocol, family=PRESETS[cfg.preset].uwc, batch_size=cfg.eval_batch_size)
    if out_dir is not None:  # the TOFU logs' folder, absent when --eval-metrics leaves tofu out
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_main(out_dir / files.PS_ROWS, rows)
    return {k: r["ps"] for k, r in rows.items()}


def load_before(path: Path) -> dict:
    """A cached metrics_before.json, refused (ValueError: recomputed) without the ps_rows.json of the
    same evaluation beside it: written by a version without it, or by another evaluation."""
    metrics = load_json_dict(path)
    rows = load_json_dict(path.parent / files.EVAL_BEFORE / files.PS_ROWS)
    ps = {k: v for k, v in metrics.items() if k.startswith("PS-")}
    if {k: r.get("ps") for k, r in rows.items()} != ps:
        raise ValueError(f"{files.EVAL_BEFORE}/{files.PS_ROWS} holds other PS than {path.name}")
    return metrics


def before_metrics(model, target: Target, sets, cfg: RunConfig, shared: Path, retain_log,
                   privacy: Optional[PrivacyInputs] = None) -> dict:
    """The evaluation before unlearning (logs in ``shared/eval_before``), kept in ``shared`` with
    its fingerprint: computed once per model, data and evaluation size."""
    def compute(path: Path) -> dict:
        metrics = evaluate(model, target, sets, shared / files.EVAL_BEFORE, cfg, retain_log, privacy)
        write_json_main(path, metrics)
        return metrics
    fingerprint = {**before_fingerprint(target, cfg.split, cfg.eval_size, retain_log, cfg.ps_protocol),
                   "eval": eval_options(cfg, target), **({} if privacy is None else {"privacy": privacy.fingerprint()})}
    return cached(shared / files.METRICS_BEFORE, fingerprint, compute, load_before, recompute=cfg.overwrite,
                  lock_dir=shared)


def published_log(cfg: RunConfig, preset: Preset, data_dir: Optional[str]) -> Tuple[Optional[Path], str]:
    """TOFU's published retain log for this run, or None and why it does not apply: it is the
    forget log of the published checkpoint's twin on all of TOFU, so it serves that checkpoint only."""
    if not is_published_checkpoint(cfg.model, preset):
        return None, (f"--model {cfg.model} is not {preset.published_model}, the checkpoint TOFU's published "
                      "retain logs belong to" if preset.published_model else "the preset has no published log")
    if cfg.authors is not None:
        return None, f"the published retain log covers all of TOFU, not the --authors {cfg.authors} subset"
    name = f"{preset.retain_log_name}_{RETAIN_OF[cfg.split]}_wd0.01_eval_log_forget.json"
    path = Path(data_dir) / "retain_model_logs" / name if data_dir else None
    if path is None or not path.exists():
        return None, f"TOFU's published retain log {name} is not in --data-dir/retain_model_logs"
    return path, f"TOFU's published retain log {path} (of {preset.published_model}'s retain twin)"


def retain_model_log(target: Target, sets, cfg: RunConfig, shared: Path, preset: Preset) -> Tuple[Optional[str], str]:
    """The forget-set log of the target's own retain-only twin, for Forget Quality, and a note saying
    where it came from: ``--retain-log``; computed for the twin (embedded, or ``--retain-model``),
    kept in ``shared`` with its fingerprint; or TOFU's published log when the target is the
    checkpoint it belongs to. Otherwise None, and the note says why Forget Quality is unavailable:
    a log of another model's twin would give a number with no meaning."""
    if cfg.retain_log:
        return cfg.retain_log, f"Forget Quality against --retain-log {cfg.retain_log}"
    if target.load_retain is not None:
        device = next(target.model.parameters()).device

        def compute(path: Path) -> str:
            twin = target.load_retain().to(device)
            evaluate_tofu(twin, target.tokenizer, target.template, {"forget": sets["forget"]},
                          out_dir=path.parent, ds_size=cfg.eval_size, batch_size=cfg.eval_batch_size,
                          progress=not cfg.no_progress, **eval_options(cfg, target))
            return str(path)

        def check(path: Path) -> str:
            load_json_dict(path)
            return str(path)
        options = eval_options(cfg, target)
        # the log depends on how it is generated, not on how it is aggregated
        fingerprint = {**retain_log_fingerprint(target, cfg.split, cfg.eval_size),
                       "eval": {k: options[k] for k in ("max_length", "gen_mode")}}
        log = cached(shared / "retain_model" / "eval_log_forget.json", fingerprint, compute, check,
                     recompute=cfg.overwrite, lock_dir=shared)
        return log, f"Forget Quality against the retain twin {target.retain_model_path} (its log: {log})"
    path, why = published_log(cfg, preset, target.data_dir)
    if path is not None:
        return str(path), f"Forget Quality against {why}"
    note = f"Forget Quality is unavailable: {why}; pass --retain-model DIR (the retain-only twin) or --retain-log"
    print(f"note: {note}", file=sys.stderr)
    return None, note


def heldout_rows(sets, cfg: RunConfig) -> list:
    """``--uwc-rows heldout``'s calibration rows: the ``--eval-size`` retain rows after the reported
    ones (``clean``'s first ``--eval-size``), fewer where the set ends."""
    return list(sets["retain"][cfg.eval_size:2 * cfg.eval_size])


def check_uwc_rows(sets, cfg: RunConfig) -> None:
    """``--uwc-rows heldout`` under the resolved PS protocol, with rows left after the reported ones:
    refused before the evaluation before unlearning, not after unlearning."""
    error = uwc_rows_error(cfg, cfg.ps_protocol)
    if error is None and cfg.uwc_rows == "heldout" and not heldout_rows(sets, cfg):
        error = (f"--uwc-rows heldout: the retain set has {len(sets['retain'])} rows, all of them reported with "
                 f"--eval-size {cfg.eval_size}: none is left to calibrate on; lower --eval-size or use --uwc-rows "
                 "reported")
    if error is not None:
        raise SystemExit(error)


def heldout_reference(original, target: Target, rows: list, first: int, cfg: RunConfig, preset: Preset,
                      shared: Optional[Path]) -> float:
    """The original's retain PS-exact on the calibration rows, kept in ``shared`` with its
    fingerprint (which holds the rows' digest: never a number of other rows)."""
    kw = dict(protocol=cfg.ps_protocol, family=preset.uwc, batch_size=cfg.eval_batch_size)

    def compute(path: Optional[Path]) -> dict:
        value = {"PS-exact retain": ps_scores(original, target.tokenizer, target.template, rows, **kw)["ps"],
                 "first_row": first, "count": len(rows)}
        if path is not None:
            write_json_main(path, value)
        return value
    if shared is None:
        return compute(None)["PS-exact retain"]
    fingerprint = {"artefact": "uwc_reference", "model": model_identity(original), **run_inputs(target, cfg.split),
                   "ps_protocol": cfg.ps_protocol, "family": preset.uwc, "first_row": first,
                   "rows_sha256": hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()}
    return cached(shared / files.UWC_REFERENCE, fingerprint, compute, load_json_dict, recompute=cfg.overwrite,
                  lock_dir=shared)["PS-exact retain"]


def uwc_metrics(model, target: Target, sets, out_dir: Path, cfg: RunConfig, preset: Preset, device, reference_ps,
                retain_log, privacy: Optional[PrivacyInputs] = None, shared: Optional[Path] = None) -> dict:
    """UWC: mix the unlearned weights with the original's until retain PS matches the original's
    (``reference_ps``, on the reported rows; with ``--uwc-rows heldout`` on the rows after them,
    computed once and kept in ``shared``), and evaluate the calibrated model fully, as
    :func:`evaluate` does (TOFU's metrics with Model Utility and Forget Quality, logs in ``out_dir``, and PS)."""
    original = target.load_original().to(device)
    samples = ps_samples(target, sets, cfg)
    # the first row's index where the rows are consecutive (clean's), None for a protocol's own draws
    retain, first = samples["exact"]["retain"], 0 if cfg.ps_protocol == "clean" else None
    if cfg.uwc_rows == "heldout":
        retain, first = heldout_rows(sets, cfg), cfg.eval_size
        reference_ps = heldout_reference(original, target, retain, first, cfg, preset, shared)
    res = uwc_calibrate(original, model, target.tokenizer, target.template, retain, samples["exact"]["forget"],
                        preset=preset.uwc, batch_size=cfg.eval_batch_size, reference_ps=reference_ps,
                        ps_protocol=cfg.ps_protocol,
                        report_fn=lambda mixed: evaluate(mixed, target, sets, out_dir, cfg, retain_log, privacy))
    calibration = {"first_row": first, "count": len(retain), "reference_ps": res["reference_ps"]}
    return {"alpha": res["alpha"], "tolerance": res["tolerance"], "reference_ps": res["reference_ps"],
            "calibration_rows": cfg.uwc_rows, "calibration": calibration, **res["metrics"]}
