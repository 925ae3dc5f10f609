"""Every setting of ``python -m fastgeffect.run``, stated once: :class:`RunConfig`.

Each field is one flag (``--x-y`` for ``x_y``) with its default, help, choices and bounds
(:mod:`fastgeffect.dataclass_cli`); :mod:`.cli` generates the parser from the fields. The training
fields take theirs from :class:`~fastgeffect.training.config.UnlearnConfig`; the objective
hyper-parameters are one field per name in :data:`~fastgeffect.objectives.HPARAMS` (default None:
the objective's own; tests/test_run_config.py fails when they differ), checked by the table's bounds.

A config is never changed after parsing: what the run fills in (the preset's learning rate, the
objective's regulariser, ...) makes a new one (:func:`with_defaults`), and ``config.json`` is
``asdict`` of that one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from ..data.tofu import RETAIN_OF
from ..dataclass_cli import first_error, like, setting
from ..objectives import HPARAMS, OBJECTIVES, REGULARIZER_NAMES, REGULARIZERS
from ..training.config import UnlearnConfig
from .config_checks import (  # noqa: F401  (re-exported: the driver imported them from here first)
    ATTACKS,
    BENCHMARKS,
    DEFAULT_EVAL_METRICS,
    EVAL_METRICS,
    MUSE_FORGET,
    WMDP_TASKS,
    attack_names,
    combination_error,
    eval_metrics,
    eval_tasks,
    pg_steps,
    relearn_steps,
)
from .presets import EMBEDDED, MODEL_DEFAULT, PRESETS, Preset, by_preset

# written out where importing their home would make --help slow (tests/test_run_config.py and
# tests/test_eval_parity.py pin them equal): fastgeffect.eval's GEN_MODES, TRUTH_RATIO_AGGS and
# PS_PROTOCOLS (scipy), fastgeffect.geffect's GROUPINGS and fastgeffect.data.templates' TEMPLATES (transformers)
GEN_MODES = ("tofu", "independent")
TRUTH_RATIO_AGGS = ("geometric", "arithmetic")
PS_PROTOCOLS = ("paper", "uwc-linear", "clean")
GEFFECT_GROUPINGS = ("paper", "blocks", "params")
TEMPLATE_NAMES = ("phi", "llama2", "chat")

# the only settings that may differ when resuming: where the run is, the resume switches, progress bars,
# when the resumable state is saved, whether the final model is saved and whether TensorBoard files are
# written; they change no number of the run. Every other setting must agree with config.json (docs: README
# "What is safe")
MAY_CHANGE_ON_RESUME = ("out", "resume", "overwrite", "no_progress", "stop_at_step", "save_every", "save_model",
                        "report_to")
# what a run folder saved before a setting existed ran as, where that is not the setting's default: a resume
# of such a folder keeps it (before issue 28 the unlearning AdamW decayed every parameter and the G-effect
# risks were redrawn at every step)
OLDER_RUNS = {"decay_all_params": True, "risk_rows": "step"}
NAME_KEYS = ("method", "regularizer", "split", "seed", "benchmark")  # spelled out in the default run folder's name

OBJECTIVE, MODEL_DATA, OWN_MODEL = "objective", "model and data", "bring your own model"
TRAINING, GEFFECTS, OUTPUTS = "training", "G-effects", "evaluation and outputs"


def _takers(name: str) -> str:
    """Which objectives / regularisers take hyper-parameter ``name``, with their defaults."""
    users = [f"{t.name} {t.defaults[name]}" for t in OBJECTIVES.values() if name in t.defaults]
    users += [f"{r.name} regulariser {r.defaults[name]}" for r in REGULARIZERS.values() if name in r.defaults]
    return "; ".join(users)


def objective_hparam(name: str):
    """The field of hyper-parameter ``name``: None means the objective's own default; its bounds
    are the table's (checked with the method, which may have its own: :func:`usage_error`)."""
    hp = HPARAMS[name]
    return setting(None, f"{hp.help} (default: the objective's own: {_takers(name)})", group=OBJECTIVE,
                   choices=hp.choices)


def train(name: str, **changes):
    """A training field as :class:`UnlearnConfig` states it, listed under ``group`` (default: training)."""
    return like(UnlearnConfig, name, **{"group": TRAINING, **changes})


@dataclass(frozen=True)
class RunConfig:
    # objective
    method: str = setting(
        "tnpo", "unlearning objective (" + ", ".join(t.name for t in OBJECTIVES.values() if t.needs_reference_model)
        + ": reads the original model's full logits at every step, so a second, frozen copy of the target is kept "
          "in memory, not the cached reference log-probs)", group=OBJECTIVE, choices=sorted(OBJECTIVES))
    regularizer: Optional[str] = setting(
        None, "retain regulariser (default: the objective's own: " + ", ".join(
            f"{t.name} {t.default_regularizer}" for t in OBJECTIVES.values() if t.default_regularizer != "none")
        + ", none otherwise)", group=OBJECTIVE, choices=REGULARIZER_NAMES)
    lam: float = setting(1.0, "weight λ of the regulariser", group=OBJECTIVE, low=0)
    alpha: Optional[float] = objective_hparam("alpha")
    beta: Optional[float] = objective_hparam("beta")
    beta1: Optional[float] = objective_hparam("beta1")
    beta2: Optional[float] = objective_hparam("beta2")
    delta: Optional[float] = objective_hparam("delta")
    wtnpo_form: Optional[str] = objective_hparam("wtnpo_form")
    rmu_layer: Optional[int] = objective_hparam("rmu_layer")
    steering_coeff: Optional[float] = objective_hparam("steering_coeff")
    control_seed: Optional[int] = objective_hparam("control_seed")
    kl_direction: Optional[str] = objective_hparam("kl_direction")
    kl_positions: Optional[str] = objective_hparam("kl_positions")
    rr_layer: Optional[int] = objective_hparam("rr_layer")
    ignore_first_n_answer_tokens: Optional[int] = objective_hparam("ignore_first_n_answer_tokens")
    constraint_eps: Optional[float] = objective_hparam("constraint_eps")
    dual_step: Optional[float] = objective_hparam("dual_step")
    fused: str = setting("auto", "fused LM-head losses that never hold (tokens × vocab) logits (Triton on CUDA, "
                                 "chunked torch on CPU) for the token-weighted objectives, GD and KL; auto: on when "
                                 "the model exposes a plain linear LM head", group=OBJECTIVE,
                         choices=("auto", "on", "off"))

    # model and data
    model: Optional[str] = setting(None, "hub name or local path of the target model (default: the embedded offline "
                                         "target)", group=MODEL_DATA, path=True)
    preset: Optional[str] = setting(None, f"paper hyper-parameters and template (default: {EMBEDDED}, or "
                                          f"{MODEL_DEFAULT} with --model)", group=MODEL_DATA, choices=sorted(PRESETS))
    benchmark: str = setting(
        "tofu", "what is unlearnt and measured: tofu (question-answer pairs; TOFU's metrics, PS, UWC) or muse (raw "
                "text; MUSE's verbmem_f, knowmem_f, knowmem_r, privleak; without --model the offline MUSE-style "
                "default, with --model a MUSE folder as --data-dir) or wmdp (--model on WMDP's forget and retain "
                "corpora in --data-dir; lm-eval's --eval-tasks)", group=MODEL_DATA, choices=BENCHMARKS)
    split: str = setting("forget10", "TOFU forget split", group=MODEL_DATA, choices=sorted(RETAIN_OF))
    data_dir: Optional[str] = setting(
        None, "folder of TOFU JSON-lines files (e.g. a copy of the hub's locuslab/TOFU); with --model and no "
              "--data-dir TOFU is downloaded from the hub", group=MODEL_DATA, path=True)
    authors: Optional[int] = setting(
        None, "with --data-dir: real TOFU text restricted to N authors (TOFU's proportions), on the embedded tiny "
              "model pipeline, or with --model on the subset it was fine-tuned on (checked against the "
              "manifest.json next to its folder, when there is one)", group=MODEL_DATA, low=1)
    muse_forget: str = setting(
        "raw/forget", "--benchmark muse: the forget corpus, raw/forget or one of MUSE-News' scalability and "
                      "sustainability sets (scal/forget_1 ... scal/forget_4, sust/forget_1 ... sust/forget_4)",
        group=MODEL_DATA, choices=MUSE_FORGET)
    wmdp_domains: str = setting("bio,cyber", "--benchmark wmdp: the corpora unlearnt ({domain}-forget-corpus.jsonl "
                                             "and {domain}-retain-corpus.jsonl in --data-dir)", group=MODEL_DATA)
    stride: Optional[int] = setting(
        None, "--benchmark muse/wmdp: raw-text windows of --max-length tokens start this many tokens apart (default: "
              "whole articles for the offline default, else max-length / 2)", group=MODEL_DATA, low=1)
    size: str = setting("default", "size of the embedded target (tiny: seconds, for tests)", group=MODEL_DATA,
                        choices=("default", "tiny"))
    max_length: Optional[int] = setting(None, "token length of QA items (default: the preset's)", group=MODEL_DATA,
                                        low=1)
    retain_log: Optional[str] = setting(
        None, "eval_log_forget.json of the target's retain-only twin for Forget Quality (default: computed for the "
              "embedded target or --retain-model; TOFU's published log only for the checkpoint it belongs to; "
              "otherwise Forget Quality is reported as unavailable)", group=MODEL_DATA, path=True)
    cache_dir: Optional[str] = setting(None, "cache of embedded models and TOFU author subsets (default: "
                                             "$FASTGEFFECT_CACHE, else ~/.cache/fastgeffect)", group=MODEL_DATA,
                                       path=True)
    shared_dir: Optional[str] = setting(
        None, "folder for what only depends on the target and data (reference log-probs, the retain model's log, "
              "evaluation before unlearning), reused by runs that share them (sweeps) (default: the run folder)",
        group=MODEL_DATA, path=True)

    # bring your own model
    retain_model: Optional[str] = setting(
        None, "with --model: its retain-only twin (fine-tuned like it on the retain split, e.g. DIR/retain of "
              "python -m fastgeffect.finetune --retain-twin); its forget log, computed once, gives Forget Quality",
        group=OWN_MODEL, path=True)
    template: Optional[str] = setting(
        None, "with --model: the prompt format (default: chat when the tokenizer has a chat template, else the "
              f"preset's: {by_preset('template', model_only=True)})", group=OWN_MODEL, choices=TEMPLATE_NAMES)
    lora: Optional[int] = setting(
        None, "unlearn through rank-R LoRA adapters on the blocks' projections (the reference θ_o is the model with "
              "its adapters disabled); G-effects are then over the adapter parameters", group=OWN_MODEL,
        metavar="R", low=1, why="the adapters' rank")

    # training
    epochs: int = train("epochs")
    batch_size: int = train("batch_size")
    grad_accum: int = train("grad_accum")
    lr: Optional[float] = train("lr", default=None, help="peak learning rate (default: the preset's)")
    weight_decay: float = train("weight_decay")
    decay_all_params: bool = train("decay_all_params")
    warmup_epochs: float = train("warmup_epochs")
    max_grad_norm: float = train("max_grad_norm")
    seed: int = train("seed", help="seed of the data order, retain pairing and embedded target")
    target_seed: Optional[int] = setting(
        None, "seed of the embedded target (its generated data and its training; default: --seed): fixed, several "
              "--seed unlearn one target (python -m fastgeffect.sweep --seeds)", group=TRAINING)
    device: Optional[str] = setting(None, "cpu / cuda / cuda:N (default: cuda when available)", group=TRAINING)
    fsdp2: bool = setting(False, "under torchrun: shard with torch's FSDP2 (fully_shard per decoder block) instead "
                                 "of DDP (under accelerate launch, use configs/accelerate/fsdp.yaml instead)",
                          group=TRAINING)
    bf16: Optional[bool] = setting(None, "bf16 weights for a --model target (default: on with CUDA, off on CPU)",
                                   group=TRAINING)
    gradient_checkpointing: Optional[bool] = setting(
        None, "recompute activations in backward for a --model target (default: on with CUDA, off on CPU)",
        group=TRAINING)

    # G-effects
    geffect_every: int = train("geffect_every", group=GEFFECTS)
    geffect_batch: int = train("geffect_batch", group=GEFFECTS)
    geffect_groups: str = train("geffect_groups", group=GEFFECTS, choices=GEFFECT_GROUPINGS)
    risk_rows: str = train("risk_rows", group=GEFFECTS)
    update_effects: str = train("update_effects", default="on" if UnlearnConfig.update_effects else "off",
                                group=GEFFECTS, choices=("on", "off"))
    second_order: bool = train("second_order", group=GEFFECTS)
    stop_at_retain_damage: Optional[float] = train("stop_at_retain_damage", group=GEFFECTS)
    stop_damage_from: str = train("stop_damage_from", group=GEFFECTS)
    geffect_guard: str = train("geffect_guard", group=GEFFECTS)
    guard_scope: str = train("guard_scope", group=GEFFECTS)
    gru_gamma: float = train("gru_gamma", group=GEFFECTS)
    pg_steps: str = setting("0,-1", "comma-separated steps with per-sample PG-effects (-1: the last step; empty: "
                                    "none)", group=GEFFECTS)

    # evaluation and outputs
    eval: str = setting("full", "TOFU metrics + PS before/after + UWC calibration, or none", group=OUTPUTS,
                        choices=("full", "none"))
    eval_metrics: Optional[str] = setting(
        None, "comma-separated: tofu (TOFU's metrics), privleak (Min-K%% AUC on forget vs holdout rows against the "
              "retain twin's), mia (the six membership-inference AUCs and PrivLeak), memorization (exact memorisation "
              "and extraction strength on the forget rows), all (every one); PS is always computed (default: "
              f"{','.join(DEFAULT_EVAL_METRICS)}, privleak only where the data has holdout rows)", group=OUTPUTS)
    attacks: Optional[str] = setting(
        None, "comma-separated attacks on the unlearned model, written to attacks.json: relearn (fine-tune on part "
              "of the forget rows, the retain twin as the control), quantize (8- and 4-bit round-to-nearest) "
              "(default: none)", group=OUTPUTS)
    relearn_steps: Optional[str] = setting(
        None, "comma-separated step counts k at which the relearning attack measures the forget rows it does not "
              "train on (default: the attack's own, 0,1,2,4,8,16)", group=OUTPUTS)
    relearn_lr: Optional[float] = setting(
        None, "the relearning attack's AdamW learning rate (default: the run's --lr)", group=OUTPUTS, low=0.0,
        strict=True)
    eval_tasks: Optional[str] = setting(
        None, "comma-separated lm-evaluation-harness tasks scored before and after unlearning on the model in memory "
              f"(default with --benchmark wmdp: {','.join(WMDP_TASKS)}; the hub's tasks need hub access)",
        group=OUTPUTS)
    eval_tasks_include: Optional[str] = setting(None, "a folder of further lm-eval task YAMLs (local tasks)",
                                                group=OUTPUTS, path=True)
    eval_tasks_limit: Optional[int] = setting(None, "at most N examples per lm-eval task (quick checks; papers use "
                                                    "whole tasks)", group=OUTPUTS, low=1)
    eval_size: int = setting(300, "rows per evaluation set (TOFU's ds_size)", group=OUTPUTS, low=1)
    eval_batch_size: int = setting(32, "sequences per evaluation batch", group=OUTPUTS, low=1)
    no_uwc: bool = setting(False, "skip UWC calibration", group=OUTPUTS)
    uwc_rows: str = setting(
        "reported", "retain rows UWC calibrates α on: reported (the rows it reports) or heldout (the next --eval-size "
                    "retain rows after them, against the original's PS on those; --ps-protocol clean)",
        group=OUTPUTS, choices=("reported", "heldout"))
    ps_protocol: Optional[str] = setting(
        None, "how PS is computed: 'paper' as the public code behind the paper's Table 1, 'uwc-linear' as UWC's "
              "per-model scripts (both with their own prompt, rows and batching), 'clean' fastgeffect's own "
              "(training template, --eval-size rows); docs/design.md, PS protocols (default: the preset's: "
              f"{by_preset('ps_protocol')}; clean for a --model in the chat format)", group=OUTPUTS,
        choices=PS_PROTOCOLS)
    eval_max_length: Optional[int] = setting(
        None, "token length of evaluation items and generations (default: the preset's: " + by_preset(
            "eval_max_length", lambda n: "the training length" if n is None else f"TOFU's {n}") + ")",
        group=OUTPUTS, low=1)
    gen_mode: Optional[str] = setting(
        None, "evaluation generation: tofu (TOFU's batches of 30 in order, budget max length minus the batch's "
              "padded prompt length) or independent (each prompt's own budget, results independent of batching) "
              f"(default: the preset's: {by_preset('gen_mode')})", group=OUTPUTS, choices=GEN_MODES)
    truth_ratio_agg: str = setting(
        "geometric", "Truth Ratio's mean of the perturbed probabilities: geometric (TOFU's aggregate_eval_stat.py) "
                     "or arithmetic (TOFU's utils.get_model_utility)", group=OUTPUTS, choices=TRUTH_RATIO_AGGS)
    out: Optional[str] = setting(
        None, "run folder (default: runs/<method>-<regularizer>-<split>-seed<seed>, plus -<hash> of the other "
              "settings that differ from their defaults)", group=OUTPUTS, path=True)
    resume: bool = setting(False, "continue the run in --out", group=OUTPUTS, exclusive="once")
    overwrite: bool = setting(False, "replace the run in --out", group=OUTPUTS, exclusive="once")
    save_model: bool = setting(False, "save the unlearned model to <out>/model", group=OUTPUTS)
    checkpoint_epochs: bool = setting(False, "save the model after every epoch to <out>/checkpoints/epoch-K "
                                             "(post-hoc G-effects)", group=OUTPUTS)
    save_every: int = train("save_every", group=OUTPUTS)
    stop_at_step: Optional[int] = train("stop_at_step", group=OUTPUTS)
    no_progress: bool = setting(False, "no progress bars", group=OUTPUTS)
    report_to: str = setting("none", "also write TensorBoard event files to <out>/tensorboard: losses, "
                                     "objective-weight statistics and G-effects per group at every step, evaluation "
                                     "metrics before and after", group=OUTPUTS, choices=("none", "tensorboard"))


def usage_error(cfg: RunConfig) -> Optional[str]:
    """What is wrong with the settings, as the command line says it (None: nothing): values outside
    their choices or bounds, and combinations that cannot run. Paths and devices are checked elsewhere."""
    error = first_error(cfg)
    if error:
        return error
    for name, hp in HPARAMS.items():  # the bounds the losses and get_objective check, from the one table
        value = getattr(cfg, name)
        if value is not None:
            try:
                hp.check(value, cfg.method)
            except ValueError as e:
                return f"--{name.replace('_', '-')} {str(e).split(f'{name} ', 1)[1]}"
    return combination_error(cfg)


def _values(cfg) -> dict:
    """The settings by name, of a :class:`RunConfig` (or of the ``argparse.Namespace`` its parser gives)."""
    return asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


def settings(cfg) -> dict:
    """The settings that define a run's results: all but :data:`MAY_CHANGE_ON_RESUME`."""
    return {k: v for k, v in _values(cfg).items() if k not in MAY_CHANGE_ON_RESUME}


def resume_defaults() -> dict:
    """What a run folder that does not record a setting ran as: its value then (:data:`OLDER_RUNS`),
    else its default now."""
    return {**settings(RunConfig()), **OLDER_RUNS}


def default_out(cfg, defaults=None) -> Path:
    """``runs/<method>-<regularizer>-<split>-seed<seed>`` (a MUSE run: ``muse`` for the split), plus
    ``-<8 hex>`` hashing every other setting that differs from its default (``defaults``:
    :class:`RunConfig`'s), so runs over any hyper-parameter never share a folder."""
    regularizer = cfg.regularizer or OBJECTIVES[cfg.method].default_regularizer
    data = cfg.split if cfg.benchmark == "tofu" else cfg.benchmark  # a MUSE run has no TOFU split
    name = f"{cfg.method}-{regularizer}-{data}-seed{cfg.seed}"
    ref = settings(RunConfig() if defaults is None else defaults)
    changed = {k: v for k, v in settings(cfg).items() if k not in NAME_KEYS and v != ref[k]}
    if changed:
        name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / name


def with_defaults(cfg: RunConfig, preset: Preset) -> RunConfig:
    """The settings the run uses: what the command line left to the preset (its name, learning rate
    and generation mode) and to the objective (its regulariser) filled in. config.json and the
    summary name them."""
    return replace(cfg, preset=preset.name, lr=cfg.lr if cfg.lr is not None else preset.lr,
                   gen_mode=cfg.gen_mode or preset.gen_mode,
                   regularizer=cfg.regularizer or OBJECTIVES[cfg.method].default_regularizer)


def objective_hparams(cfg: RunConfig, preset: Preset) -> dict:
    """The objective hyper-parameters given on the command line, plus the preset's for those the
    objective (or its regulariser, resolved: :func:`with_defaults`) accepts and the command line leaves unset."""
    accepted = set(OBJECTIVES[cfg.method].defaults) | set(REGULARIZERS[cfg.regularizer].defaults)
    hp = {}
    for name in HPARAMS:
        value = getattr(cfg, name)
        if value is None and name in accepted:
            value = preset.hparams.get(name)
        if value is not None:
            hp[name] = value
    return hp


def as_older_run(cfg: RunConfig, saved: dict) -> RunConfig:
    """``cfg`` to continue a run folder whose config.json is ``saved``: the settings it has no record
    of take the values its version ran as (:data:`OLDER_RUNS`)."""
    return replace(cfg, **{k: v for k, v in OLDER_RUNS.items() if k not in saved})


def train_config(cfg: RunConfig) -> UnlearnConfig:
    """The loop's settings (``cfg`` resolved: :func:`with_defaults`)."""
    ucfg = UnlearnConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(UnlearnConfig)
                            if f.name not in ("update_effects", "pg_steps")},
                         update_effects=cfg.update_effects == "on", pg_steps=pg_steps(cfg))
    ucfg.check()
    return ucfg
