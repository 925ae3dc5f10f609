"""NPO (Zhang et al., 2024): a sequence-level, reference-anchored bounded version of GA."""
import torch
import torch.nn.functional as F

from ._common import NumItems, check_sequences_valid, prepare, sequence_logprobs, sequence_mean
from .hparams import check_hparams


def npo_weights(seq_logp: torch.Tensor, seq_ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """d loss / d logp(s) per sequence: ``2σ(β(logp(s) − logp_ref(s)))`` (the implicit GA weight)."""
    return 2.0 * torch.sigmoid(beta * (seq_logp.detach() - seq_ref_logp))


def npo(logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor, beta: float = 0.5, *,
        num_seqs_in_batch: NumItems = None, return_details: bool = False,
        per_sample: bool = False):
    """``−(2/β)·mean_s logσ(β·(logp_ref(s) − logp(s)))`` with sequence sums (paper default beta = 0.5)."""
    check_hparams("npo", beta=beta)
    tok_logp, mask, ref = prepare(logits, labels, ref_logprobs)
    check_sequences_valid(mask)
    seq_logp = sequence_logprobs(tok_logp, mask)
    seq_ref = sequence_logprobs(ref, mask)
    loss = sequence_mean(-(2.0 / beta) * F.logsigmoid(beta * (seq_ref - seq_logp)), num_seqs_in_batch, per_sample)
    if not return_details:
        return loss
    return loss, {"seq_weights": npo_weights(seq_logp, seq_ref, beta), "seq_logprobs": seq_logp.detach(),
                  "logprobs": tok_logp.detach(), "mask": mask, "nll": -tok_logp.detach()[mask].mean()}
