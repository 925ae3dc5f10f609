"""Every hyper-parameter name an objective or regulariser takes, with its type, help and choices.

One name per hyper-parameter, everywhere: the objective's ``hparams`` key, the loss or kernel
keyword and (with dashes) the driver's flag. The defaults belong to each objective
(``ForgetTerm.defaults``) or regulariser (``Regularizer.defaults``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..losses import WTNPO_FORMS
from ..losses.kl import KL_DIRECTIONS, KL_POSITIONS


@dataclass(frozen=True)
class HParam:
    name: str
    type: type
    help: str
    choices: Optional[Tuple[str, ...]] = None
    minimum: Optional[float] = None  # the smallest valid value, checked when the objective is built


HPARAMS: Dict[str, HParam] = {h.name: h for h in (
    HParam("alpha", float, "α: exponent of the token's own probability p^α in its weight"),
    HParam("beta", float, "β: inverse temperature of the reference-anchored (token or sequence) weight; UNDIAL: "
                          "how far the true token's teacher logit is lowered"),
    HParam("beta1", float, "β1: SatImp's saturation exponent, the p^β1 of its token weight", minimum=0),
    HParam("beta2", float, "β2: SatImp's importance exponent, the (1 − p)^β2 of its token weight", minimum=0),
    HParam("delta", float, "δ: margin subtracted from the length-normalised NLL"),
    HParam("wtnpo_form", str, "WTNPO weight: eq16 = paper eq. 16, product = the paper code's TNPO weight × p^α",
           tuple(WTNPO_FORMS)),
    HParam("rmu_layer", int, "decoder block whose hidden states RMU steers (−1: the middle block)"),
    HParam("steering_coeff", float, "scale c of RMU's control vector c·u"),
    HParam("control_seed", int, "seed of RMU's random control direction u"),
    HParam("kl_direction", str, "forward = KL(p_ref‖p_θ) (TOFU), reverse = KL(p_θ‖p_ref)", KL_DIRECTIONS),
    HParam("kl_positions", str, "average the KL over all positions (TOFU parity) or over answer tokens only",
           KL_POSITIONS),
    HParam("rr_layer", int, "decoder block whose retain hidden states RR keeps (−1: the middle block)"),
    HParam("ignore_first_n_answer_tokens", int, "CE-U leaves out the first n answer tokens of each sequence",
           minimum=0),
    HParam("constraint_eps", float, "PDU: the retain constraint reg_loss ≤ ε; with dual_step η > 0, λ (--lam: its "
                                    "start) is a dual variable moved after each step to max(0, λ + η·(reg_loss − ε))"),
    HParam("dual_step", float, "PDU: the dual step size η (0: λ fixed; give it with constraint_eps; "
                               "open-unlearning uses 1.0)", minimum=0),
)}
