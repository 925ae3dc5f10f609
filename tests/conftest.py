import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present (docs/design.md §8).
# Must be set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one intra-op thread is faster than two and avoids oversubscription.
# FASTGEFFECT_TEST_THREADS=N runs the suite with N threads: other reduction orders, other rounding,
# a check that tolerances hold beyond this machine's.
torch.set_num_threads(int(os.environ.get("FASTGEFFECT_TEST_THREADS", "1")))
