"""The command line of ``python -m fastgeffect.run``: the parser generated from :class:`.config.RunConfig`
(one flag per field, with its help), and the usage errors (exit 2) for settings that cannot run,
given before anything is read or written."""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ..cli_help import HelpFormatter, examples
from ..dataclass_cli import Parser, add_arguments
from ..tensorboard import tensorboard_missing
from .config import (  # noqa: F401  (GEN_MODES ... settings: re-exported, imported from here before config.py)
    GEN_MODES,
    MAY_CHANGE_ON_RESUME,
    NAME_KEYS,
    TRUTH_RATIO_AGGS,
    RunConfig,
    default_out,
    pg_steps,
    settings,
    usage_error,
)

PROG = "python -m fastgeffect.run"


def build_parser(doc: str = "") -> argparse.ArgumentParser:
    ap = Parser(prog=PROG, description=doc.strip().split("\n\n")[0] if doc else None, epilog=examples(doc),
                formatter_class=HelpFormatter)
    return add_arguments(ap, RunConfig)


def device_error(name: str) -> Optional[str]:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device: use cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name!r}: only cpu, cuda and cuda:N are supported"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: CUDA is not available here (use --device cpu, or leave --device out)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_args(ap: argparse.ArgumentParser, cfg: RunConfig) -> None:
    """Usage errors (exit 2) for settings that cannot run, before anything is read or written."""
    error = usage_error(cfg) or (device_error(cfg.device) if cfg.device is not None else None)
    if error is None and cfg.report_to == "tensorboard" and tensorboard_missing():
        error = f"--report-to tensorboard: {tensorboard_missing()}"
    if error:
        ap.error(error)


def parse_args(argv: Optional[Sequence[str]] = None, doc: str = "") -> RunConfig:
    """The settings the flags give, checked (usage errors otherwise), with ``--out`` resolved."""
    ap = build_parser(doc)
    cfg = RunConfig(**vars(ap.parse_args(argv)))
    check_args(ap, cfg)
    return cfg if cfg.out is not None else replace(cfg, out=str(default_out(cfg)))
