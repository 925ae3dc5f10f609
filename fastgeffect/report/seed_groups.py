"""``report compare --ci``: runs grouped by setting, one run per seed, each group checked to differ in
nothing but the seed.

A *setting* is what a sweep varies: the objective, its regulariser and their hyper-parameters
(:data:`SETTING_KEYS`). The runs of one setting must agree on everything else config.json records
(:func:`identity`) except the seed and the bookkeeping in :data:`BOOKKEEPING`; two runs of one
setting with one seed, or runs of one setting that differ in anything else, are refused, naming
the runs, the setting and the values.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from .. import run_files as files
from ..objectives.hparams import HPARAMS
from .tables import run_name

SEED = "seed"
# what a sweep varies between settings; objective_hparams holds the hyper-parameters as the run resolved them
SETTING_KEYS = ("method", "regularizer", "lam", "lr", "objective_hparams")
# config.json entries that say where and how a run was made, or how it ended, not what it computes:
# the seed itself; the run's own folder and command line; the folders of shared artefacts and of the
# cache (their paths also fill the forget_quality and privleak notes); the damage stop's outcome;
# train (the loop's copy of the top-level settings, seed included); target_seed (the target itself is
# compared, by setup's cache key); and driver.config.MAY_CHANGE_ON_RESUME (a test keeps the two alike)
BOOKKEEPING = (SEED, "argv", "out", "shared_dir", "cache_dir", "forget_quality", "privleak", "unlearning_stopped",
               "train", "target_seed", "resume", "overwrite", "no_progress", "stop_at_step", "save_every",
               "save_model", "report_to")


@dataclass(frozen=True)
class Group:
    """One setting's runs: ``name`` (method, regulariser, and the setting values that tell it apart
    from the other groups), ``setting`` and its run labels by seed."""
    name: str
    setting: dict
    runs: Dict[int, str]  # seed -> run label


def setting_of(config: Mapping) -> dict:
    return {k: config.get(k) for k in SETTING_KEYS if k in config}


def identity(config: Mapping) -> dict:
    """Everything a run's numbers depend on besides its setting and seed: config.json without
    :data:`SETTING_KEYS` and :data:`BOOKKEEPING`; ``setup`` by what it names (an embedded target by its
    cache key, which covers its data, model and training seed), not by where it lies."""
    # the hyper-parameters one by one are as given on the command line (None: the preset's), resolved in
    # objective_hparams, a setting key
    out = {k: v for k, v in config.items() if k not in SETTING_KEYS and k not in BOOKKEEPING and k not in HPARAMS}
    setup = out.get("setup")
    if isinstance(setup, Mapping) and isinstance(setup.get("target_report"), Mapping):
        out["setup"] = {"embedded target": setup["target_report"].get("cache_key")}
    return out


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differing(configs: Mapping[str, Mapping], keys_of=identity) -> Dict[str, Dict[str, object]]:
    """The entries of ``keys_of(config)`` whose values differ between the runs: key -> run -> value."""
    views = {run: keys_of(c) for run, c in configs.items()}
    keys = sorted({k for v in views.values() for k in v})
    return {k: {run: v.get(k) for run, v in views.items()} for k in keys
            if len({_canon(v.get(k)) for v in views.values()}) > 1}


def differences_text(diff: Mapping[str, Mapping[str, object]]) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{run} {v!r}" for run, v in values.items()) for k, values in diff.items())


def _seed(label: str, config: Mapping) -> int:
    seed = config.get(SEED)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"run {label}: its {files.CONFIG} records no integer seed ({SEED}: {seed!r})")
    return seed


def _names(settings: Sequence[dict], configs: Sequence[Mapping]) -> List[str]:
    """Each setting's name: method (+ regulariser), then the setting values that vary between groups."""
    flat = [{**{k: v for k, v in s.items() if k != "objective_hparams"},
             **(s.get("objective_hparams") or {})} for s in settings]
    varying = [k for k in dict.fromkeys(k for f in flat for k in f) if k not in ("method", "regularizer")
               and len({_canon(f.get(k)) for f in flat}) > 1]
    return [" ".join([run_name(c, "?")] + [f"{k}={f.get(k)}" for k in varying]) for f, c in zip(flat, configs)]


def group_runs(configs: Mapping[str, Mapping]) -> List[Group]:
    """The runs (label -> config.json) grouped by setting, in the order of their first run; ValueError
    for a run without a seed, two runs of one setting with one seed, or runs of one setting that
    differ in anything but the seed."""
    keys: Dict[str, List[str]] = {}
    for label, config in configs.items():
        _seed(label, config)
        keys.setdefault(_canon(setting_of(config)), []).append(label)
    groups = []
    settings = [setting_of(configs[labels[0]]) for labels in keys.values()]
    names = _names(settings, [configs[labels[0]] for labels in keys.values()])
    for name, setting, labels in zip(names, settings, keys.values()):
        runs: Dict[int, str] = {}
        for label in labels:
            seed = _seed(label, configs[label])
            if seed in runs:
                raise ValueError(f"runs {runs[seed]} and {label} are both seed {seed} of setting {name}: give one "
                                 "run per seed and setting")
            runs[seed] = label
        diff = differing({label: configs[label] for label in labels})
        if diff:
            raise ValueError(f"the runs of setting {name} differ in more than their seed ({differences_text(diff)}): "
                             "intervals over seeds need runs that differ in nothing else")
        groups.append(Group(name, setting, dict(sorted(runs.items()))))
    return groups


def finite_metrics(*named: tuple) -> Dict[str, float]:
    """``(prefix, metrics dict or None)`` pairs merged into ``{prefix + name: value}``, finite numbers only."""
    out: Dict[str, float] = {}
    for prefix, metrics in named:
        for k, v in (metrics or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[prefix + k] = float(v)
    return out


def metric_names(order: Sequence[str], per_run: Sequence[Mapping[str, float]]) -> List[str]:
    """The metrics every run in ``per_run`` has, those of ``order`` first, then the rest sorted."""
    common = set(per_run[0]).intersection(*per_run[1:]) if per_run else set()
    return [k for k in order if k in common] + sorted(common - set(order))


def seed_values(group: Group, metric: str, metrics: Mapping[str, Mapping[str, float]]) -> Dict[int, float]:
    return {seed: metrics[label][metric] for seed, label in group.runs.items()}


def lacking(groups: Sequence[Group], metrics: Mapping[str, Mapping[str, float]]) -> Optional[str]:
    """A note on the metrics some runs lack (left out of the interval tables), or None."""
    every = set().union(*(metrics[label] for g in groups for label in g.runs.values()))
    parts = []
    for g in groups:
        for label in g.runs.values():
            missing = sorted(every - set(metrics[label]))
            if missing:
                parts.append(f"{label} lacks {', '.join(missing)}")
    return "; ".join(parts) or None
