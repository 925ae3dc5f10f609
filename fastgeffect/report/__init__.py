"""Reports of unlearning runs: ``python -m fastgeffect.report show DIR`` / ``compare DIR1 DIR2``.

One concern per module:
    logs.py           what the report reads of a run folder: each log's keys, strict readers
    geffect_stats.py  what tables and plots show of a G-effect log: series, groups, prediction quality
    tables.py         markdown: metrics and G-effect tables, the text of summary.md
    plots.py          every figure (matplotlib is imported only when one is drawn)
    token_heatmap.py  the token-weight heat-map page
    run_summary.py    ``show``: write_report, a run folder's plots and summary
    comparison.py     ``compare``: several runs' table and overlaid curves (``--ci``: intervals over seeds)
    seed_groups.py    ``compare --ci``: runs grouped by setting, one per seed, checked to differ in nothing else
    intervals.py      mean over seeds, t-interval (headline) and percentile bootstrap, paired differences
    ci_tables.py      ``compare --ci``: the interval and paired-difference tables and their JSON record
    ks_resolution.py  the p-values Forget Quality's KS test can take at n, m; the summary's note
    cli.py            the command line (``__main__.py`` runs it)

``import fastgeffect.report`` does not import matplotlib. The names below are the package's API
(they were all importable from ``fastgeffect.report`` when it was one module).
"""
from .cli import build_parser, main
from .comparison import compare
from .geffect_stats import (
    GROUP_ORDER,
    PREDICTORS,
    cumulative,
    group_shares,
    groups_of,
    iqr_log_ratio,
    prediction_quality,
    series,
    sign_agreement,
    spearman,
    sum_ratio,
    tied_shares,
    with_outcome,
)
from .logs import (
    GEFFECT_KEYS,
    LIST,
    NUMBER,
    PG_KEYS,
    TEXT,
    TOKEN_WEIGHT_KEYS,
    TRAIN_KEYS,
    UPDATE_KEYS,
    Check,
    RunLogs,
    check_records,
    check_run_folder,
    read_geffects,
    read_json,
    read_log,
    read_run,
)
from .plots import plot_compare, plot_geffects, plot_pg_effects, plot_risks, plot_updates, plot_weights
from .run_summary import draw_plots, write_report
from .tables import (
    HEADLINE_METRICS,
    SUMMARY_KEYS,
    compare_updates,
    fmt,
    geffect_totals,
    metrics_table,
    run_name,
    summary_markdown,
    update_tables,
)
from .token_heatmap import token_weights_html

__all__ = [
    "build_parser", "main", "compare", "write_report", "draw_plots",
    "GROUP_ORDER", "PREDICTORS", "cumulative", "group_shares", "tied_shares", "groups_of", "prediction_quality",
    "series",
    "with_outcome", "sign_agreement", "iqr_log_ratio", "sum_ratio", "spearman",
    "Check", "NUMBER", "TEXT", "LIST", "GEFFECT_KEYS", "UPDATE_KEYS", "PG_KEYS", "TOKEN_WEIGHT_KEYS", "TRAIN_KEYS",
    "RunLogs", "check_records", "check_run_folder", "read_geffects", "read_json", "read_log", "read_run",
    "plot_compare", "plot_geffects", "plot_pg_effects", "plot_risks", "plot_updates", "plot_weights",
    "HEADLINE_METRICS", "SUMMARY_KEYS", "compare_updates", "fmt", "geffect_totals", "metrics_table", "run_name",
    "summary_markdown", "update_tables", "token_weights_html",
]
