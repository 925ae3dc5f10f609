"""Data-parallel helpers (docs/design.md §4.2): rank/world, the one small all-reduce, sharding detection.

Everything here is a no-op in a single process (no ``torch.distributed`` group, or world size 1),
so the single-process code paths never change.

How a G-effect ``<∇R, g>`` is reduced, with ``g`` the (averaged) objective gradient:

* DDP (``"replicated"``): every rank holds the full averaged ``g``. Each rank back-propagates only
  its share of the risk, ``R_r = Σ_{local tokens} nll / N_global`` (so Σ_r R_r = R), without the DDP
  all-reduce, and dots that local risk gradient with ``g``: ``Σ_r <∇R_r, g> = <∇R, g>`` exactly,
  because ``g`` is the same on every rank. One all-reduce of the (risks × groups) vector.
* FSDP2 (``"sharded"``): the risk is back-propagated through the sharded model, which
  reduce-scatters (averages) it; each rank dots the local shards of the two reduced gradients
  and the per-group partial sums are all-reduced once. Replicated dims count on one rank only.
* DeepSpeed ZeRO-3 (``"zero3"``): the same on DeepSpeed's fp32 gradient partitions, read and put
  back through its public ``safe_get_local_grad`` / ``safe_set_local_grad``
  (:mod:`fastgeffect.geffect.sharded`).

What is never done: dotting two unreduced per-rank gradients (Σ_r <a_r, g_r> is not the G-effect).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from .jsonfile import write_json
from .model_structure import find_block_list, is_deepspeed

try:  # DTensor: FSDP2 parameters and gradients
    from torch.distributed.tensor import DTensor, Replicate
except Exception:  # pragma: no cover - very old torch
    DTensor, Replicate = (), ()


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down once every rank is done (a rank that exits while a peer still
    talks to it can die in C++ teardown)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """Exit with ``code`` once every rank is done. A distributed process skips the interpreter's
    teardown after the group is torn down: there DeepSpeed's and gloo's C++ threads can abort a
    finished rank ("terminate called without an active exception", exit -6), which the launcher
    would report as a failed run."""
    several = is_distributed()
    shutdown()
    if several:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def _comm_device() -> torch.device:
    """Where collectives take their tensors: CUDA for NCCL, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a small tensor over ranks (one collective); the input is returned unchanged when alone."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(), torch.float64 if t.is_floating_point() else torch.int64).clone()
    dist.all_reduce(buf)
    return buf.to(t.device, t.dtype)


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when alone)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_dtensor(t) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def strategy(model: nn.Module) -> str:
    """``"none"`` (one process), ``"ddp"``, ``"fsdp2"`` (DTensor parameters) or ``"deepspeed"``."""
    if is_deepspeed(model):
        return "deepspeed"
    if any(is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return "fsdp1"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "ddp" if is_distributed() else "none"


def reduction_mode(model: nn.Module) -> str:
    """How :class:`~fastgeffect.GEffect` reduces: ``"none"``, ``"replicated"``, ``"sharded"`` or ``"zero3"``."""
    s = strategy(model)
    if s == "deepspeed":
        stage = model.zero_optimization_stage()
        if stage != 3:
            raise NotImplementedError(f"G-effects under DeepSpeed ZeRO stage {stage} are not supported: use "
                                      "ZeRO-3 (configs/accelerate/deepspeed_zero3.yaml), DDP or FSDP2")
        return "zero3"
    if s == "fsdp1":
        raise NotImplementedError("G-effects under FSDP1 flat parameters are not supported: use FSDP2 "
                                  "(fully_shard; accelerate fsdp_version: 2)")
    if s == "fsdp2":
        return "sharded"
    return "replicated" if s == "ddp" and is_distributed() else "none"


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor is returned as is)."""
    return t.to_local() if is_dtensor(t) else t


def counted_here(p: torch.Tensor) -> bool:
    """In sharded mode: whether this rank's local part of ``p`` enters the sum. Shards count on
    every rank; mesh dimensions along which ``p`` is replicated count on coordinate 0 only."""
    if not is_dtensor(p):
        return True
    coord = p.device_mesh.get_coordinate()
    if coord is None:  # this rank is outside the mesh
        return False
    return all(c == 0 for c, pl in zip(coord, p.placements) if isinstance(pl, Replicate))


def reshard(model: nn.Module) -> None:
    """After a forward with no backward (evaluation, logging) an FSDP2 root keeps its parameters
    unsharded, and ``model.parameters()`` then yields the unsharded ones: put the shards back."""
    if strategy(model) == "fsdp2" and hasattr(model, "reshard"):
        model.reshard()


def fully_shard_blocks(model: nn.Module) -> nn.Module:
    """FSDP2 (torch's ``fully_shard``, ZeRO-3 style): one unit per decoder block, then the root
    (embeddings, final norm, head). Shards in place; returns the model."""
    from torch.distributed.fsdp import fully_shard  # only under FSDP2: not imported with the package

    _, blocks = find_block_list(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def check_divisible(batch_size: int, world: int, grad_accum: int) -> None:
    """Each rank takes ``batch_size / (world * grad_accum)`` samples per micro-batch."""
    if batch_size % (world * grad_accum):
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size*grad_accum = "
                         f"{world}*{grad_accum} = {world * grad_accum}: every rank must take the same number "
                         "of samples per micro-batch (choose batch_size, --grad-accum or the number of processes "
                         "so that it divides)")


def write_json_main(path: Path, obj) -> None:
    """Atomic, strict JSON write (:func:`fastgeffect.jsonfile.write_json`) on the main process only."""
    if is_main():
        write_json(path, obj)


__all__ = ["is_distributed", "world_size", "rank", "is_main", "barrier", "all_reduce_sum", "all_gather_objects",
           "broadcast_object", "strategy", "reduction_mode", "local_part", "counted_here",
           "check_divisible", "write_json_main", "is_dtensor", "fully_shard_blocks", "reshard", "shutdown"]
