"""Run a Hugging Face causal LM without materialising its logits and return a fused loss.

The decoder (``model.get_decoder()``: ``LlamaModel``, ``PhiModel``, ``GPT2Model``, ...) gives
the last hidden state (final norm included); the LM head's weight/bias come from
``model.get_output_embeddings()`` (tied embeddings included) and go straight into the fused
kernels. Shifting follows Hugging Face: position t predicts ``labels[:, t + 1]``; instead of
slicing the hidden states (a copy), the labels are shifted left and the last column is -100.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..losses import IGNORE_INDEX
from ..model_structure import decoder_and_head
from .kl import fused_linear_kl
from .token_weighted import fused_linear_token_weighted


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], **kwargs):
    decoder, head = decoder_and_head(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, **kwargs)
    return out.last_hidden_state, head


def shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    """(B, T) -> (B*T,) with entry (b, t) = x[b, t + 1] and ``fill`` in the last column."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1).reshape(-1)


def fused_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         labels: torch.Tensor, *, objective: str, ref_logprobs: Optional[torch.Tensor] = None,
                         alpha: Optional[float] = None, beta: Optional[float] = None,
                         beta1: Optional[float] = None, beta2: Optional[float] = None, num_items_in_batch=None,
                         wtnpo_form: Optional[str] = None, weights: Optional[torch.Tensor] = None,
                         return_logprobs: bool = False, backend: str = "auto",
                         chunk_size: Optional[int] = None, **model_kwargs):
    """The loss ``fastgeffect.losses.<objective>(model(...).logits, labels, ...)`` would give,
    computed from the decoder's last hidden state with the fused kernels.

    ``labels``, ``ref_logprobs`` and ``weights`` are (B, T) aligned with labels (the
    ``fastgeffect.losses`` convention, column 0 never valid). With ``return_logprobs=True``
    also returns (B, T) detached per-token log-probs aligned with labels (0 where not valid),
    like ``fastgeffect.losses.token_logprobs``.
    """
    if labels.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    for name, x in (("ref_logprobs", ref_logprobs), ("weights", weights)):
        if x is not None and x.shape != labels.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} does not match labels {tuple(labels.shape)}")
    hidden, head = last_hidden(model, input_ids, attention_mask, **model_kwargs)
    B, T, H = hidden.shape
    out = fused_linear_token_weighted(
        hidden.reshape(B * T, H), head.weight, shift_left(labels, IGNORE_INDEX), objective=objective,
        alpha=alpha, beta=beta, beta1=beta1, beta2=beta2, bias=head.bias, num_items_in_batch=num_items_in_batch,
        wtnpo_form=wtnpo_form,
        ref_logprobs=None if ref_logprobs is None else shift_left(ref_logprobs, 0.0),
        weights=None if weights is None else shift_left(weights, 0.0),
        return_logprobs=return_logprobs, backend=backend, chunk_size=chunk_size)
    if not return_logprobs:
        return out
    loss, logp = out
    aligned = torch.zeros(B, T, dtype=logp.dtype, device=logp.device)
    aligned[:, 1:] = logp.view(B, T)[:, :-1]
    return loss, aligned


def fused_causal_lm_kl(model: nn.Module, ref_model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None, *,
                       direction: str = "forward", positions: str = "all", num_items_in_batch=None,
                       backend: str = "auto", chunk_size: Optional[int] = None, **model_kwargs) -> torch.Tensor:
    """``fastgeffect.losses.kl(model(...).logits, ref_model(...).logits, labels, ...)`` from the
    two decoders' hidden states; ``ref_model`` runs under ``torch.no_grad()``, as it is (a frozen
    copy in eval mode)."""
    hidden, head = last_hidden(model, input_ids, attention_mask, **model_kwargs)
    with torch.no_grad():
        ref_hidden, ref_head = last_hidden(ref_model, input_ids, attention_mask, **model_kwargs)
    B, T, H = hidden.shape
    aligned = None
    if positions == "answer":
        if labels is None:
            raise ValueError('positions="answer" needs labels')
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        aligned = shift_left(labels, IGNORE_INDEX)
    return fused_linear_kl(hidden.reshape(B * T, H), head.weight, ref_hidden.reshape(B * T, -1), ref_head.weight,
                           labels=aligned, direction=direction, positions=positions, bias=head.bias,
                           ref_bias=ref_head.bias, num_items_in_batch=num_items_in_batch, backend=backend,
                           chunk_size=chunk_size)
