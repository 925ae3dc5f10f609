"""G-effects (docs/design.md §4): streaming per-step, per-group and per-sample gradient dot products
between a risk and the unlearning objective, logging and post-hoc checkpoint analysis."""
from ..model_structure import find_block_list
from ..weight_stats import weight_stats
from .engine import GEffect, GEffectResult
from .groups import GROUPINGS, PAPER_GROUPS, Grouping, build_grouping
from .log import GEffectLogger, read_geffect_log
from .per_sample import PerSampleResult, per_sample_geffects
from .posthoc import posthoc_geffects, step_from_checkpoint
from .risk import check_risk_value
from .stream import GradientDotStream, grouped_dots

__all__ = [
    "GEffect", "GEffectResult", "check_risk_value",
    "GROUPINGS", "PAPER_GROUPS", "Grouping", "build_grouping", "find_block_list",
    "GEffectLogger", "read_geffect_log", "weight_stats",
    "PerSampleResult", "per_sample_geffects",
    "posthoc_geffects", "step_from_checkpoint",
    "GradientDotStream", "grouped_dots",
]
