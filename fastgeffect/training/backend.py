"""The engine-specific parts of a step, and the resumable state, behind one object per engine.

* :class:`PlainBackend`: torch's own backward, clipping and AdamW step; one process, or a DDP /
  FSDP2 model under ``torchrun``.
* :class:`AccelerateBackend`: the same through an ``accelerate`` accelerator (DDP / FSDP2 wrapping
  by ``accelerate launch``).
* :class:`DeepSpeedBackend`: the DeepSpeed engine runs the backward passes and the step (clipping at
  its ``gradient_clipping``); its sharded checkpoint (fp32 master weights, optimiser) lies in
  ``deepspeed_state/<tag>`` next to ``state.pt``.

``state.pt`` is the resumable state: the loop's ``meta`` (scheduler, step, position in the epoch)
plus the model and optimiser (or the DeepSpeed tag). It is replaced atomically, only once
everything it points to is written, so an interruption always leaves the last whole state.
Frozen parameters (LoRA's base model) are not in it, only their digest: a resume reloads them from
``--model`` and refuses when they are not the weights the state was saved over.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Protocol

import torch
from torch import nn

from .. import distributed as dist_
from .. import run_files as files
from ..atomic_file import atomic_write
from ..model_structure import is_deepspeed, unwrap

STATE_FILE = files.STATE
DEEPSPEED_DIR = "deepspeed_state"


class StateNotSaved(OSError):
    """The resumable state could not be written (a full disk, a read-only folder); the previous one is intact."""


class Backend(Protocol):
    model: nn.Module

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor, sync: bool) -> None: ...

    def clip_and_step(self, max_grad_norm: float) -> float: ...

    def save(self, path: Path, meta: dict) -> None: ...

    def load(self, path: Path) -> dict: ...


def make_backend(model: nn.Module, adamw: torch.optim.Optimizer, accelerator=None, *,
                 micro_batch: int, max_grad_norm: float) -> Backend:
    """Prepares ``model`` and ``adamw`` with ``accelerator`` when given (``micro_batch``: samples per
    rank and micro-batch) and returns the backend of the resulting engine."""
    optimizer = adamw
    if accelerator is not None:  # DDP / FSDP2 / DeepSpeed wrapping by accelerate; our own exact accumulation
        if accelerator.state.deepspeed_plugin is not None:
            configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, micro_batch, max_grad_norm)
        model, optimizer = accelerator.prepare(model, adamw)
    # the optimiser's own parameters (under FSDP2 the module may expose unsharded ones)
    params = [p for group in adamw.param_groups for p in group["params"]]
    if is_deepspeed(model):
        return DeepSpeedBackend(model)
    if accelerator is not None:
        return AccelerateBackend(model, optimizer, params, accelerator)
    return PlainBackend(model, optimizer, params)


def configure_deepspeed(ds_config: dict, micro_batch: int, max_grad_norm: float) -> None:
    """Our step is one ``engine.step()`` after all micro-batch backwards (DeepSpeed must not divide
    the loss or skip steps for its own accumulation), clipped at ``max_grad_norm``."""
    ds_config.update(train_micro_batch_size_per_gpu=micro_batch, train_batch_size=micro_batch * dist_.world_size(),
                     gradient_accumulation_steps=1, gradient_clipping=max_grad_norm)
    ds_config.setdefault("steps_per_print", 1 << 30)


class PlainBackend:
    def __init__(self, model: nn.Module, optimizer, params: List[torch.Tensor]):
        self.model, self.optimizer, self.params = model, optimizer, params
        self._frozen_digest: Optional[str] = None  # frozen weights never change: hashed once

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """``sync=False``: a DDP model accumulates without its all-reduce (the rank's last micro-batch syncs)."""
        no_sync = not sync and isinstance(self.model, nn.parallel.DistributedDataParallel)
        with (self.model.no_sync() if no_sync else contextlib.nullcontext()):
            self._backward(loss)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip(self, max_grad_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)

    def clip_and_step(self, max_grad_norm: float) -> float:
        """Clip to ``max_grad_norm`` (0: no clipping, as in Hugging Face's Trainer and DeepSpeed) and step;
        the gradient norm before clipping."""
        grad_norm = self._clip(max_grad_norm if max_grad_norm > 0 else math.inf)  # inf: the norm, unclipped
        if dist_.is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        norm = float(grad_norm)  # the global norm: every rank refuses alike
        if not math.isfinite(norm):
            raise FloatingPointError(f"the objective's gradient norm is {norm}: the optimiser step is not taken")
        self.optimizer.step()
        return norm

    def save(self, path: Path, meta: dict) -> None:
        if dist_.is_distributed():  # a collective: the whole model and optimiser state on every rank
            # torch.distributed.checkpoint is only needed (and imported) under data parallel
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            model_state, optim_state = get_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            model_state, optim_state = self.model.state_dict(), self.optimizer.state_dict()
            frozen = frozen_names(self.model)
            if frozen:  # LoRA: the base weights come from --model again; only their digest is kept
                model_state = {k: v for k, v in model_state.items() if k not in frozen}
                meta = {**meta, "frozen_digest": self.frozen_digest()}
        if dist_.is_main():
            write_state(path, {**meta, "model": model_state, "optimizer": optim_state})
        dist_.barrier()

    def frozen_digest(self) -> str:
        if self._frozen_digest is None:
            self._frozen_digest = frozen_weights_digest(self.model)
        return self._frozen_digest

    def load(self, path: Path) -> dict:
        state = read_state(path, deepspeed=False)
        if dist_.is_distributed():
            # torch.distributed.checkpoint is only needed (and imported) under data parallel
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            frozen = frozen_names(self.model)
            if "frozen_digest" in state:
                if state["frozen_digest"] != self.frozen_digest():
                    raise RuntimeError(f"{path} was saved over other frozen (base) weights than the model loaded now "
                                       "has: resume with the same --model (and the same --lora)")
                missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
                if unexpected or set(missing) != frozen:
                    raise RuntimeError(f"{path} does not fit this model's trainable parameters (missing "
                                       f"{sorted(set(missing) - frozen)[:3]}, unexpected {unexpected[:3]}): resume "
                                       "with the same --model and --lora")
            else:
                self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        return state


class AccelerateBackend(PlainBackend):
    def __init__(self, model: nn.Module, optimizer, params: List[torch.Tensor], accelerator):
        super().__init__(model, optimizer, params)
        self.accelerator = accelerator

    def _backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def _clip(self, max_grad_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(self.params, max_grad_norm)


class DeepSpeedBackend:
    def __init__(self, engine: nn.Module):
        self.model = engine
        self.tag: Optional[str] = None  # the checkpoint state.pt points to

    def zero_grad(self) -> None:
        self.model.optimizer.zero_grad()  # accelerate's optimiser wrapper leaves this to the engine

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """The engine reduces its gradient partitions itself (``sync`` does not apply)."""
        self.model.backward(loss, scale_wrt_gas=False)  # our losses already carry the global divisors

    def clip_and_step(self, max_grad_norm: float) -> float:
        """The engine clips (at ``gradient_clipping`` = ``max_grad_norm``), steps and zeroes its partitions."""
        self.model.step()
        return float(self.model.get_global_grad_norm())

    def save(self, path: Path, meta: dict) -> None:
        tag = f"step{meta['step']}-epoch{meta['epoch']}-batch{meta['batch_in_epoch']}"
        if tag == self.tag:  # saved again at the place just loaded: never overwrite what state.pt points to
            tag += "-again"
        folder = path.parent / DEEPSPEED_DIR
        self.model.save_checkpoint(str(folder), tag=tag, save_latest=False)
        if dist_.is_main():
            write_state(path, {**meta, "deepspeed_tag": tag})
            for old in folder.iterdir():  # older checkpoints are no longer referenced
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old)
        self.tag = tag
        dist_.barrier()

    def load(self, path: Path) -> dict:
        state = read_state(path, deepspeed=True)
        self.model.load_checkpoint(str(path.parent / DEEPSPEED_DIR), tag=state["deepspeed_tag"],
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        self.tag = state["deepspeed_tag"]
        return state


def frozen_names(model: nn.Module) -> set:
    """The state-dict names of ``model``'s frozen parameters (every name of a tied one)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def frozen_weights_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model``'s frozen parameters."""
    h = hashlib.sha256()
    seen: Dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            continue
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        if p.data_ptr() in seen:  # a tied weight: its bytes once, its other name as a link
            h.update(seen[p.data_ptr()].encode())
            continue
        seen[p.data_ptr()] = name
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_state(path: Path, state: dict) -> None:
    """``torch.save`` of the resumable state, replacing ``path`` atomically
    (:func:`~fastgeffect.atomic_file.atomic_write`): an interruption never leaves a half-written state."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError ("enforce fail")
        raise StateNotSaved(f"could not write the resumable state {path} ({type(e).__name__}: {e}); the previous "
                            f"state there is intact: free space or make {path.parent} writable, then continue with "
                            f"--resume --out {path.parent}") from e


write_atomic = write_state  # its former name


def read_state(path: Path, deepspeed: bool) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)  # the loaders move it
    if ("deepspeed_tag" in state) != deepspeed:
        raise RuntimeError(f"{path} was written by a run {'with' if 'deepspeed_tag' in state else 'without'} "
                           "DeepSpeed; resume it with the same kind of launch")
    return state


def full_model_state(model: nn.Module) -> dict:
    """The whole (unsharded, CPU) model state dict; a collective under data parallel, where only the
    main process gets the tensors (the others get an empty dict)."""
    if not dist_.is_distributed():
        return unwrap(model).state_dict()
    if is_deepspeed(model):
        return _gather_zero3_state(model.module)
    # torch.distributed.checkpoint is only needed (and imported) under data parallel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gather_zero3_state(module: nn.Module) -> dict:
    """ZeRO-3 parameters gathered one at a time (never the whole model at once on any rank)."""
    import deepspeed  # optional: only DeepSpeed launches need it

    out, main = {}, dist_.is_main()
    for name, t in module.state_dict(keep_vars=True).items():  # tied weights: one tensor, two names
        if isinstance(t, torch.nn.Parameter) and hasattr(t, "ds_id"):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if main:
                    out[name] = t.detach().to("cpu", copy=True)
        elif main:
            out[name] = t.detach().to("cpu", copy=True)
    return out
