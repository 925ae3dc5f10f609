"""The token-weighted objectives in one table: ``loss = token-mean of w_t · logp_t``, ``w_t`` detached.

One :class:`TokenWeight` per weight: its torch function, the code the fused Triton kernel branches
on, whether it needs reference log-probs, and its hyper-parameters with their defaults. The losses
(:mod:`fastgeffect.losses`), the objectives' defaults (:mod:`fastgeffect.objectives`) and the fused
kernels (:mod:`fastgeffect.kernels`) all read this table; the Triton kernel's branch
(``kernels/token_weighted_triton.py``) is the only other place a formula is written, and a test checks
that it equals the function here for every code.

The kernel takes two scalar arguments; each entry names the hyper-parameters that fill them
(``alpha`` and ``beta``, SatImp's ``beta1`` and ``beta2``). WTNPO's ``wtnpo_form`` picks one of its
two entries. A new token-weighted objective is one entry here (its Triton branch included), one
``ForgetTerm`` line and its test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ._common import NumItems, check_aligned, check_finite, prepare, weighted_token_loss
from .hparams import HPARAMS

# w = fn(logp, ref, explicit, alpha, beta): every input detached and aligned; ref / explicit are None
# unless the entry needs them
WeightFn = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], float, float], torch.Tensor]


def _ones(logp, ref, explicit, alpha, beta):
    return torch.ones_like(logp)


def _minus_ones(logp, ref, explicit, alpha, beta):
    return torch.full_like(logp, -1.0)


def _p_alpha(logp, ref, explicit, alpha, beta):
    return torch.exp(alpha * logp)


def _tnpo(logp, ref, explicit, alpha, beta):
    return 2.0 * torch.sigmoid(beta * (logp - ref))


def _wtnpo_eq16(logp, ref, explicit, alpha, beta):
    return 2.0 * torch.sigmoid((beta + alpha) * logp - beta * ref)


def _wtnpo_product(logp, ref, explicit, alpha, beta):
    return 2.0 * torch.sigmoid(beta * (logp - ref)) * torch.exp(alpha * logp)


def _satimp(logp, ref, explicit, beta1, beta2):
    # saturation p^β1 times importance (1 − p)^β2; expm1 keeps 1 − p exact as p → 1, and pow gives 0^0 = 1
    return torch.exp(beta1 * logp) * (-torch.expm1(logp)).pow(beta2)


def _explicit(logp, ref, explicit, alpha, beta):
    return explicit.to(logp.dtype)


@dataclass(frozen=True)
class TokenWeight:
    name: str  # the objective (``losses.<name>``, the kernels' ``objective=``)
    code: int  # the Triton kernel's constexpr branch
    fn: WeightFn
    formula: str
    defaults: Mapping[str, object] = field(default_factory=dict)  # hyper-parameter names and defaults
    needs_ref: bool = False  # reference log-probs ``logp_ref_t``
    needs_explicit: bool = False  # caller-given weights
    scalar_names: Tuple[str, str] = ("alpha", "beta")  # the hyper-parameters in the kernel's two scalar slots

    def scalars(self, hp: Mapping[str, object]) -> Tuple[float, float]:
        """The kernel's two scalars (``scalar_names``) from ``hp``, the defaults where a value is missing
        or None, 0 where unused; a given value out of its bounds (:mod:`.hparams`) is refused."""
        out = []
        for k in self.scalar_names:
            v = hp.get(k)
            out.append(float(self.defaults.get(k, 0.0) if v is None else v))
            if v is not None and k in self.defaults:  # a slot the entry does not use keeps its 0
                HPARAMS[k].check(v, self.name)
        return out[0], out[1]

    def weights(self, logp: torch.Tensor, ref: Optional[torch.Tensor] = None,
                explicit: Optional[torch.Tensor] = None, hp: Optional[Mapping[str, object]] = None) -> torch.Tensor:
        """Detached ``w_t`` for the log-probs ``logp`` (any shape; ``ref``/``explicit`` alike)."""
        a, b = self.scalars(hp or {})
        ref = None if ref is None else ref.detach()
        explicit = None if explicit is None else explicit.detach()
        return self.fn(logp.detach(), ref, explicit, a, b)


GA = TokenWeight("ga", 0, _ones, "1 (gradient ascent: minimise the token-mean logp_t)")
NLL = TokenWeight("nll", 1, _minus_ones, "−1 (the token-mean NLL: GD, PO)")
WGA = TokenWeight("wga", 2, _p_alpha, "p_t^α", {"alpha": 5.0})
TNPO = TokenWeight("tnpo", 3, _tnpo, "2σ(β(logp_t − logp_ref_t)) = 2p^β / (p^β + p_ref^β)", {"beta": 4.0},
                   needs_ref=True)
_WTNPO_HP = {"alpha": 1.5, "beta": 4.0, "wtnpo_form": "eq16"}
WTNPO = TokenWeight("wtnpo", 4, _wtnpo_eq16, "2σ((β+α)·logp_t − β·logp_ref_t) = 2p^{β+α} / (p^{β+α} + p_ref^β) "
                    "(paper eq. 16)", _WTNPO_HP, needs_ref=True)
WTNPO_PRODUCT = TokenWeight("wtnpo", 5, _wtnpo_product, "2σ(β(logp_t − logp_ref_t))·p_t^α (the paper code's "
                            "TNPO weight times p^α)", _WTNPO_HP, needs_ref=True)
WEIGHTED = TokenWeight("weighted", 6, _explicit, "caller-given weights", needs_explicit=True)
# open-unlearning's SatImp (src/trainer/utils.py compute_satimp_loss) and its defaults (configs/trainer/SatImp.yaml)
SATIMP = TokenWeight("satimp", 7, _satimp, "p_t^β1·(1 − p_t)^β2 (saturation × importance)",
                     {"beta1": 5.0, "beta2": 1.0}, scalar_names=("beta1", "beta2"))

# every entry, one per kernel code
ALL: Tuple[TokenWeight, ...] = (GA, NLL, WGA, TNPO, WTNPO, WTNPO_PRODUCT, WEIGHTED, SATIMP)
# objective name -> entry (WTNPO: its default form)
TOKEN_WEIGHTS: Dict[str, TokenWeight] = {w.name: w for w in ALL if w is not WTNPO_PRODUCT}
WTNPO_FORMS: Dict[str, TokenWeight] = {"eq16": WTNPO, "product": WTNPO_PRODUCT}


def token_weight(name: str, wtnpo_form: Optional[str] = None) -> TokenWeight:
    """The entry of a token-weighted objective; for ``wtnpo``, the one of ``wtnpo_form``."""
    if name not in TOKEN_WEIGHTS:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(TOKEN_WEIGHTS)}")
    if name != "wtnpo" or wtnpo_form is None:
        return TOKEN_WEIGHTS[name]
    if wtnpo_form not in WTNPO_FORMS:
        raise ValueError(f"unknown WTNPO form {wtnpo_form!r}; valid: {', '.join(WTNPO_FORMS)}")
    return WTNPO_FORMS[wtnpo_form]


def token_weighted(objective: str, logits: torch.Tensor, labels: torch.Tensor,
                   ref_logprobs: Optional[torch.Tensor] = None, *, weights: Optional[torch.Tensor] = None,
                   num_items_in_batch: NumItems = None, return_details: bool = False, per_sample: bool = False,
                   **hp):
    """token-mean of ``w_t · logp_t`` with the weight of table entry ``objective`` and its
    hyper-parameters ``hp`` (defaults from the table); ``weights`` (B, T) for ``"weighted"``."""
    entry = token_weight(objective, hp.get("wtnpo_form"))
    unknown = sorted(set(hp) - set(entry.defaults))
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {unknown} for {objective}; valid: {sorted(entry.defaults)}")
    if entry.needs_ref != (ref_logprobs is not None):
        raise ValueError(f"{objective} needs ref_logprobs (B, T) aligned with labels" if entry.needs_ref
                         else f"{objective} takes no ref_logprobs")
    if entry.needs_explicit != (weights is not None):
        raise ValueError(f"{objective} needs weights (B, T) aligned with labels" if entry.needs_explicit
                         else f"{objective} takes no weights")
    if weights is not None:
        check_aligned(weights, labels, "weights")
    tok_logp, mask, ref = prepare(logits, labels, ref_logprobs)
    if weights is not None:
        check_finite(weights.detach(), mask, "weights")
    w = entry.weights(tok_logp, ref, weights, hp)
    return weighted_token_loss(tok_logp, w, mask, num_items_in_batch, return_details, per_sample)
