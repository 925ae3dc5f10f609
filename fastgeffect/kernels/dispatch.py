"""Which implementation runs a fused loss: the Triton kernels or the chunked PyTorch path.

``backend="auto"`` picks Triton for CUDA tensors and torch otherwise; the environment variable
``FASTGEFFECT_BACKEND`` (``auto``/``triton``/``torch``) replaces ``"auto"``; an explicit
``backend="triton"``/``"torch"`` argument always wins. Triton on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported (that is how the tests run the kernels).
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTGEFFECT_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``; raises a clear error when the
    requested backend cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use backend='torch' for the CPU path"
            )
    return backend
