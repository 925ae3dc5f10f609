"""The names of the files and folders in a run folder, in one place.

The loop, the driver, the report, the sweep and the HF callback all read or write these; a name
written as a literal elsewhere would drift. What each holds: README, "Running studies".
"""
CONFIG = "config.json"  # every setting of the run, written first (driver/run_folder.py)
MARKER = ".fastgeffect-run"  # only folders carrying it are ever overwritten
ERROR = "error.json"  # why the last attempt stopped (removed when a run completes)
TIMING = "timing.json"  # seconds per phase, per invocation
STATE = "state.pt"  # the resumable state (training/backend.py)

GEFFECTS = "geffect.jsonl"  # one line per step and risk
TRAIN_LOG = "train_log.jsonl"  # one line per step
PG_EFFECTS = "pg_effects.jsonl"  # per-sample PG-effects at --pg-steps
TOKEN_WEIGHTS = "token_weights.jsonl"  # per-token objective weights across epochs

METRICS_BEFORE = "metrics_before.json"
METRICS_AFTER = "metrics_after.json"
METRICS_UWC = "metrics_uwc.json"
LM_EVAL_BEFORE = "lm_eval_before.json"  # --eval-tasks: lm-eval's tasks (driver/lm_eval_phase.py)
LM_EVAL_AFTER = "lm_eval_after.json"
EVAL_BEFORE = "eval_before"  # TOFU's per-sample logs, one folder per evaluation
EVAL_AFTER = "eval_after"
EVAL_UWC = "eval_uwc"
PS_ROWS = "ps_rows.json"  # in each evaluation's folder: PS per row, per metric (driver/evaluation.py)
UWC_REFERENCE = "uwc_reference.json"  # --uwc-rows heldout: the original's retain PS on the calibration rows
ATTACKS = "attacks.json"  # --attacks (fastgeffect/attacks/report.py)
ATTACKS_PLOT = "attacks_relearn.png"

SUMMARY = "summary.md"
TOKEN_WEIGHTS_HTML = "token_weights.html"
PLOTS = "plots"  # the report's figures (fastgeffect/report/plots.py draws them), named below
PLOT_GEFFECTS = "geffect.png"
PLOT_RISKS = "risk.png"
PLOT_UPDATES = "updates.png"
PLOT_WEIGHTS = "weights.png"
PLOT_PG_EFFECTS = "pg_effects.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"  # checkpoints/epoch-K with --checkpoint-epochs
MODEL = "model"  # the unlearned model with --save-model

# `python -m fastgeffect.report compare`: its default folder (beside the first run folder) and files
COMPARE = "compare"
COMPARE_SUMMARY = "compare.md"
COMPARE_PLOT = "compare.png"
COMPARE_CI = "compare_ci.json"  # --ci: intervals over seeds and paired differences (report/ci_tables.py)


def ref_logprobs(name: str) -> str:
    """The cached reference log-probs of sub-batch ``name`` (forget, forget_idk)."""
    return f"ref_logprobs_{name}.pt"
