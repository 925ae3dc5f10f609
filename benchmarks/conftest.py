"""The pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``; not part of ``pytest`` from the
repository root, whose testpaths is tests/). Small shapes on CPU; the real (Llama-2-7B) shapes on a
GPU, skipped with a reason elsewhere. Compare commits with ``--benchmark-save NAME`` and
``--benchmark-compare``."""
import os
import sys

import pytest
import torch

# as in tests/conftest.py: Triton runs through its interpreter without a GPU; set before triton loads
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.fixture(params=["small", "real"])
def scale(request):
    """``("small", "cpu")`` anywhere; ``("real", "cuda")`` only where a GPU is present."""
    if request.param == "real":
        if not torch.cuda.is_available():
            pytest.skip("real (Llama-2-7B) shapes need a CUDA GPU; none here")
        return "real", "cuda"
    return "small", "cpu"


@pytest.fixture
def sync():
    """Waits for the device's queued work, so that a benchmark round times the kernels it launched."""
    def wait(device: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
    return wait
