"""One G-effect study of an unlearning objective, end to end.

    python -m fastgeffect.run --method tnpo              # offline default: builds its own tiny target
    python -m fastgeffect.run --method npo --data-dir path/to/tofu --authors 20     # real TOFU text
    python -m fastgeffect.run --method wtnpo --model locuslab/tofu_ft_phi-1.5 --preset phi --split forget05
    torchrun --nproc_per_node 2 -m fastgeffect.run --fsdp2                         # several processes

Steps: target model and data → reference log-probs (cached) → evaluation before → unlearning
with unlearning/retaining G-effects at every k-th step → evaluation after (TOFU metrics, PS) →
UWC calibration → summary.md and plots. Everything is written to --out as it goes; an
interrupted run continues with --resume.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .distributed import end_process
from .driver.cli import parse_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(argv, __doc__)
    # parse first: --help and flag errors never wait for transformers, accelerate and the evaluator
    from .driver.study import run_study

    return run_study(cfg, None if argv is None else list(argv))


if __name__ == "__main__":
    end_process(main())
