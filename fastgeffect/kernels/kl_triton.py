"""Triton chunk op of the fused KL regulariser.

One program per row. Pass 1 keeps online log-sum-exps of the current (q) and reference (r)
logits plus the running sum ``Σ e^{z_r − m_r}(z_r − z_q)`` (forward) or
``Σ e^{z_q − m_q}(z_q − z_r)`` (reverse), rescaled as the running max moves, so that
KL(r‖q) = A/s_r − lse_r + lse_q (and symmetrically) needs no (chunk × vocab) fp32 buffer.
Pass 2 writes the gradient over the current logits. Entries of zero mass (logit −inf) follow
0·log 0 = 0. Contract identical to
:func:`.kl_torch.kl_chunk_torch`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .common import launch_device
from .token_weighted_triton import NEG_BIG, launch_config


@triton.jit
def _kl_rows(q_ptr, stride_q, r_ptr, stride_r, scale_ptr, kl_ptr, V,
             REVERSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    qbase = q_ptr + row * stride_q
    rbase = r_ptr + row * stride_r
    cols0 = tl.arange(0, BLOCK_V)

    mq = tl.full((), NEG_BIG, tl.float32)
    mr = tl.full((), NEG_BIG, tl.float32)
    sq = tl.zeros((), tl.float32)
    sr = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        msk = cols < V
        # masked lanes read as a huge negative finite logit: zero mass, no inf - inf
        zq = tl.where(msk, tl.load(qbase + cols, mask=msk, other=0.0).to(tl.float32), NEG_BIG)
        zr = tl.where(msk, tl.load(rbase + cols, mask=msk, other=0.0).to(tl.float32), NEG_BIG)
        mq_new = tl.maximum(mq, tl.max(zq, axis=0))
        mr_new = tl.maximum(mr, tl.max(zr, axis=0))
        eq = tl.exp(zq - mq_new)
        er = tl.exp(zr - mr_new)
        diff = tl.where(msk, zq - zr, 0.0)
        # 0·log 0 = 0: an entry of zero mass (logit −inf) adds nothing, not 0·∞ = NaN
        if REVERSE:
            a = a * tl.exp(mq - mq_new) + tl.sum(eq * tl.where(eq > 0, diff, 0.0), axis=0)
        else:
            a = a * tl.exp(mr - mr_new) - tl.sum(er * tl.where(er > 0, diff, 0.0), axis=0)
        sq = sq * tl.exp(mq - mq_new) + tl.sum(eq, axis=0)
        sr = sr * tl.exp(mr - mr_new) + tl.sum(er, axis=0)
        mq = mq_new
        mr = mr_new
    lse_q = mq + tl.log(sq)
    lse_r = mr + tl.log(sr)
    if REVERSE:
        kl = a / sq - lse_q + lse_r
    else:
        kl = a / sr - lse_r + lse_q
    tl.store(kl_ptr + row, kl)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr).to(tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            msk = cols < V
            lq = tl.load(qbase + cols, mask=msk, other=0.0).to(tl.float32) - lse_q
            lr = tl.load(rbase + cols, mask=msk, other=0.0).to(tl.float32) - lse_r
            q = tl.exp(lq)
            if REVERSE:
                g = scale * q * (lq - lr - kl)
            else:
                g = scale * (q - tl.exp(lr))
            tl.store(qbase + cols, g.to(q_ptr.dtype.element_ty), mask=msk)


def kl_launch(logits: torch.Tensor, ref_logits: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
              reverse: bool, write_grad: bool) -> Tuple[tuple, Dict[str, object]]:
    """The arguments and compile-time parameters of :func:`_kl_rows` over the rows of ``logits``,
    which decide the variant Triton compiles (the ahead-of-time compile test builds its variants
    from this function)."""
    V = logits.shape[1]
    args = (logits, logits.stride(0), ref_logits, ref_logits.stride(0), scale.to(torch.float32), out, V)
    return args, {"REVERSE": reverse, "WRITE_GRAD": write_grad, **launch_config(V)}


def kl_chunk_triton(logits: torch.Tensor, ref_logits: torch.Tensor, scale: torch.Tensor, reverse: bool,
                    write_grad: bool) -> torch.Tensor:
    """Triton twin of :func:`.kl_torch.kl_chunk_torch`."""
    if logits.dtype == torch.float64 or ref_logits.dtype == torch.float64:
        raise ValueError("the Triton kernels take fp32/bf16/fp16 logits; use backend='torch' for fp64")
    C = logits.shape[0]
    assert logits.stride(1) == 1 and ref_logits.stride(1) == 1, "logits chunks must be row-contiguous"
    out = torch.empty(C, dtype=torch.float32, device=logits.device)
    args, params = kl_launch(logits, ref_logits, scale, out, reverse, write_grad)
    with launch_device(logits):
        _kl_rows[(C,)](*args, **params)
    return out
