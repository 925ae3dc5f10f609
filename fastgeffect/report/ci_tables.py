"""``report compare --ci``: per setting and metric the mean over seeds with its intervals, and between
settings the paired differences over the same seeds, as markdown and as a JSON record."""
from __future__ import annotations

from typing import List, Mapping, Sequence

from . import intervals as iv
from .seed_groups import Group, lacking, metric_names, seed_values
from .tables import HEADLINE_METRICS, fmt

NOTE = (f"Mean over seeds with two {iv.LEVEL:.0%} intervals. **Headline: the t-interval** (mean ± t·s/√k, "
        "scipy.stats.t with k − 1 degrees of freedom). Beside it the percentile bootstrap interval "
        f"({iv.RESAMPLES} resamples of the seeds, numpy default_rng({iv.BOOTSTRAP_SEED})): with k = 2–3 seeds "
        "it cannot reach beyond the observed values and covers the mean at most 1 − 2·0.5^k of the time (50 % at "
        "2 seeds, 75 % at 3), so it is shown, not relied on. One seed: no interval.\n")
HEAD = ("seeds", "mean", f"{iv.LEVEL:.0%} t-interval (headline)", f"{iv.LEVEL:.0%} bootstrap interval")


def _pair(low, high) -> str:
    return "–" if low is None else f"[{fmt(low)}, {fmt(high)}]"


def cells(seeds: Sequence[int], it: iv.Interval) -> str:
    return " | ".join([",".join(map(str, seeds)), fmt(it.mean), _pair(it.t_low, it.t_high),
                       _pair(it.boot_low, it.boot_high)])


def ci_record(groups: Sequence[Group], metrics: Mapping[str, Mapping[str, float]]) -> dict:
    """Intervals per (setting, metric) and paired differences per (pair of settings, metric); ValueError
    (before anything is computed) when a pair of settings lacks a seed of the other."""
    pairs = [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    for a, b in pairs:  # refuse before anything: a difference of other seeds is no paired difference
        iv.paired_differences(dict.fromkeys(a.runs, 0.0), dict.fromkeys(b.runs, 0.0), a.name, b.name)
    rows: List[dict] = []
    for g in groups:
        for m in metric_names(HEADLINE_METRICS, [metrics[r] for r in g.runs.values()]):
            rows.append({"setting": g.name, "metric": m, "seeds": list(g.runs),
                         **iv.interval(list(seed_values(g, m, metrics).values())).to_dict()})
    diffs: List[dict] = []
    for a, b in pairs:
        runs = [metrics[r] for r in (*a.runs.values(), *b.runs.values())]
        for m in metric_names(HEADLINE_METRICS, runs):
            per_seed = iv.paired_differences(seed_values(a, m, metrics), seed_values(b, m, metrics), a.name, b.name)
            diffs.append({"a": a.name, "b": b.name, "metric": m, "seeds": list(per_seed),
                          "per_seed": {str(s): d for s, d in per_seed.items()},
                          **iv.interval(list(per_seed.values())).to_dict()})
    return {"level": iv.LEVEL, "resamples": iv.RESAMPLES, "bootstrap_seed": iv.BOOTSTRAP_SEED,
            "headline": iv.HEADLINE, "groups": [{"name": g.name, "setting": g.setting, "runs": {str(s): r for s, r in
                                                                                            g.runs.items()}}
                                                for g in groups],
            "intervals": rows, "differences": diffs, "lacking": lacking(groups, metrics)}


def _interval(row: Mapping) -> iv.Interval:
    return iv.Interval(**{k: row[k] for k in ("n", "mean", "t_low", "t_high", "boot_low", "boot_high")})


def ci_markdown(record: Mapping) -> str:
    """The two sections of compare.md that ``--ci`` adds, from :func:`ci_record`."""
    head = " | ".join(HEAD)
    lines = ["## Over seeds\n", NOTE]
    lines += [f"- {g['name']}: " + ", ".join(f"seed {s} {r}" for s, r in g["runs"].items()) for g in record["groups"]]
    lines += ["", f"| metric | setting | {head} |", "| --- | --- |" + " --- |" * len(HEAD)]
    lines += [f"| {r['metric']} | {r['setting']} | {cells(r['seeds'], _interval(r))} |" for r in record["intervals"]]
    if record["lacking"]:
        lines += ["", f"Left out where a run lacks them: {record['lacking']}."]
    if record["differences"]:
        lines += ["", "## Paired differences over seeds\n",
                  "B − A seed by seed (each difference of two runs with one seed), then the mean and intervals of "
                  "those differences as above.\n", f"| metric | B − A | {head} |",
                  "| --- | --- |" + " --- |" * len(HEAD)]
        lines += [f"| {d['metric']} | {d['b']} − {d['a']} | {cells(d['seeds'], _interval(d))} |"
                  for d in record["differences"]]
    return "\n".join(lines) + "\n"

