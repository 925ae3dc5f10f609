from ..losses import npo
from .base import ForgetTerm, loss_defaults


def npo_term(ctx, batches, hp):
    batch = batches["forget"]
    logits = ctx.forward(batch).logits
    return npo(logits, batch["labels"], ctx.ref_logprobs(batch), hp["beta"],
               num_seqs_in_batch=ctx.num_items.get("forget_seqs"), return_details=True,
               per_sample=ctx.per_sample)


NPO = ForgetTerm("npo", npo_term, loss_defaults(npo, "beta"), "−(2/β)·mean_s logσ(β·(logp_ref(s) − logp(s)))",
                 ref_batches=("forget",))
