"""Low-level ops behind the G-effect engine.

``dot_accumulate_(acc, tensors_a, tensors_b, group_ids)`` adds Σ a·b of each pair into
``acc[group_id]``: the compiled extension (``csrc/``) when loaded, else the plain torch
``dot_accumulate_torch_``. ``set_backend("auto"|"ext"|"torch")`` or the environment variable
``FASTGEFFECT_OPS_BACKEND`` forces one; ``extension_available()`` tells whether it is loaded and
``backend_info()`` what is built and loaded for CPU and CUDA, and why not.
"""
from ._extension import backend_info
from .dot_accumulate import (
                             BACKENDS,
                             dot_accumulate_,
                             dot_accumulate_torch_,
                             extension_available,
                             get_backend,
                             set_backend,
)

__all__ = ["BACKENDS", "backend_info", "dot_accumulate_", "dot_accumulate_torch_", "extension_available",
           "get_backend", "set_backend"]
