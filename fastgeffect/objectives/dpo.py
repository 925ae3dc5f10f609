"""DPO-style unlearning: the "win" batch is preferred over the forget answer.

``dpo`` reads the preferred answers from the batch key ``forget_win``; ``idkdpo`` from
``forget_idk`` (refusal answers to the forget questions). Reference log-probs of the forget answers
come from the cache; those of the win answers from the batch or the reference model.
"""
from ..losses import dpo
from .base import ForgetTerm, loss_defaults


def _dpo(ctx, batches, hp, win_key):
    win, lose = batches[win_key], batches["forget"]
    return dpo(ctx.forward(win).logits, win["labels"], ctx.ref_logprobs(win),
               ctx.forward(lose).logits, lose["labels"], ctx.ref_logprobs(lose), hp["beta"],
               num_seqs_in_batch=ctx.num_items.get("forget_seqs"), return_details=True,
               per_sample=ctx.per_sample)


def dpo_term(ctx, batches, hp):
    return _dpo(ctx, batches, hp, "forget_win")


def idkdpo_term(ctx, batches, hp):
    return _dpo(ctx, batches, hp, "forget_idk")


DPO = ForgetTerm("dpo", dpo_term, loss_defaults(dpo, "beta"),
                 "−(2/β)·mean logσ(β·(Δ_win − Δ_forget)), Δ = logp − logp_ref",
                 needs_batches=("forget", "forget_win"), ref_batches=("forget", "forget_win"),
                 default_regularizer="gd")
IDKDPO = ForgetTerm("idkdpo", idkdpo_term, loss_defaults(dpo, "beta"), "DPO with a refusal answer as the preferred one",
                    needs_batches=("forget", "forget_idk"), ref_batches=("forget", "forget_idk"),
                    default_regularizer="gd")
