"""Fused LM-head losses (docs/design.md §7-§8): token-weighted log-likelihoods (the table in
``fastgeffect/losses/token_weights.py``) and the KL regulariser computed from hidden states in token chunks,
never holding (tokens × vocab) logits. CUDA tensors use the Triton kernels, CPU tensors a
chunked PyTorch path with the same numerics; ``backend=`` or ``FASTGEFFECT_BACKEND`` forces one.
"""
from ..model_structure import decoder_and_head
from .dispatch import BACKENDS, resolve_backend
from .hf import fused_causal_lm_kl, fused_causal_lm_loss
from .kl import fused_linear_kl
from .token_weighted import fused_linear_token_weighted

# the name before it said what it computes (a token-weighted log-likelihood, not an NLL: GA is +log p)
fused_linear_weighted_nll = fused_linear_token_weighted

__all__ = ["fused_linear_token_weighted", "fused_linear_weighted_nll", "fused_linear_kl", "fused_causal_lm_loss",
           "fused_causal_lm_kl", "decoder_and_head", "resolve_backend", "BACKENDS"]
