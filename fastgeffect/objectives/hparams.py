"""The hyper-parameter table, which lives with the losses (:mod:`fastgeffect.losses.hparams`) so that
the losses, the kernels, the objectives and the command line check one set of bounds."""
from ..losses.hparams import HPARAMS, HParam, check_hparams

__all__ = ["HPARAMS", "HParam", "check_hparams"]
