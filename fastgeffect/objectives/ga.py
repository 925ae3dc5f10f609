from ..losses import ga
from .base import ForgetTerm
from .token_weighted import token_weighted_loss


def ga_term(ctx, batches, hp):
    return token_weighted_loss(ctx, batches["forget"], ga, "ga", hp, "forget_tokens")


GA = ForgetTerm("ga", ga_term, {}, "token-mean of logp_t (gradient ascent on the forget NLL)")
GRADDIFF = ForgetTerm("graddiff", ga_term, {}, "GA + λ·GD (GD on retain answers)", default_regularizer="gd")
