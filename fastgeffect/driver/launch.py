"""Launches on several processes: ``accelerate launch`` (DDP, FSDP2, DeepSpeed ZeRO-3) and
``torchrun`` (DDP, or FSDP2 with ``--fsdp2``). One process needs none of this: every function
here returns the single-process answer when ``WORLD_SIZE`` is 1."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from transformers.integrations import unset_hf_deepspeed_config

from .. import distributed as dist_
from ..model_structure import decoder_and_head


def make_accelerator() -> Optional[Accelerator]:
    """An ``accelerate.Accelerator`` when started by ``accelerate launch``/``torchrun`` with more than
    one process (None otherwise: the single-process path is unchanged)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401  (optional dependency: checked only when the launch asks for it)
        except ImportError as e:
            raise SystemExit("this launch uses DeepSpeed (configs/accelerate/deepspeed_zero3.yaml) but deepspeed is "
                             f"not installed ({e}); pip install deepspeed, or use configs/accelerate/fsdp.yaml") from e
    # DeepSpeed runs on CPU too (gloo); accelerate only selects it when not told cpu=True
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not deepspeed)
    if deepspeed:
        # accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says, which
        # makes every from_pretrained a collective (zero.Init); here the main process builds, loads and
        # evaluates models alone, so models are loaded whole and partitioned by accelerator.prepare
        unset_hf_deepspeed_config()
    return accelerator


def launch_strategy(accelerator: Optional[Accelerator], fsdp2: bool) -> str:
    """``none``, accelerate's distributed type (``multi_cpu``, ``multi_gpu``, ``fsdp``, ``deepspeed``), or
    ``fsdp2`` for ``--fsdp2`` under torchrun."""
    strategy = "none" if accelerator is None else str(accelerator.distributed_type).split(".")[-1].lower()
    if not fsdp2:
        return strategy
    if accelerator is None:
        raise SystemExit("--fsdp2 needs several processes: torchrun --nproc_per_node N -m fastgeffect.run ...")
    if strategy in ("fsdp", "deepspeed"):
        raise SystemExit(f"--fsdp2 with an accelerate {strategy} config: choose one way of sharding")
    return "fsdp2"


def launch_details(accelerator: Optional[Accelerator]) -> dict:
    """What else the manifest records of an accelerate launch: precision and the sharding stage."""
    if accelerator is None:
        return {}
    out = {"mixed_precision": str(accelerator.mixed_precision)}
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        out["zero_stage"] = plugin.zero_stage
    return out


def check_fused(choice: str) -> None:
    """``--fused on`` needs one process: the fused path calls the inner decoder directly, bypassing a
    DDP/FSDP wrapper's forward (checked before any work; :func:`use_fused` then turns auto off)."""
    if choice == "on" and dist_.world_size() > 1:
        raise SystemExit("--fused on is not available in multi-process runs (it bypasses the DDP/FSDP "
                         "wrapper's forward); use --fused off or auto")


def use_fused(choice: str, model: torch.nn.Module) -> bool:
    """Whether the fused LM-head losses run (``--fused auto|on|off``; ``on`` was checked by :func:`check_fused`)."""
    if dist_.world_size() > 1:
        return False
    if choice != "auto":
        return choice == "on"
    try:
        decoder_and_head(model)
    except (TypeError, NotImplementedError):
        return False
    return True


def whole_model(model: torch.nn.Module, load_original: Callable[[], torch.nn.Module], full_state: Callable,
                device) -> Optional[torch.nn.Module]:
    """The model with its current weights, whole, for evaluation and saving on the main process.

    One process: the trained model itself. Data parallel: every rank joins the gathering of the
    full (unsharded) state dict (``full_state``, a collective); the main process loads it into a
    fresh copy of the target on ``device`` and gets it, the others get None.
    """
    if not dist_.is_distributed():
        return model
    state = full_state(model)
    if not dist_.is_main():
        return None
    whole = load_original()
    whole.load_state_dict(state)
    return whole.to(device)
