"""One G-effect study, end to end (what ``python -m fastgeffect.run`` does after parsing).

target and data → reference log-probs (cached) → evaluation before → unlearning with G-effects
every k-th step → evaluation after → UWC calibration → summary.md and plots. Everything is written
to the run folder as it goes; an interrupted run continues with ``--resume``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .. import distributed as dist_
from .. import run_files as files
from ..data.collate import collate_qa
from ..data.unlearning import UnlearningData, load_unlearning_data
from ..eval import load_tofu_sets
from ..jsonl import read_jsonl
from ..model_structure import resolve_layer
from ..objectives import OBJECTIVES, REGULARIZERS, Objective, get_objective
from ..reference import ReferenceModel, RefLogprobCache
from ..report import write_report
from ..scalars import metric_scalars
from ..training.backend import STATE_FILE, StateNotSaved, full_model_state
from ..unlearn import NonFiniteLoss, UnlearnConfig, Unlearner, config_dict
from .after_unlearning import check_attack_inputs, check_attack_settings, evaluate_after, tensorboard_log
from .artefacts import cached, reference_fingerprint, source_identity
from .config import RunConfig, as_older_run, objective_hparams, resume_defaults, settings, train_config, with_defaults
from .evaluation import before_metrics, check_eval_length, check_uwc_rows, eval_options, retain_model_log
from .inputs import check_inputs
from .launch import check_fused, launch_details, launch_strategy, make_accelerator, use_fused, whole_model
from .lm_eval_phase import checked_task_manager, tasks_phase
from .lora import adapter_note, merged, reference_of
from .presets import Preset, resolve_preset
from .privacy import privacy_inputs
from .raw_benchmarks import check_raw_inputs, muse_after, muse_before, raw_unlearning_data
from .run_context import RecordedStop, Run, Timer
from .run_folder import RunFolder
from .targets import build_target, default_ps_protocol
from .token_weights import TokenWeightLog


# ---- before the folder is claimed ------------------------------------------------------------------
def checked_settings(cfg: RunConfig, preset: Preset, accelerator) -> Tuple[RunConfig, dict, UnlearnConfig]:
    """Everything the settings say that set-up would refuse, checked before the run folder is claimed;
    the settings with the PS protocol resolved, the objective's hyper-parameters and the loop's settings."""
    if cfg.lora and dist_.is_distributed():
        raise SystemExit("--lora under a distributed launch is not supported yet: run it in one process")
    check_fused(cfg.fused)
    if cfg.geffect_guard != "none" and launch_strategy(accelerator, cfg.fsdp2) == "deepspeed":
        raise SystemExit(f"--geffect-guard {cfg.geffect_guard} is not available under DeepSpeed ZeRO-3: its retain "
                         "gradient buffer needs the reduced gradients; use DDP, FSDP2 or one process")
    if cfg.second_order and launch_strategy(accelerator, cfg.fsdp2) in ("fsdp", "fsdp2", "deepspeed"):
        raise SystemExit("--second-order is not available with sharded parameters (FSDP, FSDP2, DeepSpeed ZeRO-3): "
                         "its Hessian-vector product needs the whole parameters; use DDP or one process")
    ucfg = train_config(cfg)
    if accelerator is not None:
        dist_.check_divisible(cfg.batch_size, accelerator.num_processes, cfg.grad_accum)
    hp = objective_hparams(cfg, preset)
    get_objective(cfg.method, regularizer=cfg.regularizer, lam=cfg.lam, **hp)  # validate before any work
    check_attack_settings(cfg)
    if cfg.benchmark != "tofu":
        check_raw_inputs(cfg)
    else:
        check_inputs(model=cfg.model, retain_model=cfg.retain_model, data_dir=cfg.data_dir, authors=cfg.authors,
                     retain_log=cfg.retain_log, shared_dir=cfg.shared_dir, out=cfg.out, split=cfg.split)
    # after the --model checks: it reads the tokenizer
    return replace(cfg, ps_protocol=default_ps_protocol(cfg, preset)), hp, ucfg


def config_record(cfg: RunConfig, hp: dict, ucfg: UnlearnConfig, argv, accelerator, strategy: str) -> dict:
    """config.json as the run starts it: every setting, the objective's hyper-parameters, the loop's
    settings, the command line and the launch (set-up adds what it resolves)."""
    return {**asdict(cfg), "objective_hparams": hp, "train": config_dict(ucfg), "argv": list(argv or sys.argv[1:]),
            "distributed": {"world_size": dist_.world_size(), "grad_accum": cfg.grad_accum,
                            "per_rank_micro_batch": cfg.batch_size // (dist_.world_size() * cfg.grad_accum),
                            "strategy": strategy, **launch_details(accelerator)}}


def saved_config(out: Path) -> dict:
    """The config.json of run folder ``out`` ({} when there is none or it cannot be read: preparing
    the folder says why)."""
    try:
        saved = json.loads((out / files.CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def logged_steps(folder: RunFolder) -> int:
    """How many steps ``train_log.jsonl`` holds (a run interrupted before its first saved state);
    0 when it cannot be read (this only words a message)."""
    try:
        return len(read_jsonl(folder.path / files.TRAIN_LOG, skip_torn_tail=True))
    except (OSError, ValueError):
        return 0


def model_sources(cfg: RunConfig) -> dict:
    """The local model folders or files the run reads, by path and file signature (size, mtime), so
    that a resume over a replaced folder is refused; a hub name is recorded by its name."""
    return {k: source_identity(v) for k, v in (("model", cfg.model), ("retain_model", cfg.retain_model))
            if v is not None}


def run_study(cfg: RunConfig, argv: Optional[list] = None) -> int:
    """Check everything the settings say, claim the run folder, then run the study in it; the folder's
    lock is held until the end. Exit codes: 0 done (or stopped as asked), 130 interrupted (Ctrl-C)."""
    preset = resolve_preset(cfg.preset, cfg.model)
    cfg = with_defaults(cfg, preset)
    if cfg.resume:  # a folder of an older version continues as that version ran
        cfg = as_older_run(cfg, saved_config(Path(cfg.out)))
    accelerator = make_accelerator()
    strategy = launch_strategy(accelerator, cfg.fsdp2)
    cfg, hp, ucfg = checked_settings(cfg, preset, accelerator)
    task_manager = checked_task_manager(cfg) if dist_.is_main() else None  # --eval-tasks, checked here
    main_rank = dist_.is_main()  # only the main process writes and evaluates; the others wait at barriers
    folder = RunFolder(cfg.out)
    if main_rank:  # claimed before any work, with the settings; set-up completes config.json later
        run_settings = settings(cfg)
        folder.prepare(resume=cfg.resume, overwrite=cfg.overwrite, settings=run_settings,
                       resume_keys=list(run_settings), defaults=resume_defaults())
        sources = model_sources(cfg)
        if cfg.resume:
            folder.check_sources(sources)
        folder.write_config({**config_record(cfg, hp, ucfg, argv, accelerator, strategy),
                             **({"sources": sources} if sources else {})})
    dist_.barrier()
    timer = Timer(folder, resumed=cfg.resume)
    try:
        return study(cfg, preset, hp, ucfg, accelerator, folder, timer, task_manager)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            timer.save("interrupted")
        if main_rank:
            state = folder / STATE_FILE
            saved = f"the last resumable state is {state}" if state.exists() else \
                f"no resumable state yet ({logged_steps(folder)} logged steps will be redone)"
            print(f"\ninterrupted: {saved}; continue with --resume --out {folder.path}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                folder.write_error("interrupted (KeyboardInterrupt)", None, state)
        return 130
    except (Exception, SystemExit) as e:  # SystemExit: a refusal found once the target is loaded
        with contextlib.suppress(OSError):
            timer.save("failed")
        unrecorded = not isinstance(e, RecordedStop) and not (isinstance(e, SystemExit) and e.code in (0, None))
        if main_rank and not dist_.is_distributed() and unrecorded:
            with contextlib.suppress(OSError):  # (a distributed failure writes its own, naming the rank)
                folder.write_error(f"{type(e).__name__}: {e}", None, folder / STATE_FILE)
        raise
    finally:
        folder.release()


# ---- the study in a claimed folder -----------------------------------------------------------------
def study(cfg: RunConfig, preset: Preset, hp: dict, ucfg: UnlearnConfig, accelerator, folder: RunFolder,
          timer: Timer, task_manager=None) -> int:
    """Set-up, reference log-probs, evaluation before, unlearning, then :func:`finish`
    (``task_manager``: lm-eval's, for ``--eval-tasks``)."""
    run = set_up(cfg, preset, accelerator, folder, timer)
    check_layers(hp, run.target.model)
    run.task_manager = task_manager
    objective, data = objective_and_data(run, hp)
    before = evaluate_before(run)
    tasks_phase(run, run.target.model, "before")
    dist_.barrier()
    unlearner, resumed = make_unlearner(run, objective, data, ucfg, accelerator)
    timer.resumed = resumed  # a state was loaded (--resume of a folder with none starts afresh)
    t = time.perf_counter()
    status = unlearn(run, unlearner, before)
    run.timer.phase("unlearn", t)
    if status.get("stopped") and dist_.is_main():  # why unlearning ended before its last step, in config.json
        folder.complete_config({"unlearning_stopped": status["stopped"]})
        print(f"unlearning stopped after step {status['stopped']['step']}: {status['stopped']['reason']}")
    if not status["completed"]:
        if dist_.is_main():
            timer.save("stopped")
            folder.clear_error()
            print(f"stopped after step {status['step']} as asked; continue with --resume --out {run.out}")
        return 0
    # None off the main rank
    model = whole_model(unlearner.model, run.target.load_original, full_model_state, run.device)
    if not dist_.is_main():
        dist_.barrier()
        return 0
    try:
        finish(run, model, resumed, unlearner.step)
    finally:
        dist_.barrier()
    return 0


def check_layers(hp: dict, model) -> None:
    """RMU's and RR's block index against the target, whose block count is known once it is loaded:
    a clear refusal before any reference or evaluation work, not an error deep inside the first step."""
    for name in ("rmu_layer", "rr_layer"):
        if hp.get(name) is not None:
            try:
                resolve_layer(model, hp[name])
            except ValueError as e:
                raise SystemExit(f"--{name.replace('_', '-')} {hp[name]}: {e}") from None


def set_up(cfg: RunConfig, preset: Preset, accelerator, folder: RunFolder, timer: Timer) -> Run:
    """The target on its device (built by the main process first: the others then read its cache), and
    config.json completed with what set-up resolved."""
    main_rank = dist_.is_main()
    device = accelerator.device if accelerator is not None else \
        torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    if main_rank:  # builds (or downloads) once; the other ranks then read the cache
        target = build_target(cfg, preset, device)
    dist_.barrier()
    if not main_rank:
        target = build_target(cfg, preset, device)
    timer.phase("setup", timer.t0)
    run = Run(cfg, preset, folder, target, device, use_fused(cfg.fused, target.model), timer)
    if main_rank:  # what the flags leave to the machine must not change when resuming elsewhere
        resolved = {"fused_resolved": run.fused, "max_length_resolved": target.max_length, "device_type": device.type,
                    "dtype": str(next(target.model.parameters()).dtype).removeprefix("torch.")}
        folder.complete_config({**resolved, "setup": target.info}, must_agree=list(resolved))
        if cfg.lora:
            folder.complete_config({"geffect_over": adapter_note(target.model, cfg.lora)})
    return run


def objective_and_data(run: Run, hp: dict) -> Tuple[Objective, UnlearningData]:
    """The unlearning data and the objective, with θ_o where it needs one and the reference log-probs
    it compares with (:func:`reference_caches`)."""
    cfg, target = run.cfg, run.target
    term = OBJECTIVES[cfg.method]
    refusal_key = "forget_win" if "forget_win" in term.needs_batches else "forget_idk"
    data = raw_unlearning_data(run) if cfg.benchmark != "tofu" else load_unlearning_data(
        target.data_dir, cfg.split, target.tokenizer, target.template, target.max_length, seed=cfg.seed,
        idk=term.needs_refusals, refusal_key=refusal_key)
    t = time.perf_counter()
    # θ_o: a LoRA model with its adapters disabled, else a frozen copy when the objective runs θ_o itself
    needs_reference = term.needs_reference_model or REGULARIZERS[cfg.regularizer].needs_reference_model
    reference = reference_of(target.model) or (ReferenceModel(copy.deepcopy(target.model)) if needs_reference
                                               else None)
    objective = get_objective(cfg.method, regularizer=cfg.regularizer, lam=cfg.lam, reference=reference,
                              fused=run.fused, **hp)
    run.shared.mkdir(parents=True, exist_ok=True)
    objective.ref_caches.update(reference_caches(run, objective, data))
    run.timer.phase("reference", t)
    return objective, data


def reference_caches(run: Run, objective: Objective, data: UnlearningData) -> Dict[str, RefLogprobCache]:
    """Reference log-probs of every sub-batch the objective compares with θ_o (forget answers, and
    refusals for DPO-style objectives), computed once before unlearning and kept in ``run.shared``
    with their fingerprint (:mod:`.artefacts`)."""
    caches = {}
    for key in objective.term.ref_batches:
        name = "forget" if key == "forget" else "forget_idk"  # forget_win/forget_idk: the refusals
        ds = data.forget if name == "forget" else data.pairs.forget_idk

        def compute(path: Path, ds=ds) -> RefLogprobCache:
            loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_qa)
            # θ_o: the model before unlearning (a LoRA model's adapters disabled); every rank (deterministic)
            model = run.target.model
            cache = RefLogprobCache.compute(reference_of(model) or model, loader, device=run.device)
            if dist_.is_main():
                cache.save(path)
            return cache
        fingerprint = reference_fingerprint(run.target, run.cfg.split, name, run.cfg.seed)
        caches[key] = cached(run.shared / files.ref_logprobs(name), fingerprint, compute, RefLogprobCache.load,
                             recompute=run.cfg.overwrite, lock_dir=run.shared)
    return caches


def evaluate_before(run: Run) -> Optional[dict]:
    """Main process, with ``--eval full``: the TOFU sets and the retain twin's log behind Forget Quality
    (kept in ``run``), and the metrics before unlearning (kept in ``run.shared``); None otherwise."""
    cfg = run.cfg
    if cfg.benchmark != "tofu":
        return muse_before(run)
    run.sets = load_tofu_sets(cfg.split, run.target.data_dir) if cfg.eval == "full" and dist_.is_main() else None
    if not run.sets:
        return None
    check_eval_length(run.target, run.sets, cfg)
    check_uwc_rows(run.sets, cfg)
    check_attack_inputs(run)
    run.retain_log, note = retain_model_log(run.target, run.sets, cfg, run.shared, run.preset)
    run.privacy = privacy_inputs(run.target, run.sets, cfg, run.shared, run.retain_log,
                                 eval_options(cfg, run.target)["max_length"])
    run.folder.complete_config({"forget_quality": note, "privleak": run.privacy.note})
    t = time.perf_counter()
    before = before_metrics(run.target.model, run.target, run.sets, cfg, run.shared, run.retain_log, run.privacy)
    if run.shared != run.out:
        dist_.write_json_main(run.out / files.METRICS_BEFORE, before)
    run.timer.phase("eval_before", t)
    return before


def make_unlearner(run: Run, objective: Objective, data: UnlearningData, ucfg: UnlearnConfig,
                   accelerator) -> Tuple[Unlearner, bool]:
    """The loop, continued from the folder's saved state with ``--resume`` (and whether it was), with
    the token weights recorded up to where it starts and, per epoch, the ``--checkpoint-epochs`` models."""
    cfg, target = run.cfg, run.target
    weights = TokenWeightLog(run.out / files.TOKEN_WEIGHTS, objective, data, target.tokenizer, run.device)

    def on_epoch_end(epoch: int, u: Unlearner) -> None:
        weights.record(u.model, epoch + 1, u.step)
        if cfg.checkpoint_epochs:
            whole = whole_model(u.model, target.load_original, full_model_state, run.device)
            if whole is not None:  # a LoRA model: a merged copy (a plain model folder, as without --lora)
                merged(whole, in_place=False).save_pretrained(run.out / files.CHECKPOINTS / f"epoch-{epoch + 1}")

    # --fsdp2: sharded in place here; accelerate would wrap it in DDP
    model = dist_.fully_shard_blocks(target.model) if cfg.fsdp2 else target.model
    unlearner = Unlearner(model, objective, data, ucfg, run.out, device=run.device, progress=not cfg.no_progress,
                          on_epoch_end=on_epoch_end, accelerator=None if cfg.fsdp2 else accelerator)
    resumed = cfg.resume and unlearner.resume()
    weights.resume(unlearner.step)
    weights.start(unlearner.model, unlearner.step, unlearner.start_epoch, unlearner.start_batch)
    return unlearner, resumed


def unlearn(run: Run, unlearner: Unlearner, before: Optional[dict]) -> dict:
    """Run the loop (``before``: the metrics before unlearning, for TensorBoard); its status. A
    non-finite loss, a state that could not be saved and a failed rank stop the run, error.json
    saying why and where its last state is."""
    tb = tensorboard_log(run.cfg.report_to, run.out, unlearner.step)
    if tb is not None and unlearner.step == 0 and before:
        tb.scalars(0, metric_scalars(before, "eval_before"))
    try:
        return unlearner.run(on_step=None if tb is None else tb.step)
    except NonFiniteLoss as e:
        run.folder.write_error(str(e), unlearner.step, unlearner.state_path)
        raise RecordedStop(f"stopped: {e}; the last finite state is in {unlearner.state_path} "
                           "(train_log.jsonl holds the last finite values)") from None
    except StateNotSaved as e:
        with contextlib.suppress(OSError):  # the disk may be full: error.json may not fit either
            run.folder.write_error(str(e), unlearner.step, unlearner.state_path)
        raise RecordedStop(f"stopped: {e}") from None
    except Exception as e:
        if not dist_.is_distributed():
            raise
        # a rank failed (or saw a peer fail inside a collective): every file was written atomically or
        # line by line, so the run folder holds the last saved state and the logs up to it
        msg = (f"rank {dist_.rank()} of {dist_.world_size()} failed at step {unlearner.step}: "
               f"{type(e).__name__}: {e}")
        print(f"[fastgeffect] {msg}; continue with --resume --out {run.out}", file=sys.stderr, flush=True)
        run.folder.write_error(msg, unlearner.step, unlearner.state_path)
        raise
    finally:
        if tb is not None:
            tb.close()


# ---- after unlearning (main process) ---------------------------------------------------------------
def finish(run: Run, model, resumed: bool, step: int) -> None:
    """Save the model, evaluate after unlearning (at ``step``, the number of steps taken), calibrate
    with UWC, report."""
    model = merged(model, in_place=True)  # training is over: evaluation, UWC mixing and saving see a plain model
    if run.cfg.save_model:
        model.save_pretrained(run.out / files.MODEL)
        run.target.tokenizer.save_pretrained(run.out / files.MODEL)
    if run.muse is not None and run.cfg.eval == "full":
        muse_after(run, model, step)
    elif run.sets:
        evaluate_after(run, model, step)
    tasks_phase(run, model, "after")
    run.timer.phase("total", run.timer.t0)
    run.timer.save("done")
    run.folder.clear_error()
    summary = write_report(run.out)
    print(summary.read_text(encoding="utf-8"))
    print(f"run folder: {run.out}")
