from ..losses import wga
from .base import ForgetTerm
from .token_weighted import token_weighted_loss


def wga_term(ctx, batches, hp):
    return token_weighted_loss(ctx, batches["forget"], wga, "wga", hp, "forget_tokens", hp_names=("alpha",))


WGA = ForgetTerm("wga", wga_term, {"alpha": 5.0}, "token-mean of w_t·logp_t, w_t = p_t^α")
