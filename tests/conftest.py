import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present (DESIGN.md §8).
# Must be set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
