from ..losses import po
from .base import ForgetTerm
from .token_weighted import token_weighted_loss


def po_term(ctx, batches, hp):
    return token_weighted_loss(ctx, batches["forget_idk"], po, "nll", hp, "forget_idk_tokens")


PO = ForgetTerm("po", po_term, {}, "token-mean NLL of a refusal answer to the forget question",
                needs_batches=("forget_idk",))
