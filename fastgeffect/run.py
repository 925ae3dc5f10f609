"""One G-effect study of an unlearning objective, end to end.

    python -m fastgeffect.run --method tnpo              # offline default: builds its own tiny target
    python -m fastgeffect.run --method npo --data-dir ../shared/tofu --authors 20   # real TOFU text
    python -m fastgeffect.run --method wtnpo --model locuslab/tofu_ft_phi-1.5 --preset phi --split forget05

Steps: target model and data → reference log-probs (cached) → evaluation before → unlearning
with unlearning/retaining G-effects at every k-th step → evaluation after (TOFU metrics, PS) →
UWC calibration → summary.md and plots. Everything is written to ``--out`` as it goes; an
interrupted run continues with ``--resume``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import distributed as dist_

from .data.collate import collate_pairs, collate_qa
from .data.templates import Template, get_template
from .data.tofu import RETAIN_OF
from .data.unlearning import UnlearningData, load_unlearning_data
from .eval import load_tofu_sets
from .geffect.log import truncate_jsonl
from .objectives import OBJECTIVES, REGULARIZER_NAMES, Objective, get_objective
from .reference import RefLogprobCache, ReferenceModel
from .training.backend import full_model_state
from .training.batches import to_device
from .unlearn import NonFiniteLoss, UnlearnConfig, Unlearner, config_dict

# Paper hyper-parameters (DESIGN.md §3, §6). "embedded" fits the tiny offline target on a CPU.
PRESETS: Dict[str, dict] = {
    "embedded": {"lr": 1e-3, "template": "phi", "uwc": "phi", "rmu_layer": None, "steering_coeff": 4.0,
                 "max_length": None, "retain_log_name": None},
    "phi": {"lr": 2e-5, "template": "phi", "uwc": "phi", "rmu_layer": 9, "steering_coeff": 4.0,
            "max_length": 500, "retain_log_name": "phi"},
    "llama": {"lr": 1e-5, "template": "llama2", "uwc": "llama2", "rmu_layer": 21, "steering_coeff": 2.0,
              "max_length": 500, "retain_log_name": "llama2-7b"},
}
# objective hyper-parameter flags -> objective keyword
HPARAM_FLAGS = {"alpha": "alpha", "beta": "beta", "delta": "delta", "wtnpo_form": "form", "rmu_layer": "layer",
                "steering_coeff": "steering_coeff", "kl_direction": "kl_direction", "kl_positions": "kl_positions",
                "rr_layer": "rr_layer"}
# flags that must agree with the saved config when resuming
RESUME_KEYS = ("method", "regularizer", "split", "size", "data_dir", "authors", "model", "preset", "seed",
               "epochs", "batch_size", "grad_accum", "lr", "lam", "alpha", "beta", "geffect_every")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastgeffect.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("objective")
    g.add_argument("--method", default="tnpo", choices=sorted(OBJECTIVES), help="unlearning objective")
    g.add_argument("--regularizer", default=None, choices=REGULARIZER_NAMES,
                   help="retain regulariser (default: the objective's own: gd for graddiff/simnpo/dpo/idkdpo, "
                        "rr for rmu, none otherwise)")
    g.add_argument("--lam", type=float, default=1.0, help="weight λ of the regulariser")
    g.add_argument("--alpha", type=float, default=None, help="WGA/WTNPO α (default: the objective's)")
    g.add_argument("--beta", type=float, default=None, help="NPO/TNPO/WTNPO/SimNPO/DPO β (default: the objective's)")
    g.add_argument("--delta", type=float, default=None, help="SimNPO δ")
    g.add_argument("--wtnpo-form", default=None, choices=("eq16", "product"),
                   help="WTNPO weight: paper eq. 16, or the paper code's TNPO weight × p^α")
    g.add_argument("--rmu-layer", type=int, default=None, help="RMU block (default: preset's, else the middle)")
    g.add_argument("--steering-coeff", type=float, default=None, help="RMU control-vector scale c")
    g.add_argument("--kl-direction", default=None, choices=("forward", "reverse"),
                   help="KL regulariser: forward = KL(p_ref‖p_θ) (TOFU), reverse = KL(p_θ‖p_ref)")
    g.add_argument("--kl-positions", default=None, choices=("all", "answer"),
                   help="KL over all positions (TOFU parity) or answer tokens only")
    g.add_argument("--rr-layer", type=int, default=None, help="RR regulariser block (default: the middle)")
    g.add_argument("--fused", default="auto", choices=("auto", "on", "off"),
                   help="fused LM-head losses that never hold (tokens × vocab) logits (Triton on CUDA, chunked "
                        "torch on CPU) for the token-weighted objectives and GD; auto: on when the model exposes "
                        "a plain linear LM head")

    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="hub name or local path of the target model (default: the embedded offline target)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="paper hyper-parameters and template (default: embedded, or phi with --model)")
    g.add_argument("--split", default="forget10", choices=sorted(RETAIN_OF), help="TOFU forget split")
    g.add_argument("--data-dir", default=None,
                   help="folder of TOFU JSON-lines files (e.g. ../shared/tofu); with --model and no --data-dir "
                        "TOFU is downloaded from the hub")
    g.add_argument("--authors", type=int, default=None,
                   help="with --data-dir and no --model: real TOFU text restricted to N authors, on the embedded "
                        "tiny model pipeline")
    g.add_argument("--size", default="default", choices=("default", "tiny"),
                   help="size of the embedded target (tiny: seconds, for tests)")
    g.add_argument("--max-length", type=int, default=None, help="token length of QA items (default: preset's)")
    g.add_argument("--retain-log", default=None,
                   help="eval_log_forget.json of a retain-only model for Forget Quality (embedded: computed)")
    g.add_argument("--cache-dir", default=None, help="cache of embedded models (default $FASTGEFFECT_CACHE)")
    g.add_argument("--shared-dir", default=None,
                   help="folder for what only depends on the target and data (reference log-probs, the "
                        "retain model's log, evaluation before unlearning), reused by runs that share them "
                        "(sweeps); default: the run folder")

    g = ap.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--batch-size", type=int, default=16, help="forget samples per optimiser step (+ as many retain)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (exact accumulation)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: preset's)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length, then linear decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--fsdp2", action="store_true",
                   help="under torchrun: shard with torch's FSDP2 (fully_shard per decoder block) instead of DDP "
                        "(under accelerate launch, use configs/accelerate/fsdp.yaml instead)")
    g.add_argument("--bf16", action="store_true", help="bf16 weights (default on CUDA with --model)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="(default on CUDA with --model)")

    g = ap.add_argument_group("G-effects")
    g.add_argument("--geffect-every", type=int, default=1, help="measure every K steps (0: never)")
    g.add_argument("--geffect-batch", type=int, default=16, help="samples in each risk batch")
    g.add_argument("--geffect-groups", default="paper", choices=("paper", "blocks", "params"))
    g.add_argument("--pg-steps", default="0,-1",
                   help="comma-separated steps with per-sample PG-effects (-1: the last step; empty: none)")

    g = ap.add_argument_group("evaluation and outputs")
    g.add_argument("--eval", default="full", choices=("full", "none"),
                   help="TOFU metrics + PS before/after + UWC calibration, or none")
    g.add_argument("--eval-size", type=int, default=300, help="rows per evaluation set (TOFU's ds_size)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--no-uwc", action="store_true", help="skip UWC calibration")
    g.add_argument("--out", default=None, help="run folder (default runs/<method>-<regularizer>-<split>-seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--save-model", action="store_true", help="save the unlearned model to <out>/model")
    g.add_argument("--checkpoint-epochs", action="store_true",
                   help="save the model after every epoch to <out>/checkpoints/epoch-K (post-hoc G-effects)")
    g.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (0: epoch ends)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after N steps with the state saved, as if interrupted (continue with --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


@dataclass
class Setup:
    """The target model and everything the run reads."""
    model: torch.nn.Module
    tokenizer: object
    template: Template
    data_dir: Optional[str]
    max_length: int
    load_original: Callable[[], torch.nn.Module]  # a fresh θ_o (for UWC mixing), on CPU
    retain_model_path: Optional[Path] = None  # embedded retain twin, for Forget Quality
    info: Optional[dict] = None


def resolve_preset(args) -> dict:
    name = args.preset or ("phi" if args.model else "embedded")
    if args.model is None and name != "embedded":
        raise SystemExit(f"--preset {name} needs --model (the embedded target uses the 'embedded' preset)")
    return {"name": name, **PRESETS[name]}


def setup_embedded(args, device) -> Setup:
    from .embedded import build_embedded

    if args.authors is not None and args.data_dir is None:
        raise SystemExit("--authors needs --data-dir (a folder of TOFU files such as ../shared/tofu)")
    if args.data_dir is not None and args.authors is None:
        raise SystemExit("without --model, --data-dir needs --authors N (real TOFU text on the tiny pipeline)")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise SystemExit(f"--data-dir {args.data_dir} is not a folder")
    emb = build_embedded(args.cache_dir, size=args.size, seed=args.seed, forget_split=args.split,
                         tofu_dir=args.data_dir, n_authors=args.authors)
    model = emb.load_target().to(device)
    return Setup(model, emb.tokenizer, emb.template, str(emb.data_dir), args.max_length or emb.max_length,
                 lambda: emb.load_target(), emb.retain_path,
                 {"target": str(emb.target_path), "retain": str(emb.retain_path),
                  "target_report": {k: v for k, v in emb.reports["target"].items() if k != "epoch_loss"}})


def setup_hub(args, preset: dict, device) -> Setup:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if (args.bf16 or device.type == "cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # TOFU pads with EOS
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device)
    if args.gradient_checkpointing or device.type == "cuda":
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return Setup(model, tokenizer, get_template(preset["template"]), args.data_dir,
                 args.max_length or preset["max_length"],
                 lambda: AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype), None,
                 {"model": args.model, "dtype": str(dtype)})


def objective_kwargs(args, preset: dict) -> dict:
    hp = {}
    for flag, key in HPARAM_FLAGS.items():
        v = getattr(args, flag)
        if v is None and flag in ("rmu_layer", "steering_coeff") and args.method == "rmu":
            v = preset[flag]
        if v is not None:
            hp[key] = v
    return hp


def prepare_out(args) -> Path:
    reg = args.regularizer or OBJECTIVES[args.method].default_regularizer
    out = Path(args.out or f"runs/{args.method}-{reg}-{args.split}-seed{args.seed}")
    cfg_path = out / "config.json"
    if cfg_path.exists():
        if args.overwrite:
            shutil.rmtree(out)
        elif args.resume:
            saved = json.loads(cfg_path.read_text())
            diff = {k: (saved.get(k), getattr(args, k)) for k in RESUME_KEYS if saved.get(k) != getattr(args, k)}
            if diff:
                raise SystemExit(f"--resume: {out} was run with other settings {diff} (saved, now)")
        else:
            raise SystemExit(f"{out} holds another run (config.json): pass --resume to continue it or "
                             "--overwrite to replace it")
    elif args.resume and out.exists() and any(out.iterdir()):
        raise SystemExit(f"--resume: {out} has no config.json, it is not a run folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(model, setup: Setup, sets, out_dir: Path, args, retain_log) -> dict:
    """TOFU metrics (logs written to ``out_dir``) and PS-exact/PS-perturb on retain and forget."""
    from .eval import evaluate_tofu, ps_report

    res = evaluate_tofu(model, setup.tokenizer, setup.template, sets, out_dir=out_dir, retain_log=retain_log,
                        ds_size=args.eval_size, max_length=setup.max_length, batch_size=args.eval_batch_size,
                        progress=not args.no_progress)
    metrics = dict(res["metrics"])
    ps_sets = {"retain": sets["retain"][:args.eval_size], "forget": sets["forget"][:args.eval_size]}
    metrics.update(ps_report(model, setup.tokenizer, setup.template, ps_sets, batch_size=args.eval_batch_size))
    return metrics


def retain_model_log(setup: Setup, sets, args, shared: Path, preset: dict):
    """The forget-set log of a retain-only model, for Forget Quality: computed for the embedded twin
    (cached in the run folder), or TOFU's published one found in ``--data-dir/retain_model_logs``."""
    if args.retain_log:
        return args.retain_log
    if setup.retain_model_path is not None:
        path = shared / "retain_model" / "eval_log_forget.json"
        if not path.exists():
            from transformers import AutoModelForCausalLM

            from .eval import evaluate_tofu

            twin = AutoModelForCausalLM.from_pretrained(setup.retain_model_path)
            evaluate_tofu(twin, setup.tokenizer, setup.template, {"forget": sets["forget"]},
                          out_dir=path.parent, ds_size=args.eval_size, max_length=setup.max_length,
                          batch_size=args.eval_batch_size, progress=not args.no_progress)
        return str(path)
    if preset["retain_log_name"] and setup.data_dir:
        name = f"{preset['retain_log_name']}_{RETAIN_OF[args.split]}_wd0.01_eval_log_forget.json"
        path = Path(setup.data_dir) / "retain_model_logs" / name
        if path.exists():
            return str(path)
    print("note: no retain-model log: Forget Quality is not reported (pass --retain-log)", file=sys.stderr)
    return None


def reference_caches(objective: Objective, model, data: UnlearningData, shared: Path,
                     device) -> Dict[str, RefLogprobCache]:
    """Reference log-probs of the forget answers (and of the refusals, for DPO-style objectives),
    computed once with the model before unlearning and kept in the run folder."""
    parts = {"forget": data.forget}
    if objective.name in ("dpo", "idkdpo") and data.pairs.forget_idk is not None:
        parts["forget_idk"] = data.pairs.forget_idk
    caches = {}
    for key, ds in parts.items():
        path = shared / f"ref_logprobs_{key}.pt"
        if path.exists():
            caches[key] = RefLogprobCache.load(path)
            continue
        loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=collate_qa)
        cache = RefLogprobCache.compute(model, loader, device=device)  # every rank (deterministic)
        if dist_.is_main():
            cache.save(path)
        caches[key] = cache
    if "forget_idk" in caches and objective.name == "dpo":
        caches["forget_win"] = caches.pop("forget_idk")
    return caches


class WinFromIdk(torch.utils.data.Dataset):
    """DPO's preferred answers are the refusals: expose ``forget_idk`` as ``forget_win``."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def set_epoch(self, epoch):
        self.pairs.set_epoch(epoch)

    @property
    def forget_idk(self):
        return self.pairs.forget_idk

    def __getitem__(self, i):
        item = dict(self.pairs[i])
        item["forget_win"] = item.pop("forget_idk")
        return item


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


def append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def make_accelerator():
    """An ``accelerate.Accelerator`` when started by ``accelerate launch``/``torchrun`` with more than
    one process (None otherwise: the single-process path is unchanged)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError as e:
            raise SystemExit("this launch uses DeepSpeed (configs/accelerate/deepspeed_zero3.yaml) but deepspeed is "
                             f"not installed ({e}); pip install deepspeed, or use configs/accelerate/fsdp.yaml") from e
    from accelerate import Accelerator

    # DeepSpeed runs on CPU too (gloo); accelerate only selects it when not told cpu=True
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not deepspeed)
    if deepspeed:
        # accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says, which
        # makes every from_pretrained a collective (zero.Init); here the main process builds, loads and
        # evaluates models alone, so models are loaded whole and partitioned by accelerator.prepare
        from transformers.integrations import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    return accelerator


def distributed_strategy(accelerator) -> str:
    if accelerator is None:
        return "none"
    return str(accelerator.distributed_type).split(".")[-1].lower()


def distributed_details(accelerator) -> dict:
    """What else the manifest records of an accelerate launch: precision and the sharding stage."""
    if accelerator is None:
        return {}
    out = {"mixed_precision": str(accelerator.mixed_precision)}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        out["zero_stage"] = plugin.zero_stage
    return out


def use_fused(choice: str, model: torch.nn.Module) -> bool:
    # the fused path calls the inner decoder directly, bypassing a DDP/FSDP wrapper's forward
    if dist_.world_size() > 1:
        if choice == "on":
            raise SystemExit("--fused on is not available in multi-process runs (it bypasses the DDP/FSDP "
                             "wrapper's forward); use --fused off or auto")
        return False
    if choice != "auto":
        return choice == "on"
    from .kernels.hf import decoder_and_head

    try:
        decoder_and_head(model)
    except (TypeError, NotImplementedError):
        return False
    return True


def full_model(unlearner: Unlearner, setup: "Setup", device) -> Optional[torch.nn.Module]:
    """The model with its current weights, whole, for evaluation and saving on the main process.

    One process: the trained model itself. Data parallel: every rank joins the gathering of the
    full (unsharded) state dict; the main process loads it into a fresh copy of the target on
    ``device`` and gets it, the others get None.
    """
    if not dist_.is_distributed():
        return unlearner.model
    state = full_model_state(unlearner.model)
    if not dist_.is_main():
        return None
    model = setup.load_original()
    model.load_state_dict(state)
    return model.to(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite exclude each other")
    preset = resolve_preset(args)
    args.preset = preset["name"]
    args.lr = args.lr if args.lr is not None else preset["lr"]
    args.regularizer = args.regularizer or OBJECTIVES[args.method].default_regularizer
    accelerator = make_accelerator()
    strategy = distributed_strategy(accelerator)
    if args.fsdp2:
        if accelerator is None:
            raise SystemExit("--fsdp2 needs several processes: torchrun --nproc_per_node N -m fastgeffect.run ...")
        if strategy in ("fsdp", "deepspeed"):
            raise SystemExit(f"--fsdp2 with an accelerate {strategy} config: choose one way of sharding")
        strategy = "fsdp2"
    pg_steps = tuple(int(s) for s in args.pg_steps.split(",") if s.strip())
    ucfg = UnlearnConfig(epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                         max_grad_norm=args.max_grad_norm, geffect_every=args.geffect_every,
                         geffect_batch=args.geffect_batch, geffect_groups=args.geffect_groups, pg_steps=pg_steps,
                         save_every=args.save_every, seed=args.seed, stop_at_step=args.stop_at_step)
    ucfg.check()
    if accelerator is not None:
        from .distributed import check_divisible
        check_divisible(args.batch_size, accelerator.num_processes, args.grad_accum)
    hp = objective_kwargs(args, preset)
    get_objective(args.method, regularizer=args.regularizer, lam=args.lam, **hp)  # validate before any work
    if dist_.is_main():
        out = prepare_out(args)
    dist_.barrier()
    out = dist_.broadcast_object(out if dist_.is_main() else None)
    device = accelerator.device if accelerator is not None else \
        torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    times: Dict[str, float] = {}
    t0 = time.perf_counter()

    def make_setup():
        return setup_hub(args, preset, device) if args.model else setup_embedded(args, device)
    if dist_.is_main():  # builds (or downloads) once; the other ranks then read the cache
        setup = make_setup()
    dist_.barrier()
    if not dist_.is_main():
        setup = make_setup()
    times["setup"] = time.perf_counter() - t0
    fused = use_fused(args.fused, setup.model)
    config = {**{k: v for k, v in vars(args).items()}, "fused_resolved": fused, "objective_hparams": hp, "train": config_dict(ucfg),
              "max_length": setup.max_length, "setup": setup.info, "argv": list(argv or sys.argv[1:]),
              "distributed": {"world_size": dist_.world_size(), "grad_accum": args.grad_accum,
                              "per_rank_micro_batch": args.batch_size // (dist_.world_size() * args.grad_accum),
                              "strategy": strategy,
                              **distributed_details(accelerator)}}
    if dist_.is_main() and not (out / "config.json").exists():
        dist_.write_json_main(out / "config.json", config)

    needs_idk = args.method in ("po", "dpo", "idkdpo")
    data = load_unlearning_data(setup.data_dir, args.split, setup.tokenizer, setup.template, setup.max_length,
                                seed=args.seed, idk=needs_idk)
    model = setup.model
    t = time.perf_counter()
    reference = None
    if args.regularizer in ("kl", "rr"):
        reference = ReferenceModel(copy.deepcopy(model))
    objective = get_objective(args.method, regularizer=args.regularizer, lam=args.lam, reference=reference,
                              fused=fused, **hp)
    shared = Path(args.shared_dir) if args.shared_dir else out
    shared.mkdir(parents=True, exist_ok=True)
    caches = reference_caches(objective, model, data, shared, device) if OBJECTIVES[args.method].needs_ref_logprobs \
        else {}
    objective.ref_caches.update(caches)
    if args.method == "dpo":
        data.pairs = WinFromIdk(data.pairs)
    times["reference"] = time.perf_counter() - t

    main_rank = dist_.is_main()  # evaluation runs on the main process; the others wait at barriers
    sets = load_tofu_sets(args.split, setup.data_dir) if args.eval == "full" and main_rank else None
    retain_log = retain_model_log(setup, sets, args, shared, preset) if sets else None
    if sets and not (out / "metrics_before.json").exists():
        t = time.perf_counter()
        if not (shared / "metrics_before.json").exists():
            dist_.write_json_main(shared / "metrics_before.json",
                       evaluate(model, setup, sets, shared / "eval_before", args, retain_log))
        if shared != out:
            shutil.copyfile(shared / "metrics_before.json", out / "metrics_before.json")
        times["eval_before"] = time.perf_counter() - t
    dist_.barrier()

    def record_token_weights(u: Unlearner, epoch: int, step: int) -> None:
        # every rank runs the forward (a sharded model needs all of them); the main one writes
        rows = token_weight_rows(objective, u.model, data, setup.tokenizer, epoch, step, device)
        if main_rank:
            append_jsonl(out / "token_weights.jsonl", rows)

    def on_epoch_end(epoch: int, u: Unlearner) -> None:
        record_token_weights(u, epoch + 1, u.step)
        if args.checkpoint_epochs:
            whole = full_model(u, setup, device)
            if whole is not None:
                whole.save_pretrained(out / "checkpoints" / f"epoch-{epoch + 1}")

    if args.fsdp2:  # sharded in place here; accelerate would wrap it in DDP
        model = dist_.fully_shard_blocks(model)
    unlearner = Unlearner(model, objective, data, ucfg, out, device=device, progress=not args.no_progress,
                          on_epoch_end=on_epoch_end, accelerator=None if args.fsdp2 else accelerator)
    resumed = args.resume and unlearner.resume()
    if main_rank:
        truncate_jsonl(out / "token_weights.jsonl", unlearner.step)
    if unlearner.step == 0:
        record_token_weights(unlearner, 0, -1)
    t = time.perf_counter()
    try:
        status = unlearner.run()
    except NonFiniteLoss as e:
        dist_.write_json_main(out / "error.json", {"error": str(e), "step": unlearner.step,
                                        "state": str(unlearner.state_path)})
        raise SystemExit(f"stopped: {e}; the last finite state is in {unlearner.state_path} "
                         "(train_log.jsonl holds the last finite values)")
    except Exception as e:
        if not dist_.is_distributed():
            raise
        # a rank failed (or saw a peer fail inside a collective): every file was written atomically or
        # line by line, so the run folder holds the last saved state and the logs up to it
        msg = (f"rank {dist_.rank()} of {dist_.world_size()} failed at step {unlearner.step}: "
               f"{type(e).__name__}: {e}")
        print(f"[fastgeffect] {msg}; continue with --resume --out {out}", file=sys.stderr, flush=True)
        dist_.write_json_main(out / "error.json", {"error": msg, "step": unlearner.step,
                                                   "state": str(unlearner.state_path)})
        raise
    times["unlearn"] = time.perf_counter() - t
    if not status["completed"]:
        if main_rank:
            print(f"stopped after step {status['step']} as asked; continue with --resume --out {out}")
        return 0
    model = full_model(unlearner, setup, device)  # None on the other ranks, which are done
    if not main_rank:
        dist_.barrier()
        return 0
    try:
        finish(args, setup, preset, model, sets, retain_log, out, device, times, t0, resumed)
    finally:
        dist_.barrier()
    return 0


def finish(args, setup: Setup, preset: dict, model, sets, retain_log, out: Path, device, times: Dict[str, float],
           t0: float, resumed: bool) -> None:
    """Main process: save the model, evaluate after unlearning, calibrate with UWC, report."""
    if args.save_model:
        model.save_pretrained(out / "model")
        setup.tokenizer.save_pretrained(out / "model")

    if sets:
        t = time.perf_counter()
        dist_.write_json_main(out / "metrics_after.json", evaluate(model, setup, sets, out / "eval_after", args, retain_log))
        times["eval_after"] = time.perf_counter() - t
        if not args.no_uwc:
            from .eval import uwc_calibrate

            t = time.perf_counter()
            original = setup.load_original().to(device)
            before = json.loads((out / "metrics_before.json").read_text())
            res = uwc_calibrate(original, model, setup.tokenizer, setup.template,
                                sets["retain"][:args.eval_size], sets["forget"][:args.eval_size],
                                preset=preset["uwc"], batch_size=args.eval_batch_size,
                                reference_ps=before.get("PS-exact retain"))
            dist_.write_json_main(out / "metrics_uwc.json", {"alpha": res["alpha"], "tolerance": res["tolerance"],
                                                  "reference_ps": res["reference_ps"], **res["metrics"]})
            del original
            times["uwc"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    timing_path = out / "timing.json"
    previous = json.loads(timing_path.read_text()) if timing_path.exists() else []
    dist_.write_json_main(timing_path, previous + [{"resumed": bool(resumed), **times}])
    from .report import write_report

    summary = write_report(out)
    print(summary.read_text(encoding="utf-8"))
    print(f"run folder: {out}")


if __name__ == "__main__":
    code = main()
    dist_.shutdown()
    raise SystemExit(code)
