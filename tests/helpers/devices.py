"""Where the tests' Triton cases run: on CUDA tensors when a GPU is present (Triton compiles the
kernels for it, which is the point of running the suite there), else on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1``, which tests/conftest.py sets only without a GPU)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# For cases that exercise the interpreter itself (Triton on CPU tensors) rather than a kernel.
needs_interpreter = pytest.mark.skipif(
    HAS_CUDA, reason="runs Triton on CPU tensors (TRITON_INTERPRET=1), which conftest.py leaves off "
                     "where a GPU is present so that Triton compiles for it")


def device_for(backend: str) -> torch.device:
    """The device of a test's tensors for kernel ``backend``: ``TRITON_DEVICE`` for "triton", the
    CPU for the torch path."""
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def to_device(device: torch.device, *tensors):
    """``tensors`` (built on the CPU) moved to ``device``; None stays None."""
    return tuple(None if t is None else t.to(device) for t in tensors)
