"""The unlearning loop's settings (:class:`UnlearnConfig`), apart from the loop so that the
driver's run configuration and the loop share one definition without importing the loop.

Each field states its default, help and bounds once; ``python -m fastgeffect.run``'s training flags
take theirs from here (:class:`fastgeffect.driver.config.RunConfig`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from ..dataclass_cli import first_error, setting

RISK_ROWS = ("fixed", "step")
DAMAGE_FROM = ("predicted", "realised")
GUARDS = ("none", "pcgrad", "gru")  # --geffect-guard (training.guard)
SCOPES = ("model", "group")         # --guard-scope


def guard_error(guard: str, regularizer: str) -> Optional[str]:
    """Why ``--geffect-guard`` cannot run with this regulariser (None: it can): it guards against the
    retain set's gradient, the regulariser's."""
    if guard == "none" or regularizer != "none":
        return None
    return (f"--geffect-guard {guard} needs a retain set: it projects the forget term's gradient away from the "
            "regulariser's, and the objective has none (give --regularizer gd, kl or rr)")


def damage_stop_error(stop_at: Optional[float], geffect_every: int, update_effects: bool) -> Optional[str]:
    """Why ``--stop-at-retain-damage`` cannot run with these settings (None: it can): it sums the
    retain risk's update effect of every step."""
    if stop_at is None or (geffect_every == 1 and update_effects):
        return None
    return (f"--stop-at-retain-damage needs the retain risk's update effect at every step: --geffect-every 1 and "
            f"--update-effects on (got --geffect-every {geffect_every}, --update-effects "
            f"{'on' if update_effects else 'off'})")


@dataclass
class UnlearnConfig:
    epochs: int = setting(5, "passes over the forget set", low=1)
    batch_size: int = setting(16, "forget samples per optimiser step (+ as many retain)", low=1)
    grad_accum: int = setting(1, "micro-batches per step (exact accumulation)", low=1)
    lr: float = setting(2e-5, "peak learning rate", low=0, strict=True)
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay", low=0)
    decay_all_params: bool = setting(False, "weight decay on every parameter, biases and norm weights included (the "
                                            "behaviour before issue 28; default: none on them, as Hugging Face's "
                                            "Trainer)")
    warmup_epochs: float = setting(1.0, "linear warm-up length, then linear decay", low=0)
    max_grad_norm: float = setting(1.0, "gradient clipping threshold (global L2 norm; 0: no clipping)", low=0,
                                   why="0: no clipping")
    geffect_every: int = setting(1, "measure every K steps (0: never)", low=0, why="0: never")
    geffect_batch: int = setting(16, "samples in each risk batch", low=1)
    risk_rows: str = setting("fixed", "rows of the two risks: fixed (one seeded draw of forget rows and of held-out "
                                      "retain rows, the same at every step and across --resume, so cumulative "
                                      "effects are changes of one risk) or step (the step's first forget rows and a "
                                      "fresh held-out draw at every step)", choices=RISK_ROWS)
    geffect_groups: str = setting("paper", "layer groups: the paper's (embed, shallow, middle, deep, lm), one per "
                                           "block, or one per parameter")
    # with the G-effects: the AdamW step's predicted and realised risk changes
    update_effects: bool = setting(True, "also predict each risk's change under the real (clipped AdamW) step and "
                                         "measure the realised change after it (one more forward per risk and step)")
    second_order: bool = setting(False, "with the update effects: also the second-order term ½ΔθᵀHΔθ of each risk's "
                                        "change under the real step and the prediction with it (one Hessian-vector "
                                        "product, a double backward through the risk, per risk and measured step)")
    pg_steps: Sequence[int] = setting(default_factory=tuple, help="steps with per-sample PG-effects (-1: the last)")
    save_every: int = setting(0, "resumable state every N steps (0: epoch ends only)", low=0,
                              why="0: epoch ends only")
    seed: int = setting(0, "seed of the data order and the retain pairing", low=0, high=2 ** 32, high_text="2^32")
    # stopping on predicted damage (needs the retain risk's update effect at every step)
    stop_at_retain_damage: Optional[float] = setting(
        None, "stop unlearning after the first step at which the cumulative predicted relative increase of the "
              "retain risk, sum of predicted_opt / R_retain(θ_0), exceeds X; evaluation follows as usual (needs "
              "G-effects at every step with update effects; default: off)", low=0, strict=True, metavar="X")
    stop_damage_from: str = setting("predicted", "what --stop-at-retain-damage sums: the predicted (predicted_opt) "
                                                 "or the realised changes of the retain risk", choices=DAMAGE_FROM)
    # conflict-free updates (training.guard)
    geffect_guard: str = setting("none", "conflict-free updates: take out of the forget term's gradient its part "
                                         "against the retain gradient (the regulariser's) when their inner product is "
                                         "negative: gru (GRU, Wang et al. 2025: against a moving average of the retain "
                                         "gradient), pcgrad (PCGrad's projection, Yu et al. 2020: against this step's) "
                                         "or none; needs a regulariser", choices=GUARDS)
    guard_scope: str = setting("model", "where --geffect-guard projects: the whole model's gradient at once (GRU's and "
                                        "PCGrad's own) or each G-effect layer group (--geffect-groups) on its own",
                               choices=SCOPES)
    gru_gamma: float = setting(0.8, "GRU's weight of the step's retain gradient in its moving average (its gamma_gru)",
                               low=0, strict=True, high=1)
    stop_at_step: Optional[int] = setting(None, "stop after N steps with the state saved, as if interrupted "
                                                "(continue with --resume)", low=0)

    def check(self) -> None:
        error = first_error(self, name_of=str)
        if error:
            raise ValueError(error)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.second_order and not (self.geffect_every > 0 and self.update_effects):
            raise ValueError("second_order needs the G-effects (geffect_every > 0) with update_effects on: it is a "
                             "term of the real step's predicted risk change")
        error = damage_stop_error(self.stop_at_retain_damage, self.geffect_every, self.update_effects)
        if error:
            raise ValueError(error)


def config_dict(cfg: UnlearnConfig) -> dict:
    d = asdict(cfg)
    d["pg_steps"] = list(cfg.pg_steps)
    return d
