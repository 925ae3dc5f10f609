"""CE-U (arXiv:2503.01224; open-unlearning's ``cross_entropy_unlearning_loss``): cross-entropy
against the model's own (detached) distribution with the true token removed, over the answer
positions left after dropping the first n answer tokens of each sequence."""
import torch

from ._common import IGNORE_INDEX, AllMaskedError, NumItems, prepare
from .hparams import HPARAMS
from .soft_targets import answer_rows, soft_target_loss


def drop_first_answer_tokens(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``labels`` with the first ``n`` non -100 labels of each sequence set to -100 (a training
    setting of the CE-U paper, kept by open-unlearning; a label in column 0 counts among the n)."""
    valid = labels != IGNORE_INDEX
    first = valid & (valid.cumsum(-1) <= n)
    return labels.masked_fill(first, IGNORE_INDEX)


def check_n(n) -> int:
    if not isinstance(n, int):  # the table accepts 2.0 for an integer; slicing needs an int
        raise ValueError(f"ceu: ignore_first_n_answer_tokens must be an integer >= 0, got {n!r}")
    return HPARAMS["ignore_first_n_answer_tokens"].check(n, "ceu")


def ceu(logits: torch.Tensor, labels: torch.Tensor, ignore_first_n_answer_tokens: int = 1, *,
        num_items_in_batch: NumItems = None, return_details: bool = False, per_sample: bool = False):
    """token-mean over the kept answer positions of ``CE(softmax(z̃), p_θ)``, ``z̃`` the detached
    logits with the true token's set to −inf (open-unlearning's default n = 1).

    ``num_items_in_batch`` must count the kept positions (:func:`drop_first_answer_tokens`)."""
    kept = drop_first_answer_tokens(labels, check_n(ignore_first_n_answer_tokens))
    tok_logp, mask, _ = prepare(logits, kept)
    if num_items_in_batch is None and not bool(mask.any()) and bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise AllMaskedError(f"ceu: no answer token is left after dropping the first {ignore_first_n_answer_tokens} "
                             "of each sequence (answers too short, or lower ignore_first_n_answer_tokens)")
    rows, y = answer_rows(logits, kept, mask)
    logp = torch.log_softmax(rows.to(tok_logp.dtype), -1)
    target = logp.detach().scatter(-1, y[:, None], float("-inf"))  # softmax(z with z_y = −inf)
    return soft_target_loss(logp, target, tok_logp, mask, "CE-U cross-entropy (logits)", num_items_in_batch,
                            return_details, per_sample)
