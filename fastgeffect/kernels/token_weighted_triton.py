"""Triton chunk op of the fused weighted log-likelihood (GA/WGA/TNPO/WTNPO/NLL/SatImp).

One program per row of a (chunk × vocab) logits block that the LM-head matmul just wrote:
pass 1 runs an online log-sum-exp over vocab blocks; the token's log-prob and its weight are
then computed in registers; pass 2 overwrites the row with the logits gradient
``scale · w · (onehot(y) − softmax(z))`` so the backward needs no recompute.
Contract identical to :func:`.token_weighted_torch.token_weighted_chunk_torch`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..losses import token_weights as tw
from .common import launch_device

# The token-weight table's kernel codes (fastgeffect/losses/token_weights.py), compile-time
# constants of the branch below; the branch must equal each entry's torch function (tested).
W_GA = tl.constexpr(tw.GA.code)
W_NLL = tl.constexpr(tw.NLL.code)
W_WGA = tl.constexpr(tw.WGA.code)
W_TNPO = tl.constexpr(tw.TNPO.code)
W_WTNPO = tl.constexpr(tw.WTNPO.code)
W_WTNPO_PRODUCT = tl.constexpr(tw.WTNPO_PRODUCT.code)
W_WEIGHTED = tl.constexpr(tw.WEIGHTED.code)
W_SATIMP = tl.constexpr(tw.SATIMP.code)

# Start of the running max: finite so that exp(m_old - m_new) never sees (-inf) - (-inf).
NEG_BIG = tl.constexpr(-3.0e38)


@triton.jit
def _token_weighted_rows(logits_ptr, stride_row, labels_ptr, ref_ptr, explicit_ptr, scale_ptr,
                       logp_ptr, wlogp_ptr, V, alpha, beta,
                       CODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols0 = tl.arange(0, BLOCK_V)

    # pass 1: online log-sum-exp over vocab blocks
    m = tl.full((), NEG_BIG, tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        msk = cols < V
        z = tl.where(msk, tl.load(base + cols, mask=msk, other=0.0).to(tl.float32), NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    y = tl.load(labels_ptr + row).to(tl.int64)
    logp = tl.load(base + y).to(tl.float32) - lse

    # token weight, detached (docs/design.md §3): the table entry whose code is CODE
    if CODE == W_GA:
        w = logp * 0.0 + 1.0
    elif CODE == W_NLL:
        w = logp * 0.0 - 1.0
    elif CODE == W_WGA:
        w = tl.exp(alpha * logp)
    elif CODE == W_TNPO:
        ref = tl.load(ref_ptr + row).to(tl.float32)
        w = 2.0 * tl.sigmoid(beta * (logp - ref))
    elif CODE == W_WTNPO:
        ref = tl.load(ref_ptr + row).to(tl.float32)
        w = 2.0 * tl.sigmoid((beta + alpha) * logp - beta * ref)
    elif CODE == W_WTNPO_PRODUCT:
        ref = tl.load(ref_ptr + row).to(tl.float32)
        w = 2.0 * tl.sigmoid(beta * (logp - ref)) * tl.exp(alpha * logp)
    elif CODE == W_WEIGHTED:
        w = tl.load(explicit_ptr + row).to(tl.float32)
    elif CODE == W_SATIMP:  # alpha, beta = β1, β2: p^β1·(1 − p)^β2, with 0^0 = 1 as torch's pow
        q = 1.0 - tl.exp(logp)
        imp = tl.where(q > 0.0, tl.exp(beta * tl.log(tl.maximum(q, 1e-30))), tl.where(beta == 0.0, 1.0, 0.0))
        w = tl.exp(alpha * logp) * imp
    tl.store(logp_ptr + row, logp)
    tl.store(wlogp_ptr + row, w * logp)

    # pass 2: logits gradient in place
    if WRITE_GRAD:
        c = w * tl.load(scale_ptr).to(tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            msk = cols < V
            z = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
            g = -c * tl.exp(z - lse)
            g = tl.where(cols == y, g + c, g)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=msk)


# Vocab columns per loop trip. Every vocabulary above SMALL_VOCAB (all real and shipped models)
# takes the full block on 8 warps (16 columns a thread): one compiled variant per dtype and
# objective, fewer first-launch compiles; tiny test vocabularies take their own power of two (the
# interpreter's arrays stay small).
MAX_BLOCK_V, SMALL_VOCAB = 4096, 512


def launch_config(vocab: int) -> Dict[str, int]:
    """``BLOCK_V`` and ``num_warps`` of a launch over rows of ``vocab`` logits (both kernels;
    ``num_stages`` is Triton's default). tests/test_kernels_compile.py compiles every variant this
    gives for sm_80 and sm_90 ahead of time and fails on a register spill."""
    block = MAX_BLOCK_V if vocab > SMALL_VOCAB else triton.next_power_of_2(vocab)
    return {"BLOCK_V": block, "num_warps": 8 if block >= MAX_BLOCK_V else 4}


def token_weighted_launch(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                          explicit: Optional[torch.Tensor], scale: torch.Tensor, logp: torch.Tensor,
                          wlogp: torch.Tensor, entry: tw.TokenWeight, alpha: float, beta: float,
                          write_grad: bool) -> Tuple[tuple, Dict[str, object]]:
    """The arguments and compile-time parameters of :func:`_token_weighted_rows` over the rows of
    ``logits``, which decide the variant Triton compiles. Labels go in as int64, reference
    log-probs and explicit weights as fp32 (the kernel converts them anyway), so the variants
    differ only in the logits' dtype, the objective, ``write_grad`` and the vocab size; the
    ahead-of-time compile test builds its variants from this function."""
    dummy = logp  # never read when the objective has no such input (constexpr branch)
    ref = dummy if ref is None else ref.to(torch.float32)
    explicit = dummy if explicit is None else explicit.to(torch.float32)
    V = logits.shape[1]
    args = (logits, logits.stride(0), labels.to(torch.int64), ref, explicit, scale.to(torch.float32), logp, wlogp, V,
            float(alpha), float(beta))
    return args, {"CODE": entry.code, "WRITE_GRAD": write_grad, **launch_config(V)}


def token_weighted_chunk_triton(logits: torch.Tensor, labels: torch.Tensor, ref: Optional[torch.Tensor],
                              explicit: Optional[torch.Tensor], scale: torch.Tensor, entry: tw.TokenWeight,
                              alpha: float, beta: float, write_grad: bool):
    """Triton twin of :func:`.token_weighted_torch.token_weighted_chunk_torch`."""
    if logits.dtype == torch.float64:
        raise ValueError("the Triton kernels take fp32/bf16/fp16 logits; use backend='torch' for fp64")
    C = logits.shape[0]
    assert logits.stride(1) == 1, "logits chunk must be row-contiguous"
    logp = torch.empty(C, dtype=torch.float32, device=logits.device)
    wlogp = torch.empty_like(logp)
    args, params = token_weighted_launch(logits, labels, ref, explicit, scale, logp, wlogp, entry, alpha, beta,
                                         write_grad)
    with launch_device(logits):
        _token_weighted_rows[(C,)](*args, **params)
    return logp, wlogp
