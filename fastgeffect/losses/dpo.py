"""DPO for unlearning: prefer a "win" answer over the forget ("lose") answer.

IdkDPO is DPO with the win answer a refusal ("I don't know"-style) to the forget question and
the lose answer the forget answer itself; NPO is the limit with no win term.
"""
import torch
import torch.nn.functional as F

from ._common import NumItems, check_sequences_valid, prepare, sequence_logprobs, sequence_mean
from .hparams import check_hparams


def _log_ratio(logits, labels, ref_logprobs):
    tok_logp, mask, ref = prepare(logits, labels, ref_logprobs)
    check_sequences_valid(mask)
    return sequence_logprobs(tok_logp, mask) - sequence_logprobs(ref, mask)


def dpo(win_logits: torch.Tensor, win_labels: torch.Tensor, win_ref_logprobs: torch.Tensor,
        lose_logits: torch.Tensor, lose_labels: torch.Tensor, lose_ref_logprobs: torch.Tensor,
        beta: float = 0.1, *, num_seqs_in_batch: NumItems = None, return_details: bool = False,
        per_sample: bool = False):
    """``−(2/β)·mean_s logσ(β·((logp_w − logp_ref_w) − (logp_l − logp_ref_l)))`` (sequence sums;
    open-unlearning's form and default beta = 0.1)."""
    check_hparams("dpo", beta=beta)
    if win_logits.shape[0] != lose_logits.shape[0]:
        raise ValueError(f"win batch ({win_logits.shape[0]}) and lose batch ({lose_logits.shape[0]}) "
                         "must pair one-to-one")
    win = _log_ratio(win_logits, win_labels, win_ref_logprobs)
    lose = _log_ratio(lose_logits, lose_labels, lose_ref_logprobs)
    margin = win - lose
    loss = sequence_mean(-(2.0 / beta) * F.logsigmoid(beta * margin), num_seqs_in_batch, per_sample)
    if not return_details:
        return loss
    return loss, {"margin": margin.detach(), "seq_weights": 2.0 * torch.sigmoid(-beta * margin.detach())}
