"""Low-level ops behind the G-effect engine.

``dot_accumulate_(acc, tensors_a, tensors_b, group_ids)`` adds Σ a·b of each pair into
``acc[group_id]``. This module holds the plain torch implementation; the compiled extension
(``csrc/``) provides a faster one behind the same signature.
"""
from .dot_accumulate import dot_accumulate_, dot_accumulate_torch_

__all__ = ["dot_accumulate_", "dot_accumulate_torch_"]
