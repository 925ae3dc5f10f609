"""Evaluation (docs/design.md §5): TOFU's metrics and log files, PS-exact / PS-perturb, extraction
strength, membership inference / PrivLeak and UWC calibration.

High-level entry points: :func:`evaluate_tofu` (logs + aggregated metrics), :func:`aggregate`
/ :func:`load_logs` (TOFU's aggregator), :func:`ps_scores` / :func:`ps_report`,
:func:`extraction_strength` / :func:`exact_memorization`, :func:`mia_auc` / :func:`privleak`,
:func:`uwc_calibrate`; holdout rows (:func:`load_holdout`, :func:`check_holdout`) and
open-unlearning's files (:func:`write_open_unlearning`, :func:`privleak_reference`). CLI:
``python -m fastgeffect.eval``.
"""
from ..data.holdout import check_holdout, load_holdout
from .aggregate import FILES, aggregate, file_metrics, forget_quality, load_logs, load_retain_log
from .answer_losses import answer_losses
from .generate import greedy_generate
from .memorization import exact_memorization, extraction_strength
from .mia import mia_auc
from .open_unlearning import privleak_reference, retain_log_from_open_unlearning, write_open_unlearning
from .privleak import privleak
from .ps import ps_report, ps_scores
from .tofu import TASKS, evaluate_set, evaluate_tofu, load_tofu_sets, write_logs
from .uwc import TOLERANCE, calibrate_alpha, mixed_weights, uwc_calibrate

__all__ = [
    "FILES", "TASKS", "TOLERANCE", "aggregate", "file_metrics", "forget_quality", "load_logs", "load_retain_log",
    "greedy_generate", "answer_losses", "exact_memorization", "extraction_strength", "ps_report", "ps_scores",
    "evaluate_set", "evaluate_tofu", "load_tofu_sets", "write_logs", "calibrate_alpha", "mixed_weights",
    "uwc_calibrate", "mia_auc", "privleak", "check_holdout", "load_holdout", "privleak_reference",
    "retain_log_from_open_unlearning", "write_open_unlearning",
]
