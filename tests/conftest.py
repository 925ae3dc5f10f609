import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present (docs/design.md §8).
# Must be set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one intra-op thread is faster than two and avoids oversubscription.
torch.set_num_threads(1)
