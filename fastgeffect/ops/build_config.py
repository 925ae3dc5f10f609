"""Pure decisions of the extension build, shared by ``setup.py`` (which loads this file by path,
before the package is importable) and ``backend_info``: standard library only.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

# A100 (the project's target card) and H100/H200, plus PTX so newer cards JIT-compile. Without a
# default, torch builds only for the GPU it sees (sm_90 on an H200) and fails with none visible.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_arch_list(environ: Mapping[str, str]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` when the user set it, else ``DEFAULT_CUDA_ARCH_LIST``."""
    return environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST


def nvcc_release(nvcc_version_output: str) -> Optional[str]:
    """'13.0' from ``nvcc --version``'s 'Cuda compilation tools, release 13.0, V13.0.88'."""
    match = re.search(r"release (\d+)\.(\d+)", nvcc_version_output)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_build_problem(torch_cuda: Optional[str], nvcc: Optional[str]) -> Optional[str]:
    """Why the CUDA extension cannot be built, or None. ``torch_cuda`` is ``torch.version.cuda``,
    ``nvcc`` the release reported by nvcc. torch refuses a different major version and aborts the
    whole build, so it is checked here first (a minor difference only warns)."""
    if not torch_cuda:
        return "torch is a CPU build (torch.version.cuda is None)"
    if not nvcc:
        return "nvcc not found (set CUDA_HOME) or its version is unreadable"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return f"nvcc {nvcc} and torch's CUDA {torch_cuda} differ in major version"
    return None
