from ..losses import simnpo
from .base import ForgetTerm, loss_defaults


def simnpo_term(ctx, batches, hp):
    batch = batches["forget"]
    logits = ctx.forward(batch).logits
    return simnpo(logits, batch["labels"], hp["beta"], hp["delta"],
                  num_seqs_in_batch=ctx.num_items.get("forget_seqs"), return_details=True,
               per_sample=ctx.per_sample)


SIMNPO = ForgetTerm("simnpo", simnpo_term, loss_defaults(simnpo, "beta", "delta"),
                    "−(2/β)·mean_s logσ(β·(−logp(s)/|s| − δ)) (reference-free)", default_regularizer="gd")
