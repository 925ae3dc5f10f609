"""Drop-in unlearning losses (docs/design.md §3). All are minimised.

Token-level losses take unshifted ``logits`` (B, T, V) and ``labels`` (B, T) with -100 on ignored
positions; ``ref_logprobs`` (B, T) are aligned with labels. Pass ``num_items_in_batch`` (token
losses) or ``num_seqs_in_batch`` (sequence losses) under gradient accumulation, and
``return_details=True`` to also get weights / log-probs / risk values for logging.
"""
from ._common import IGNORE_INDEX, AllMaskedError, token_logprobs, valid_mask
from .ceu import ceu, drop_first_answer_tokens
from .dpo import dpo
from .ga import ga
from .kl import kl
from .nll import gd, nll
from .npo import npo, npo_weights
from .po import load_refusals, po, sample_refusals
from .rmu import control_vector, rmu
from .rr import rr
from .satimp import satimp, satimp_weights
from .simnpo import simnpo
from .tnpo import tnpo, tnpo_weights
from .token_weights import TOKEN_WEIGHTS, WTNPO_FORMS, TokenWeight, token_weight, token_weighted
from .undial import undial
from .wga import wga, wga_weights
from .wtnpo import wtnpo, wtnpo_weights

__all__ = [
    "IGNORE_INDEX", "AllMaskedError", "token_logprobs", "valid_mask",
    "ga", "wga", "npo", "tnpo", "wtnpo", "simnpo", "dpo", "po", "rmu", "gd", "nll", "kl", "rr",
    "satimp", "undial", "ceu",
    "control_vector", "load_refusals", "sample_refusals", "drop_first_answer_tokens",
    "wga_weights", "tnpo_weights", "wtnpo_weights", "npo_weights", "satimp_weights",
    "token_weighted", "token_weight", "TokenWeight", "TOKEN_WEIGHTS", "WTNPO_FORMS",
]
