"""One G-effect study, end to end (what ``python -m fastgeffect.run`` does after parsing).

target and data → reference log-probs (cached) → evaluation before → unlearning with G-effects
every k-th step → evaluation after → UWC calibration → summary.md and plots. Everything is written
to the run folder as it goes; an interrupted run continues with ``--resume``.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

import torch

from .. import distributed as dist_
from .. import run_files as files
from ..data.collate import collate_pairs, collate_qa
from ..data.unlearning import UnlearningData, load_unlearning_data
from ..eval import load_tofu_sets
from ..jsonfile import read_json
from ..jsonl import append_jsonl, read_jsonl, truncate_jsonl
from ..objectives import HPARAMS, OBJECTIVES, REGULARIZERS, Objective, get_objective
from ..reference import ReferenceModel, RefLogprobCache
from ..report import write_report
from ..scalars import metric_scalars
from ..tensorboard import TensorBoardLog
from ..training.backend import STATE_FILE, StateNotSaved, full_model_state
from ..training.batches import to_device
from ..unlearn import NonFiniteLoss, UnlearnConfig, Unlearner, config_dict
from .artefacts import cached, reference_fingerprint
from .cli import pg_steps, settings
from .evaluation import before_metrics, evaluate, retain_model_log, uwc_metrics
from .inputs import check_inputs
from .launch import check_fused, launch_details, launch_strategy, make_accelerator, use_fused, whole_model
from .lora import adapter_note, merged, reference_of
from .presets import Preset, resolve_preset
from .run_folder import RunFolder
from .targets import Target, build_target, default_ps_protocol


def objective_hparams(args, preset: Preset) -> dict:
    """The objective hyper-parameters given on the command line, plus the preset's for those the
    objective (or its regulariser) accepts and the command line leaves unset."""
    accepted = set(OBJECTIVES[args.method].defaults) | set(REGULARIZERS[args.regularizer].defaults)
    hp = {}
    for name in HPARAMS:
        value = getattr(args, name)
        if value is None and name in accepted:
            value = preset.hparams.get(name)
        if value is not None:
            hp[name] = value
    return hp


def train_config(args) -> UnlearnConfig:
    cfg = UnlearnConfig(epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                        max_grad_norm=args.max_grad_norm, geffect_every=args.geffect_every,
                        geffect_batch=args.geffect_batch, geffect_groups=args.geffect_groups,
                        update_effects=args.update_effects == "on",
                        pg_steps=pg_steps(args), save_every=args.save_every, seed=args.seed,
                        stop_at_step=args.stop_at_step)
    cfg.check()
    return cfg


def reference_caches(objective: Objective, target: Target, data: UnlearningData, shared: Path, device,
                     args) -> Dict[str, RefLogprobCache]:
    """Reference log-probs of every sub-batch the objective compares with θ_o (forget answers, and
    refusals for DPO-style objectives), computed once before unlearning and kept in ``shared``
    with their fingerprint (:mod:`.artefacts`)."""
    caches = {}
    for key in objective.term.ref_batches:
        name = "forget" if key == "forget" else "forget_idk"  # forget_win/forget_idk: the refusals
        ds = data.forget if name == "forget" else data.pairs.forget_idk

        def compute(path: Path, ds=ds) -> RefLogprobCache:
            loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_qa)
            # θ_o: the model before unlearning (a LoRA model's adapters disabled); every rank (deterministic)
            cache = RefLogprobCache.compute(reference_of(target.model) or target.model, loader, device=device)
            if dist_.is_main():
                cache.save(path)
            return cache
        caches[key] = cached(shared / files.ref_logprobs(name), reference_fingerprint(target, args.split, name,
                             args.seed), compute, RefLogprobCache.load, recompute=args.overwrite, lock_dir=shared)
    return caches


def token_weight_rows(objective: Objective, model, data: UnlearningData, tokenizer, epoch: int, step: int,
                      device, n: int = 3) -> List[dict]:
    """Per-token objective weights of the first ``n`` forget samples (for the heat-map)."""
    items = [data.pairs[i] for i in range(min(n, len(data.pairs)))]
    batch = to_device(collate_pairs(items), device)
    was = model.training
    model.eval()
    with torch.no_grad():
        _, details = objective.forget_loss(model, batch)
    dist_.reshard(model)
    model.train(was)
    if "weights" not in details:
        return []
    rows = []
    f = batch[objective.term.needs_batches[0]]  # the batch the term weighs (PO: the refusals)
    for r in range(f["labels"].shape[0]):
        mask = details["mask"][r]
        ids = f["labels"][r][mask].tolist()
        rows.append({"step": step, "epoch": epoch, "index": int(f["index"][r]),
                     "tokens": tokenizer.convert_ids_to_tokens(ids), "weights": details["weights"][r][mask].tolist()})
    return rows


def resume_token_weights(path: Path, step: int) -> Set[int]:
    """Drop the token-weight rows recorded after the saved ``step`` (the resumed run records them
    again) and a torn last line; the epochs whose rows remain. Rows at ``step`` itself stay: an
    epoch's rows are recorded after its state is saved, and a run resumed from that state does not
    pass that epoch end again."""
    if not path.exists():
        return set()
    truncate_jsonl(path, step + 1)
    return {r["epoch"] for r in read_jsonl(path)}


def tensorboard_log(args, out: Path, step: int) -> Optional[TensorBoardLog]:
    """With ``--report-to tensorboard``, on the main process: event files in ``<out>/tensorboard``
    from ``step`` on (what an interrupted attempt wrote from there is hidden)."""
    if args.report_to != "tensorboard" or not dist_.is_main():
        return None
    return TensorBoardLog(out / files.TENSORBOARD, purge_step=step)


class Timer:
    """Seconds spent per phase of this invocation."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: Dict[str, float] = {}

    def phase(self, name: str, since: float) -> None:
        self.times[name] = time.perf_counter() - since


def run_study(args, argv: Optional[List[str]] = None) -> int:
    """Check everything the flags say, claim the run folder, then run the study in it; the folder's
    lock is held until the end. Exit codes: 0 done (or stopped as asked), 130 interrupted (Ctrl-C)."""
    preset = resolve_preset(args.preset, args.model)
    args.preset = preset.name
    args.lr = args.lr if args.lr is not None else preset.lr
    args.gen_mode = args.gen_mode or preset.gen_mode  # named in config.json and the summary
    term = OBJECTIVES[args.method]
    args.regularizer = args.regularizer or term.default_regularizer
    accelerator = make_accelerator()
    strategy = launch_strategy(accelerator, args.fsdp2)
    if args.lora and dist_.is_distributed():
        raise SystemExit("--lora under a distributed launch is not supported yet: run it in one process")
    check_fused(args.fused)
    ucfg = train_config(args)
    if accelerator is not None:
        dist_.check_divisible(args.batch_size, accelerator.num_processes, args.grad_accum)
    hp = objective_hparams(args, preset)
    get_objective(args.method, regularizer=args.regularizer, lam=args.lam, **hp)  # validate before any work
    check_inputs(args)
    args.ps_protocol = default_ps_protocol(args, preset)  # after the --model checks: it reads the tokenizer
    main_rank = dist_.is_main()  # only the main process writes and evaluates; the others wait at barriers
    folder = RunFolder(args.out)
    if main_rank:  # claimed before any work, with the settings; set-up completes config.json later
        run_settings = settings(args)
        folder.prepare(resume=args.resume, overwrite=args.overwrite, settings=run_settings,
                       resume_keys=list(run_settings))
        folder.write_config({
            **vars(args), "objective_hparams": hp, "train": config_dict(ucfg), "argv": list(argv or sys.argv[1:]),
            "distributed": {"world_size": dist_.world_size(), "grad_accum": args.grad_accum,
                            "per_rank_micro_batch": args.batch_size // (dist_.world_size() * args.grad_accum),
                            "strategy": strategy, **launch_details(accelerator)}})
    dist_.barrier()
    try:
        return study(args, preset, hp, ucfg, accelerator, folder)
    except KeyboardInterrupt:
        if main_rank:
            state = folder / STATE_FILE
            saved = f"the last resumable state is {state}" if state.exists() else "no resumable state yet"
            print(f"\ninterrupted: {saved}; continue with --resume --out {folder.path}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                folder.write_error("interrupted (KeyboardInterrupt)", None, state)
        return 130
    except Exception as e:
        if main_rank and not dist_.is_distributed():  # (a distributed failure writes its own, naming the rank)
            with contextlib.suppress(OSError):
                folder.write_error(f"{type(e).__name__}: {e}", None, folder / STATE_FILE)
        raise
    finally:
        folder.release()


def study(args, preset: Preset, hp: dict, ucfg: UnlearnConfig, accelerator, folder: RunFolder) -> int:
    """The study in a claimed run folder: set-up, reference log-probs, evaluation before, unlearning,
    then :func:`finish`."""
    main_rank = dist_.is_main()
    term = OBJECTIVES[args.method]
    out = folder.path
    device = accelerator.device if accelerator is not None else \
        torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    timer = Timer()

    if main_rank:  # builds (or downloads) once; the other ranks then read the cache
        target = build_target(args, preset, device)
    dist_.barrier()
    if not main_rank:
        target = build_target(args, preset, device)
    timer.phase("setup", timer.t0)
    fused = use_fused(args.fused, target.model)
    if main_rank:  # what the flags leave to the machine must not change when resuming elsewhere
        resolved = {"fused_resolved": fused, "max_length_resolved": target.max_length, "device_type": device.type,
                    "dtype": str(next(target.model.parameters()).dtype).removeprefix("torch.")}
        folder.complete_config({**resolved, "setup": target.info}, must_agree=list(resolved))
        if args.lora:
            folder.complete_config({"geffect_over": adapter_note(target.model, args.lora)})

    refusal_key = "forget_win" if "forget_win" in term.needs_batches else "forget_idk"
    data = load_unlearning_data(target.data_dir, args.split, target.tokenizer, target.template, target.max_length,
                                seed=args.seed, idk=term.needs_refusals, refusal_key=refusal_key)
    model = target.model
    t = time.perf_counter()
    # θ_o: a LoRA model with its adapters disabled, else a frozen copy when the objective runs θ_o itself
    needs_reference = term.needs_reference_model or REGULARIZERS[args.regularizer].needs_reference_model
    reference = reference_of(model) or (ReferenceModel(copy.deepcopy(model)) if needs_reference else None)
    objective = get_objective(args.method, regularizer=args.regularizer, lam=args.lam, reference=reference,
                              fused=fused, **hp)
    shared = Path(args.shared_dir) if args.shared_dir else out
    shared.mkdir(parents=True, exist_ok=True)
    objective.ref_caches.update(reference_caches(objective, target, data, shared, device, args))
    timer.phase("reference", t)

    sets = load_tofu_sets(args.split, target.data_dir) if args.eval == "full" and main_rank else None
    retain_log = None
    if sets:
        retain_log, note = retain_model_log(target, sets, args, shared, preset)
        folder.complete_config({"forget_quality": note})
        t = time.perf_counter()
        before = before_metrics(model, target, sets, args, shared, retain_log)
        if shared != out:
            dist_.write_json_main(out / files.METRICS_BEFORE, before)
        timer.phase("eval_before", t)
    dist_.barrier()

    recorded: Set[int] = set()  # epochs whose token-weight rows are in the file (0: before unlearning)

    def record_token_weights(u: Unlearner, epoch: int, step: int) -> None:
        if epoch in recorded:  # recorded before the state this run resumed from
            return
        # every rank runs the forward (a sharded model needs all of them); the main one writes
        rows = token_weight_rows(objective, u.model, data, target.tokenizer, epoch, step, device)
        if main_rank:
            append_jsonl(out / files.TOKEN_WEIGHTS, rows)
        recorded.add(epoch)

    def on_epoch_end(epoch: int, u: Unlearner) -> None:
        record_token_weights(u, epoch + 1, u.step)
        if args.checkpoint_epochs:
            whole = whole_model(u.model, target.load_original, full_model_state, device)
            if whole is not None:  # a LoRA model: a merged copy (a plain model folder, as without --lora)
                merged(whole, in_place=False).save_pretrained(out / files.CHECKPOINTS / f"epoch-{epoch + 1}")

    if args.fsdp2:  # sharded in place here; accelerate would wrap it in DDP
        model = dist_.fully_shard_blocks(model)
    unlearner = Unlearner(model, objective, data, ucfg, out, device=device, progress=not args.no_progress,
                          on_epoch_end=on_epoch_end, accelerator=None if args.fsdp2 else accelerator)
    resumed = args.resume and unlearner.resume()
    recorded.update(dist_.broadcast_object(resume_token_weights(out / files.TOKEN_WEIGHTS, unlearner.step)
                                           if main_rank else None))
    # the rows of the weights training starts from: the target's (step -1), or those of the epoch end the
    # state was saved at (the state is saved before its epoch's rows are recorded)
    if unlearner.step == 0:
        record_token_weights(unlearner, 0, -1)
    elif unlearner.start_batch == 0:
        record_token_weights(unlearner, unlearner.start_epoch, unlearner.step)
    tb = tensorboard_log(args, out, unlearner.step)
    if tb is not None and unlearner.step == 0 and sets:
        tb.scalars(0, metric_scalars(before, "eval_before"))
    t = time.perf_counter()
    try:
        status = unlearner.run(on_step=None if tb is None else tb.step)
    except NonFiniteLoss as e:
        folder.write_error(str(e), unlearner.step, unlearner.state_path)
        raise SystemExit(f"stopped: {e}; the last finite state is in {unlearner.state_path} "
                         "(train_log.jsonl holds the last finite values)") from None
    except StateNotSaved as e:
        with contextlib.suppress(OSError):  # the disk may be full: error.json may not fit either
            folder.write_error(str(e), unlearner.step, unlearner.state_path)
        raise SystemExit(f"stopped: {e}") from None
    except Exception as e:
        if not dist_.is_distributed():
            raise
        # a rank failed (or saw a peer fail inside a collective): every file was written atomically or
        # line by line, so the run folder holds the last saved state and the logs up to it
        msg = (f"rank {dist_.rank()} of {dist_.world_size()} failed at step {unlearner.step}: "
               f"{type(e).__name__}: {e}")
        print(f"[fastgeffect] {msg}; continue with --resume --out {out}", file=sys.stderr, flush=True)
        folder.write_error(msg, unlearner.step, unlearner.state_path)
        raise
    finally:
        if tb is not None:
            tb.close()
    timer.phase("unlearn", t)
    if not status["completed"]:
        if main_rank:
            folder.clear_error()
            print(f"stopped after step {status['step']} as asked; continue with --resume --out {out}")
        return 0
    model = whole_model(unlearner.model, target.load_original, full_model_state, device)  # None off the main rank
    if not main_rank:
        dist_.barrier()
        return 0
    try:
        finish(args, target, preset, model, sets, retain_log, folder, device, timer, resumed, unlearner.step)
    finally:
        dist_.barrier()
    return 0


def finish(args, target: Target, preset: Preset, model, sets, retain_log, folder: RunFolder, device,
           timer: Timer, resumed: bool, step: int) -> None:
    """Main process: save the model, evaluate after unlearning (at ``step``, the number of steps taken),
    calibrate with UWC, report."""
    out = folder.path
    model = merged(model, in_place=True)  # training is over: evaluation, UWC mixing and saving see a plain model
    tb = tensorboard_log(args, out, step) if sets else None
    if args.save_model:
        model.save_pretrained(out / files.MODEL)
        target.tokenizer.save_pretrained(out / files.MODEL)
    if sets:
        t = time.perf_counter()
        after = evaluate(model, target, sets, out / files.EVAL_AFTER, args, retain_log)
        dist_.write_json_main(out / files.METRICS_AFTER, after)
        if tb is not None:
            tb.scalars(step, metric_scalars(after, "eval_after"))
        timer.phase("eval_after", t)
        if not args.no_uwc:
            t = time.perf_counter()
            before = read_json(out / files.METRICS_BEFORE)
            uwc = uwc_metrics(model, target, sets, out / files.EVAL_UWC, args, preset, device,
                              before.get("PS-exact retain"), retain_log)
            dist_.write_json_main(out / files.METRICS_UWC, uwc)
            if tb is not None:
                tb.scalars(step, metric_scalars(uwc, "eval_uwc"))
            timer.phase("uwc", t)
        if tb is not None:
            tb.close()
    timer.phase("total", timer.t0)
    folder.add_timing(timer.times, resumed)
    folder.clear_error()
    summary = write_report(out)
    print(summary.read_text(encoding="utf-8"))
    print(f"run folder: {out}")
