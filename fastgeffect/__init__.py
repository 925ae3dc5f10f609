"""fastgeffect: fast G-effect analysis and unlearning objectives for LLMs.

Implements "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond"
(Wang et al., ICLR 2025). See DESIGN.md for the definitions every module shares.
"""
from . import losses
from .geffect import GEffect

__version__ = "0.1.0"
__all__ = ["losses", "GEffect", "__version__"]
