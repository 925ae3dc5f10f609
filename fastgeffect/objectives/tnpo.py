from ..losses import tnpo
from .base import ForgetTerm
from .token_weighted import token_weighted_loss


def tnpo_term(ctx, batches, hp):
    return token_weighted_loss(ctx, batches["forget"], tnpo, "tnpo", hp, "forget_tokens", needs_ref=True,
                               hp_names=("beta",))


TNPO = ForgetTerm("tnpo", tnpo_term, {"beta": 4.0}, "token-mean of w_t·logp_t, w_t = 2σ(β(logp_t − logp_ref_t))",
                  needs_ref_logprobs=True)
