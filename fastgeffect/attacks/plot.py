"""The relearning attack's figure (matplotlib's object API, imported only when drawing, never pyplot,
as :mod:`fastgeffect.report.plots`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

DPI = 110
LABELS = {"nll": "answer NLL (token mean)", "exact_memorization": "exact memorisation",
          "extraction_strength": "extraction strength", "rougeL_recall": "ROUGE-L recall"}


def plot_relearn(relearn: dict, metrics: Sequence[str], path: Path) -> None:
    """One panel per metric: the target's and the twin's values over the step count k."""
    from matplotlib.figure import Figure  # here: importing the attacks must not import matplotlib

    fig = Figure(figsize=(4 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    curves = [("target", relearn["target"], "C0")] + ([("retain twin", relearn["twin"], "C1")]
                                                      if relearn.get("twin") else [])
    for ax, m in zip(axes, metrics):
        for label, curve, color in curves:
            ax.plot([p["step"] for p in curve], [p[m] for p in curve], marker="o", label=label, color=color)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("relearning steps k")
        ax.set_title(LABELS.get(m, m))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"relearning attack: {len(relearn['train_rows'])} forget rows trained, "
                 f"{len(relearn['eval_rows'])} measured (seed {relearn['seed']}, lr {relearn['lr']:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
