"""Every figure of the report, drawn with matplotlib's object API into PNG files.

matplotlib is imported only when a figure is made (``_figure``): importing the report stays light,
and a figure never goes through pyplot, so drawing a report needs no display and leaves the
caller's pyplot backend and open figures alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

from .geffect_stats import GROUP_EFFECTS, PREDICTORS, RISKS, cumulative, group_shares, groups_of, series, with_outcome

DPI = 110


def _figure(figsize: Tuple[float, float], nrows: int = 1, ncols: int = 1, **subplots):
    """(figure, axes) of a new figure that pyplot does not know of."""
    from matplotlib.figure import Figure  # here: `import fastgeffect.report` must not import matplotlib

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def plot_geffects(records: Sequence[dict], path: Path, title: str) -> None:
    """Per-step and cumulative unlearning / retaining G-effects, total and per layer group."""
    fig, axes = _figure((11, 7), 2, 2, sharex=True)
    for col, risk in enumerate(RISKS):
        for g in groups_of(records):
            steps, vals = series(records, risk, g)
            axes[0, col].plot(steps, vals, label=g, lw=1)
            axes[1, col].plot(steps, cumulative(vals), label=g, lw=1)
        steps, vals = series(records, risk)
        axes[0, col].plot(steps, vals, label="total", color="k", lw=1.6)
        axes[1, col].plot(steps, cumulative(vals), label="total", color="k", lw=1.6)
        axes[0, col].set_title(f"{'unlearning' if risk == 'unlearn' else 'retaining'} G-effect per step")
        axes[1, col].set_title("cumulative")
        axes[1, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_risks(records: Sequence[dict], path: Path, title: str) -> None:
    fig, ax = _figure((6, 4))
    for risk, label in zip(RISKS, ("forget NLL", "held-out retain NLL")):
        rows = [r for r in records if r["risk"] == risk]
        ax.plot([r["step"] for r in rows], [r["risk_value"] for r in rows], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("risk (token-mean NLL)")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def plot_weights(train_log: Sequence[dict], path: Path, title: str) -> bool:
    """Objective weights (mean with min–max band) and GA's inverse confidence 1/p over steps."""
    rows = [r for r in train_log if "weights" in r]
    inv = [r for r in train_log if "inv_conf" in r]
    if not rows and not inv:
        return False
    fig, ax = _figure((6, 4))
    if rows:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["weights"]["mean"] for r in rows], label="mean objective weight")
        ax.fill_between(steps, [r["weights"]["min"] for r in rows], [r["weights"]["max"] for r in rows], alpha=0.2,
                        label="min–max")
    if inv:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in inv], [r["inv_conf"] for r in inv], color="tab:red", lw=1,
                 label="mean 1/p (GA inverse confidence)")
        ax2.set_yscale("log")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(title)
    if rows:
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
    return True


def plot_pg_effects(pg: Sequence[dict], path: Path, title: str) -> bool:
    """PG-effect of each sample against its objective (sequence) weight, one colour per step (Fig. 5b)."""
    pg = [r for r in pg if "seq_weights" in r]  # RMU has no objective weights to plot against
    if not pg:
        return False
    fig, ax = _figure((6, 4))
    for r in pg:
        ax.scatter(r["seq_weights"], r["pg_effect"], s=12, label=f"step {r['step']}")
    ax.set_xlabel("objective weight of the sample")
    ax.set_ylabel("PG-effect ⟨∇R, ∇ℓ_i⟩")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _plot_changes(ax, records: Sequence[dict], risk: str) -> None:
    """Per step, the realised change of ``risk`` against both predictions of it."""
    rows = with_outcome(records, risk)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["realised"] for r in rows], color="k", lw=1.6, label="realised ΔR")
    for key, label in PREDICTORS:
        ax.plot(steps, [r[key] for r in rows], lw=1, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_title(f"{'forget' if risk == 'unlearn' else 'retain'} risk: change per step")
    ax.set_xlabel("step")


def _plot_shares(ax, records: Sequence[dict], risk: str) -> None:
    """Per group, its share of the cumulative raw G-effect of ``risk`` next to its share of the update effect."""
    groups = groups_of(records)
    x = range(len(groups))
    for k, (key, label) in enumerate(GROUP_EFFECTS):
        shares = group_shares(records, risk, key)
        ax.bar([i + (k - 0.5) * 0.4 for i in x], [shares[g] for g in groups], width=0.4, label=label)
    ax.set_xticks(list(x), groups)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title("share of the cumulative effect per group")


def plot_updates(records: Sequence[dict], path: Path, title: str) -> None:
    """Top: per step, the realised change of each risk against both predictions. Bottom: per
    group, its share of the cumulative raw G-effect next to its share of the update effect."""
    fig, axes = _figure((11, 7), 2, 2)
    for col, risk in enumerate(RISKS):
        _plot_changes(axes[0, col], records, risk)
        _plot_shares(axes[1, col], records, risk)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_compare(runs: Sequence[Tuple[str, Sequence[dict]]], path: Path) -> None:
    """The cumulative unlearning and retaining G-effects of several runs, one line per (label, records)."""
    fig, axes = _figure((11, 4), 1, 2)
    for label, records in runs:
        for ax, risk in zip(axes, RISKS):
            steps, vals = series(records, risk)
            ax.plot(steps, cumulative(vals), label=label)
    for ax, risk in zip(axes, ("unlearning", "retaining")):
        ax.set_title(f"cumulative {risk} G-effect")
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    _save(fig, path)
