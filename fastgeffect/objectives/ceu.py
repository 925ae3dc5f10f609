"""CE-U: cross-entropy against the model's own distribution with the true token removed, after
dropping the first n answer tokens of each sequence."""
from ..losses import IGNORE_INDEX, ceu, drop_first_answer_tokens, valid_mask
from .base import ForgetTerm, loss_defaults


def kept_count(ctx, labels, n):
    """The accumulated batch's count of kept positions: its answer tokens less n per sequence. That is
    exact when every answer has more than n tokens, which is checked on this micro-batch (the other
    micro-batches and ranks are checked by their own calls)."""
    tokens, seqs = ctx.num_items.get("forget_tokens"), ctx.num_items.get("forget_seqs")
    if tokens is None or seqs is None:
        return None
    kept = valid_mask(drop_first_answer_tokens(labels, n)).sum(-1)
    answers = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    short = (kept != answers - n).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"ceu: sequences {short} of the batch have fewer than {n} answer token(s) (or a label in "
                         f"column 0), so the accumulated kept-token count (answer tokens − {n}·sequences) would be "
                         "wrong: lower ignore_first_n_answer_tokens or raise the max length")
    return tokens - n * seqs


def ceu_term(ctx, batches, hp):
    batch = batches["forget"]
    n = hp["ignore_first_n_answer_tokens"]
    return ceu(ctx.forward(batch).logits, batch["labels"], n, num_items_in_batch=kept_count(ctx, batch["labels"], n),
               return_details=True, per_sample=ctx.per_sample)


# open-unlearning's CEU trainer has no retain term (configs/trainer/CEU.yaml)
CEU = ForgetTerm("ceu", ceu_term, loss_defaults(ceu, "ignore_first_n_answer_tokens"),
                 "token-mean over answers but the first n of CE(softmax(z with z_y = −∞), p_θ)")
