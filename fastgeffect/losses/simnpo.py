"""SimNPO (Fan et al., 2024): reference-free NPO on the length-normalised NLL, as open-unlearning defines it."""

import torch
import torch.nn.functional as F

from ._common import NumItems, check_sequences_valid, prepare, sequence_logprobs, sequence_mean
from .hparams import check_hparams


def simnpo(logits: torch.Tensor, labels: torch.Tensor, beta: float = 4.5, delta: float = 0.0, *,
           num_seqs_in_batch: NumItems = None, return_details: bool = False,
        per_sample: bool = False):
    """``−(2/β)·mean_s logσ(β·(−logp(s)/|s| − δ))`` (open-unlearning defaults beta = 4.5, delta = 0)."""
    check_hparams("simnpo", beta=beta, delta=delta)
    tok_logp, mask, _ = prepare(logits, labels)
    check_sequences_valid(mask)
    avg_nll = -sequence_logprobs(tok_logp, mask) / mask.sum(-1)
    loss = sequence_mean(-(2.0 / beta) * F.logsigmoid(beta * (avg_nll - delta)), num_seqs_in_batch, per_sample)
    if not return_details:
        return loss
    return loss, {"seq_weights": 2.0 * torch.sigmoid(-beta * (avg_nll.detach() - delta)),
                  "logprobs": tok_logp.detach(), "mask": mask, "nll": -tok_logp.detach()[mask].mean()}
