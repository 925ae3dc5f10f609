from ..losses import wtnpo
from .base import ForgetTerm
from .token_weighted import token_weighted_loss


def wtnpo_term(ctx, batches, hp):
    return token_weighted_loss(ctx, batches["forget"], wtnpo, "wtnpo", hp, "forget_tokens", needs_ref=True,
                               hp_names=("alpha", "beta", "form"), kernel_names={"form": "wtnpo_form"})


WTNPO = ForgetTerm("wtnpo", wtnpo_term, {"alpha": 1.5, "beta": 4.0, "form": "eq16"},
                   "token-mean of w_t·logp_t, w_t = 2σ((β+α)·logp_t − β·logp_ref_t) (eq. 16; form='product': "
                   "the paper code's TNPO weight · p^α)", needs_ref_logprobs=True)
