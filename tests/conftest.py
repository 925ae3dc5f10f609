import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present (docs/design.md §8);
# with a GPU they compile for it and the tests put their Triton cases on CUDA (helpers/devices.py).
# Must be set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models: one intra-op thread is faster than two and avoids oversubscription.
# FASTGEFFECT_TEST_THREADS=N runs the suite with N threads: other reduction orders, other rounding,
# a check that tolerances hold beyond this machine's.
torch.set_num_threads(int(os.environ.get("FASTGEFFECT_TEST_THREADS", "1")))


@pytest.fixture(scope="module")
def module_embedded_cache(tmp_path_factory):
    """A fresh embedded-model cache (``$FASTGEFFECT_CACHE``) shared by one test module: its tiny
    targets are built once, and nothing comes from or goes to the user's cache."""
    path = tmp_path_factory.mktemp("fg-cache")
    old = os.environ.get("FASTGEFFECT_CACHE")
    os.environ["FASTGEFFECT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FASTGEFFECT_CACHE")
    else:
        os.environ["FASTGEFFECT_CACHE"] = old
