"""Every hyper-parameter name an objective or regulariser takes: its type, help, choices and bounds.

One name per hyper-parameter, everywhere: the loss or kernel keyword, the objective's ``hparams``
key and (with dashes) the driver's flag. The bounds live here only: the losses, the fused kernels,
:func:`fastgeffect.objectives.get_objective` and the command line all check a value with
:meth:`HParam.check`. The defaults belong to each loss (its signature, or the token-weight table
for token-weighted ones); the objectives take them from there.

This module imports nothing: every loss module may import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class HParam:
    name: str
    type: type
    help: str
    choices: Optional[Tuple[str, ...]] = None
    low: Optional[float] = None  # the smallest valid value (numbers: finite whatever the bounds)
    low_strict: bool = False  # the value must be above ``low``, not equal to it
    high: Optional[float] = None  # values must be below it
    why: str = ""  # what the bound protects, said in the error
    # a user whose lower bound differs: (user, low, low_strict, why) (UNDIAL's β may be 0)
    low_of: Tuple[Tuple[str, float, bool, str], ...] = ()

    def for_user(self, user: str) -> "HParam":
        """The hyper-parameter with ``user``'s own lower bound, where it has one."""
        for name, low, strict, why in self.low_of:
            if name == user:
                return HParam(self.name, self.type, self.help, self.choices, low, strict, self.high, why)
        return self

    def describe(self) -> str:
        """What a valid value is, in words (the help text and the errors say it)."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        kind = "an integer" if self.type is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{kind} in [{self.low:g}, {self.high:g})"
        if self.low is not None:
            return f"{kind} {'>' if self.low_strict else '>='} {self.low:g}"
        return kind

    def valid(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type is int and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_strict else value < self.low):
            return False
        return self.high is None or value < self.high

    def check(self, value, where: str = ""):
        """``value`` when it is valid, else a ValueError naming the hyper-parameter and the bound;
        ``where``: the loss or objective that takes it (its own bound, where it has one)."""
        own = self.for_user(where)
        if not own.valid(value):
            why = f" ({own.why})" if own.why else ""
            raise ValueError(f"{where + ': ' if where else ''}{self.name} must be {own.describe()}{why}, "
                             f"got {value!r}")
        return value


SEED_HIGH = 2 ** 32

HPARAMS: Dict[str, HParam] = {h.name: h for h in (
    HParam("alpha", float, "α: exponent of the token's own probability p^α in its weight", low=0),
    HParam("beta", float, "β: inverse temperature of the reference-anchored (token or sequence) weight; UNDIAL: "
                          "how far the true token's teacher logit is lowered", low=0, low_strict=True,
           why="the NPO-style losses divide by it",
           low_of=(("undial", 0, False, "how far the true token's teacher logit is lowered"),)),
    HParam("beta1", float, "β1: SatImp's saturation exponent, the p^β1 of its token weight", low=0),
    HParam("beta2", float, "β2: SatImp's importance exponent, the (1 − p)^β2 of its token weight", low=0),
    HParam("delta", float, "δ: margin subtracted from the length-normalised NLL"),
    HParam("wtnpo_form", str, "WTNPO weight: eq16 = paper eq. 16, product = the paper code's TNPO weight × p^α",
           ("eq16", "product")),
    HParam("rmu_layer", int, "decoder block whose hidden states RMU steers (−1: the middle block)", low=-1),
    HParam("steering_coeff", float, "scale c of RMU's control vector c·u"),
    HParam("control_seed", int, "seed of RMU's random control direction u", low=0, high=SEED_HIGH),
    HParam("kl_direction", str, "forward = KL(p_ref‖p_θ) (TOFU), reverse = KL(p_θ‖p_ref)", ("forward", "reverse")),
    HParam("kl_positions", str, "average the KL over all positions (TOFU parity) or over answer tokens only",
           ("all", "answer")),
    HParam("rr_layer", int, "decoder block whose retain hidden states RR keeps (−1: the middle block)", low=-1),
    HParam("ignore_first_n_answer_tokens", int, "CE-U leaves out the first n answer tokens of each sequence",
           low=0),
    HParam("constraint_eps", float, "PDU: the retain constraint reg_loss ≤ ε; with dual_step η > 0, λ (--lam: its "
                                    "start) is a dual variable moved after each step to max(0, λ + η·(reg_loss − ε))"),
    HParam("dual_step", float, "PDU: the dual step size η (0: λ fixed; give it with constraint_eps; "
                               "open-unlearning uses 1.0)", low=0),
)}


def check_hparams(where: str, **values) -> None:
    """Check each given hyper-parameter against its bounds (``None``: not given, not checked)."""
    for name, value in values.items():
        if value is not None:
            HPARAMS[name].check(value, where)
