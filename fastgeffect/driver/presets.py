"""Paper hyper-parameters per model family (docs/design.md §3, §6).

``embedded`` fits the tiny offline target on a CPU; ``phi`` and ``llama`` are the paper's TOFU
settings: trained on 500-token items, evaluated as TOFU evaluates (200 tokens, TOFU's generation
batching; docs/design.md §13). ``published_model`` is the TOFU fine-tuned checkpoint that TOFU's
published retain logs (``retain_log_name``) belong to: Forget Quality compares a model with its own
retain twin, so those logs serve that checkpoint only. ``hparams`` are objective hyper-parameters a
preset supplies when the chosen objective accepts them and the command line leaves them unset
(RMU's block and control-vector scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Dict, Optional


@dataclass(frozen=True)
class Preset:
    name: str
    lr: float
    template: str  # prompt template (fastgeffect.data.templates)
    uwc: str  # UWC calibration preset (fastgeffect.eval.uwc)
    max_length: Optional[int]  # token length of QA items (None: the embedded target's own)
    eval_max_length: Optional[int]  # token length of evaluation items and generations (None: max_length's)
    gen_mode: str  # evaluation generation mode (fastgeffect.eval.generate)
    retain_log_name: Optional[str]  # TOFU's published retain-model logs: <name>_<retainXX>_wd0.01_...
    published_model: Optional[str]  # the hub checkpoint those logs were computed for (its twin's)
    hparams: Dict[str, float] = field(default_factory=dict)
    ps_protocol: str = "paper"  # PS as the paper's public code computes it (fastgeffect.eval.ps_protocols)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("embedded", lr=1e-3, template="phi", uwc="phi", max_length=None, eval_max_length=None,
           gen_mode="independent", retain_log_name=None, published_model=None, hparams={"steering_coeff": 4.0},
           ps_protocol="clean"),
    Preset("phi", lr=2e-5, template="phi", uwc="phi", max_length=500, eval_max_length=200,
           gen_mode="tofu", retain_log_name="phi", published_model="locuslab/tofu_ft_phi-1.5",
           hparams={"rmu_layer": 9, "steering_coeff": 4.0}),
    Preset("llama", lr=1e-5, template="llama2", uwc="llama2", max_length=500, eval_max_length=200,
           gen_mode="tofu", retain_log_name="llama2-7b", published_model="locuslab/tofu_ft_llama2-7b",
           hparams={"rmu_layer": 21, "steering_coeff": 2.0}),
)}


EMBEDDED = "embedded"  # the preset of the embedded target (the only one it takes)
MODEL_DEFAULT = "phi"  # the preset of a --model without --preset


def resolve_preset(name: Optional[str], model: Optional[str]) -> Preset:
    """The named preset, or the default for the target: ``embedded`` without ``--model``, else ``phi``."""
    name = name or (MODEL_DEFAULT if model else EMBEDDED)
    if model is None and name != EMBEDDED:
        raise SystemExit(f"--preset {name} needs --model (the embedded target uses the '{EMBEDDED}' preset)")
    return PRESETS[name]


def by_preset(attr: str, show=str, model_only: bool = False) -> str:
    """What each preset sets ``attr`` to, in words (``tofu for phi/llama, ...``; ``model_only``: the
    presets of a --model), for help texts: the presets' values are stated once, here."""
    names: Dict[str, list] = {}
    for p in PRESETS.values():
        if not (model_only and p.name == EMBEDDED):
            names.setdefault(show(getattr(p, attr)), []).append(p.name)
    return ", ".join(f"{value} for {'/'.join(presets)}" for value, presets in names.items())


def is_published_checkpoint(model: Optional[str], preset: Preset) -> bool:
    """Whether ``--model`` is the checkpoint the preset's published retain logs belong to: its hub
    name, or a snapshot of it in a Hugging Face hub cache (``.../models--locuslab--tofu_ft_phi-1.5/...``).
    Any other model, whatever its architecture, needs its own retain twin."""
    name = preset.published_model
    if model is None or name is None:
        return False
    return model == name or "models--" + name.replace("/", "--") in PurePath(model).parts
