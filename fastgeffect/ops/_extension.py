"""Loads the compiled ops (``fastgeffect._C`` for CPU, ``fastgeffect._C_cuda`` for CUDA) once.

Both are optional: when one is missing or fails to load, the reason is kept and the caller
falls back to plain torch, warning once per device type.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

_MODULES = {"cpu": "fastgeffect._C", "cuda": "fastgeffect._C_cuda"}
_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def _load(device_type: str) -> ModuleType | None:
    if device_type in _loaded:
        return _loaded[device_type]
    module = None
    if os.environ.get("FASTGEFFECT_NO_EXT") == "1":
        _errors[device_type] = "disabled by FASTGEFFECT_NO_EXT=1"
    elif device_type not in _MODULES:
        _errors[device_type] = f"no compiled op for device type {device_type!r}"
    else:
        try:
            module = importlib.import_module(_MODULES[device_type])
        except ImportError as e:  # not built (or built against another torch): say why
            _errors[device_type] = f"{_MODULES[device_type]} could not be imported ({e})"
    _loaded[device_type] = module
    return module


def module_for(device_type: str) -> ModuleType | None:
    """The compiled module for ``device_type`` ('cpu' or 'cuda'), or None."""
    return _load(device_type)


def load_error(device_type: str = "cpu") -> str | None:
    """Why the compiled module for ``device_type`` is unavailable (None when it is loaded)."""
    _load(device_type)
    return _errors.get(device_type)


def warn_fallback_once(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    warnings.warn(f"fastgeffect: compiled dot_accumulate_ unavailable on {device_type}: "
                  f"{load_error(device_type)}; using the torch fallback", RuntimeWarning, stacklevel=3)


def backend_info() -> dict[str, dict]:
    """Per device type ('cpu', 'cuda'): the compiled ``module``, whether it was ``built`` (found on
    the path), whether it ``loaded``, and ``reason`` when it did not (None when it did). The CUDA
    entry also says whether torch has CUDA and sees a GPU."""
    info = {}
    for device_type, name in _MODULES.items():
        loaded = _load(device_type) is not None
        info[device_type] = {"module": name, "built": importlib.util.find_spec(name) is not None,
                             "loaded": loaded, "reason": None if loaded else load_error(device_type)}
    info["cuda"].update(torch_cuda=torch.version.cuda, gpu_visible=torch.cuda.is_available())
    return info
