"""Pieces shared by the fused losses: input checks, masked-token compaction, chunk sizing and
the fp32 weight-gradient accumulation.

Shapes: ``hidden`` (N, H), ``weight`` (V, H), ``labels`` (N,) *aligned* (row i predicts
``labels[i]``; -100 ignored). Everything here is plain torch and backend-independent.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from ..losses import IGNORE_INDEX, AllMaskedError
from ..losses._common import positive_count

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], what: str = "hidden"):
    if hidden.dim() != 2:
        raise ValueError(f"{what} must be (tokens, hidden_size), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"LM-head weight must be (vocab, hidden_size), got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{what} hidden size {hidden.shape[1]} does not match the LM-head weight "
                         f"{tuple(weight.shape)} (expected (vocab, {hidden.shape[1]}))")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{what} dtype {hidden.dtype} does not match LM-head weight dtype {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{what} is on {hidden.device} but the LM-head weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match vocab size {weight.shape[0]}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must have the LM-head weight's dtype/device ({weight.dtype}, {weight.device})")


def check_labels(labels: torch.Tensor, n: int, device: torch.device):
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden's {n} rows "
                         "(expected aligned labels of shape (tokens,))")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {device}")


def check_per_token(x: Optional[torch.Tensor], n: int, device: torch.device, name: str):
    if x is None:
        return
    if x.shape != (n,):
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match hidden's {n} rows (expected ({n},))")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {device}")


def autocast_inputs(device: torch.device, *tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The LM-head operands as ``torch.autocast`` would cast them for a matmul on ``device``: to
    the autocast dtype when it is on (fp64 and None untouched), unchanged otherwise. The fused
    call then runs with autocast off in that one dtype, and autograd casts the gradients back
    through these casts (to fp32 master weights, say)."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dt = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def launch_device(t: torch.Tensor):
    """Context for a Triton launch on ``t``: Triton takes device and stream from the *current*
    CUDA device, so a tensor on cuda:1 (``--device cuda:1``, a ``device_map`` model) needs that
    device made current. CPU tensors (the interpreter) need nothing."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def compact_valid(labels: torch.Tensor, vocab: int, num_items=None) -> Tuple[torch.Tensor, int, Optional[float]]:
    """Row indices of the valid labels, their count, and ``num_items_in_batch`` as a float.

    This is the one host synchronisation of a fused call: the number of valid rows decides how
    many chunks run. The vocabulary-range check and a tensor ``num_items_in_batch`` ride along
    in the same ``tolist()``."""
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= vocab))
    stats = [valid.sum(), bad.sum()]
    if isinstance(num_items, torch.Tensor):
        stats.append(num_items.to(labels.device, torch.float64).reshape(()))
    values = torch.stack([s.to(torch.float64) for s in stats]).tolist()
    n_valid, n_bad = int(values[0]), int(values[1])
    if n_bad:
        raise ValueError(f"labels contain {n_bad} ids outside the vocabulary [0, {vocab})")
    items = values[2] if len(values) > 2 else (None if num_items is None else float(num_items))
    if items is None and n_valid == 0:
        raise AllMaskedError("all labels are -100: the batch has no answer token to average over "
                             "(check the collator's question masking and max length)")
    positive_count(items, "num_items_in_batch")
    idx = torch.nonzero_static(valid, size=n_valid).flatten() if n_valid else valid.new_zeros(0, dtype=torch.long)
    return idx, n_valid, items


# Logits elements per chunk buffer. CPU: small, the torch path makes fp32 temporaries of it.
# CUDA: at least 1024 rows so that each chunk's dW GEMM, which re-reads the fp32 (vocab × hidden)
# accumulator, stays long next to that read (256 rows at V=128k cost ~1.8× the GEMM time), with
# 2^27 elements as the target and 2^28 as the cap (512 MB of bf16 per buffer).
CPU_ELEMENTS = 1 << 22
CUDA_ELEMENTS, CUDA_MAX_ELEMENTS, CUDA_MIN_ROWS = 1 << 27, 1 << 28, 1024


def chunk_rows(n_rows: int, vocab: int, device: torch.device, buffers: int = 1,
               chunk_size: Optional[int] = None) -> int:
    """Rows per chunk (a power of two, at most ``n_rows``): a budget of logits elements per
    (chunk × vocab) buffer, ``buffers`` of them, so the buffers stay small next to the LM-head
    weight while the matmuls stay large. ``chunk_size`` overrides."""
    if chunk_size is not None:
        if int(chunk_size) <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return int(chunk_size)
    per_row = vocab * buffers
    if device.type == "cuda":
        rows = min(max(CUDA_ELEMENTS // per_row, CUDA_MIN_ROWS), max(1, CUDA_MAX_ELEMENTS // per_row))
    else:
        rows = max(16, CPU_ELEMENTS // per_row)
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_rows))


_MM_FP32_OUT = {}


def _probe_out_dtype(device: torch.device, dtype: torch.dtype) -> str:
    """How this torch/GPU can add a half-precision matmul into an fp32 buffer: ``"out"``
    (``addmm(out_dtype=fp32, out=acc)``, accumulation fused in the GEMM), ``"functional"``, or
    ``"upcast"`` (matmul in the input dtype, then an fp32 add). Checked once on tiny tensors."""
    key = (device, dtype)
    if key in _MM_FP32_OUT:
        return _MM_FP32_OUT[key]
    mode = "upcast"
    if device.type == "cuda":
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(8, 16, generator=gen).to(device, dtype)
        b = torch.randn(16, 24, generator=gen).to(device, dtype)
        acc0 = torch.randn(8, 24, generator=gen).to(device)
        want = acc0 + a.float() @ b.float()
        for cand in ("out", "functional"):
            try:
                acc = acc0.clone()
                if cand == "out":
                    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                else:
                    acc = torch.addmm(acc, a, b, out_dtype=torch.float32)
                if acc.dtype == torch.float32 and torch.allclose(acc, want, atol=1e-2, rtol=1e-2):
                    mode = cand
                    break
            except (RuntimeError, TypeError, NotImplementedError):
                continue
    _MM_FP32_OUT[key] = mode
    return mode


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` with ``acc`` fp32 (or fp64) and ``a``, ``b`` in the model dtype."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    mode = _probe_out_dtype(a.device, a.dtype)
    if mode == "out":
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    if mode == "functional":
        return acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))
    return acc.add_(a @ b)


def grads_needed(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[bool, bool, bool]:
    """(d hidden?, d weight?, d bias?) for a fused call. False everywhere under ``torch.no_grad()``
    or when nothing requires grad: the call then skips the two gradient GEMMs and the (vocab ×
    hidden) fp32 accumulator (the autograd Function's ``needs_input_grad`` does not see no_grad)."""
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad,
            on and bias is not None and bias.requires_grad)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for weight/bias gradients: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_grads(grads, grad_output: torch.Tensor, scale: torch.Tensor, dtypes):
    """The backward of a fused loss: the forward stored its gradients *unscaled* (a per-token
    gradient ``w·(onehot − p)``, not ``w·(onehot − p)/N``, which underflows fp16 at large N·V);
    multiply by ``scale · grad_output`` in fp32 (fp64) and cast to the inputs' dtypes last, so
    neither a half-precision accumulator nor a large ``grad_output`` (65536 overflows fp16) loses
    anything. No host synchronisation (the multiply runs even when grad_output is 1)."""
    factor = grad_output.to(scale.dtype) * scale
    return tuple(None if g is None else (g.to(factor.dtype) * factor).to(dt) for g, dt in zip(grads, dtypes))
