"""Robustness attacks on unlearning (docs/design.md §5.5): does the forgotten data come back
after a few fine-tuning steps on part of it (:mod:`.relearn`), or after round-to-nearest weight
quantisation to 8 or 4 bits (:mod:`.quantize`)? :func:`run_attacks` runs both and writes
``attacks.json`` and a plot; CLI: ``python -m fastgeffect.attacks``."""
from .metrics import forget_metrics
from .quantize import quantize_rtn, quantized_copy, quantized_linears
from .relearn import relearn_curve, split_forget
from .report import ATTACKS, run_attacks

__all__ = ["ATTACKS", "forget_metrics", "quantize_rtn", "quantized_copy", "quantized_linears", "relearn_curve",
           "split_forget", "run_attacks"]
