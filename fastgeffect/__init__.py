"""fastgeffect: fast G-effect analysis and unlearning objectives for LLMs.

Implements "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond"
(Wang et al., ICLR 2025). See docs/design.md for the definitions every module shares.
"""
from . import losses

__version__ = "0.1.0"
__all__ = ["losses", "GEffect", "__version__"]


def __getattr__(name):
    # PEP 562: ``fastgeffect.GEffect`` loads the G-effect engine (transformers, DTensor: seconds) on
    # first use, so ``import fastgeffect.losses`` stays light for users' own trainers.
    if name == "GEffect":
        from .geffect import GEffect
        return GEffect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
