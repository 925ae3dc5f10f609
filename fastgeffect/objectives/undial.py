"""UNDIAL: self-distillation towards the original model with the true token's logit lowered by β.
It reads θ_o's full logits at every step, so it needs the reference model itself (not the cache)."""
from ..losses import undial
from .base import ForgetTerm, loss_defaults


def undial_term(ctx, batches, hp):
    batch = batches["forget"]
    if ctx.reference is None:
        raise ValueError("undial needs the original model's full logits at every step: pass "
                         "reference=ReferenceModel(...) (a frozen copy, or ReferenceModel.from_peft for adapters)")
    return undial(ctx.forward(batch).logits, batch["labels"], ctx.reference.logits(batch), hp["beta"],
                  num_items_in_batch=ctx.num_items.get("forget_tokens"), return_details=True,
                  per_sample=ctx.per_sample)


# open-unlearning pairs UNDIAL with GradDiff's retain NLL at weight α = 0 (configs/trainer/UNDIAL.yaml): none
UNDIAL = ForgetTerm("undial", undial_term, loss_defaults(undial, "beta"),
                    "token-mean over answers of CE(softmax(z_ref − β·onehot(y)), p_θ) (θ_o's full logits)",
                    needs_reference_model=True)
