"""The quantisation attack's weights: round-to-nearest (RTN) symmetric weight quantisation in plain
torch (no GPU, no bitsandbytes), simulated: each weight is quantised and dequantised back to the
model's dtype, so the model runs as before on what a b-bit deployment would hold.

Per row (output channel) of a linear weight, or per group of ``group_size`` consecutive inputs of
a row (the last group of a row whose length ``group_size`` does not divide is shorter), with
``qmax = 2^(b−1) − 1``::

    scale = max|w| / qmax          (over the row or the group)
    q     = clamp(round(w / scale), −qmax − 1, qmax)     (round half to even, torch.round)
    w'    = q · scale

A row or group of zeros has scale 0 and stays zero (no NaN). The arithmetic runs in float32 (float64
for a float64 weight) and the result is cast back to the weight's dtype.

What :func:`quantized_copy` quantises: the weight of every ``nn.Linear`` (attention, MLP and, by
default, the LM head; biases are kept). Embeddings and norms stay in full precision; an LM head tied
to the input embeddings is untied in the copy, so the embeddings keep their weights.
"""
from __future__ import annotations

import copy
import numbers
from typing import List, Optional

import torch

BITS = (8, 4)  # the attack's precisions
GROUP_SIZE = 128  # the grouped variant's inputs per scale (the common GPTQ/AWQ setting)


def check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be one of {sorted(BITS)}, got {bits!r}")


def check_group_size(group_size) -> None:
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral)
                                   or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (per output channel), got {group_size!r}")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: Optional[int] = None) -> torch.Tensor:
    """The dequantised RTN quantisation of a 2-D weight ``(out, in)``: one scale per row
    (``group_size=None``) or per group of ``group_size`` inputs of a row (module docstring). A new
    tensor of ``weight``'s dtype and device; ``weight`` is not changed."""
    check_bits(bits)
    check_group_size(group_size)
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    n_in = w.shape[1]
    g = n_in if group_size is None or group_size > n_in else int(group_size)
    out = torch.empty_like(w)
    # the whole groups in one reshape; the shorter last group (g does not divide n_in) on its own
    cut = (n_in // g) * g
    for lo, hi, size in ((0, cut, g), (cut, n_in, n_in - cut)):
        if hi > lo:
            part = w[:, lo:hi].reshape(w.shape[0], -1, size)
            out[:, lo:hi] = _rtn(part, qmax).reshape(w.shape[0], hi - lo)
    return out.to(weight.dtype)


def _rtn(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: 0 / 1 = 0
    return torch.clamp(torch.round(groups / safe), -qmax - 1, qmax) * scale


def quantized_linears(model: torch.nn.Module, include_lm_head: bool = True) -> List[str]:
    """Names of the ``nn.Linear`` modules :func:`quantized_copy` quantises, in module order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (include_lm_head or m is not head)]


@torch.no_grad()
def quantized_copy(model: torch.nn.Module, bits: int, group_size: Optional[int] = None, *,
                   include_lm_head: bool = True) -> torch.nn.Module:
    """A deep copy of ``model`` whose linear weights are RTN-quantised (:func:`quantize_rtn`); the
    original is untouched. Each quantised weight becomes a new parameter (so a weight tied to the
    embeddings is untied and the embeddings keep full precision)."""
    check_bits(bits)
    check_group_size(group_size)
    names = set(quantized_linears(model, include_lm_head))
    if not names:
        raise ValueError("the model has no nn.Linear layer to quantise")
    out = copy.deepcopy(model)
    for name, m in out.named_modules():
        if name in names:
            m.weight = torch.nn.Parameter(quantize_rtn(m.weight, bits, group_size), requires_grad=False)
    return out.eval()
