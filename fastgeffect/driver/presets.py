"""Paper hyper-parameters per model family (docs/design.md §3, §6).

``embedded`` fits the tiny offline target on a CPU; ``phi`` and ``llama`` are the paper's TOFU
settings: trained on 500-token items, evaluated as TOFU evaluates (200 tokens, TOFU's generation
batching; docs/design.md §13). ``hparams`` are objective hyper-parameters a preset supplies when
the chosen objective accepts them and the command line leaves them unset (RMU's block and
control-vector scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    hparams: Dict[str, float] = field(default_factory=dict)
    ps_protocol: str = "paper"  # PS as the paper's public code computes it (fastgeffect.eval.ps_protocols)


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("embedded", lr=1e-3, template="phi", uwc="phi", max_length=None, eval_max_length=None,
           gen_mode="independent", retain_log_name=None, hparams={"steering_coeff": 4.0}, ps_protocol="clean"),
    Preset("phi", lr=2e-5, template="phi", uwc="phi", max_length=500, eval_max_length=200,
           gen_mode="tofu", retain_log_name="phi", hparams={"rmu_layer": 9, "steering_coeff": 4.0}),
    Preset("llama", lr=1e-5, template="llama2", uwc="llama2", max_length=500, eval_max_length=200,
           gen_mode="tofu", retain_log_name="llama2-7b", hparams={"rmu_layer": 21, "steering_coeff": 2.0}),
)}


def resolve_preset(name: Optional[str], model: Optional[str]) -> Preset:
    """The named preset, or the default for the target: ``embedded`` without ``--model``, else ``phi``."""
    name = name or ("phi" if model else "embedded")
    if model is None and name != "embedded":
        raise SystemExit(f"--preset {name} needs --model (the embedded target uses the 'embedded' preset)")
    return PRESETS[name]
