"""UNDIAL (open-unlearning's ``compute_undial_loss``): self-distillation towards the original
model's distribution with the true token's logit lowered by β.

Deviation: open-unlearning scatters the shifted labels without masking, so a ``-100`` label
lowers vocabulary entry V − 100 of the teacher, and it averages over every position, padding and
question included. Here only answer positions (labels not -100) count: the two agree exactly when
every shifted label is valid; with masked labels this is the loss over the answer tokens alone.
"""

import torch

from ._common import NumItems, prepare
from .hparams import check_hparams
from .soft_targets import answer_rows, soft_target_loss


def undial(logits: torch.Tensor, labels: torch.Tensor, ref_logits: torch.Tensor, beta: float = 10.0, *,
           num_items_in_batch: NumItems = None, return_details: bool = False, per_sample: bool = False):
    """token-mean over answer positions of ``CE(softmax(ref_logits − β·onehot(y)), p_θ)``.

    ``ref_logits`` (B, T, V) are the original model's full, unshifted logits on the same batch
    (detached); β = 10 is open-unlearning's configured value (configs/trainer/UNDIAL.yaml)."""
    check_hparams("undial", beta=beta)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} does not match logits {tuple(logits.shape)}: "
                         "UNDIAL needs the original model's full logits on the same batch")
    tok_logp, mask, _ = prepare(logits, labels)
    rows, y = answer_rows(logits, labels, mask)
    logp = torch.log_softmax(rows.to(tok_logp.dtype), -1)
    teacher = answer_rows(ref_logits, labels, mask)[0].detach().to(logp.dtype)
    teacher = teacher.scatter_add(-1, y[:, None], torch.full_like(y[:, None], -beta, dtype=logp.dtype))
    return soft_target_loss(logp, teacher, tok_logp, mask, "UNDIAL cross-entropy (logits or ref_logits)",
                            num_items_in_batch, return_details, per_sample)
