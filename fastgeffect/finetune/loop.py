"""The fine-tuning loop: answer-only NLL, exact gradient accumulation, warm-up then linear decay,
resumable from a state saved atomically at epoch ends, every ``save_every`` steps and on stop
(a full model's state is large: ~12 bytes per parameter, 1.6 GB for 135 M).

The state holds the trainable parameters only (LoRA: the adapters), the optimiser, the scheduler
and the position; the step order is a pure function of (seed, epoch) (:mod:`..training.plan`), so
a resumed run takes the same batches as an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import run_files as files
from ..data.collate import collate_qa
from ..data.qa import QADataset
from ..jsonl import JsonlAppender, truncate_jsonl
from ..losses import nll
from ..training.backend import STATE_FILE, frozen_weights_digest, read_state, write_state
from ..training.batches import n_tokens
from ..training.plan import plan_step, steps_per_epoch, warmup_linear
from .recipe import Recipe

LOG_FILE = files.TRAIN_LOG


class Stopped(Exception):
    """The loop stopped at ``--stop-after`` with its state saved; ``--resume`` continues."""


def total_steps(n_samples: int, recipe: Recipe) -> int:
    full = steps_per_epoch(n_samples, recipe.batch_size) * recipe.epochs
    return full if recipe.max_steps is None else min(full, recipe.max_steps)


def _trainable(model: torch.nn.Module) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    # as Hugging Face's Trainer (TOFU's): no weight decay on biases and norm weights
    params = list(_trainable(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=recipe.lr)


def resume_state(state_path: Path, model: torch.nn.Module, opt, scheduler, recipe: Recipe,
                 frozen: Optional[str]) -> Tuple[int, float]:
    """Load the saved state into the model, optimiser and scheduler, after checking it was saved
    by this recipe over these frozen weights and parameters; the step it was saved at and the
    training seconds up to it (0 for a state of an older version, which did not record them)."""
    state = read_state(state_path, deepspeed=False)
    if state["recipe"] != recipe.to_dict():
        raise ValueError(f"{state_path} was saved with another recipe ({state['recipe']}); start a new --out")
    if state.get("frozen_digest") != frozen:
        raise ValueError(f"{state_path} was saved over other frozen (base) weights than this model's; resume "
                         "with the same --model, or start a new --out")
    params = _trainable(model)
    if set(state["model"]) != set(params):
        raise ValueError(f"{state_path} holds other parameters than this model's trainable ones "
                         "(another model or --lora); start a new --out")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["model"][name])
    opt.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], float(state.get("seconds", 0.0))


def train(model: torch.nn.Module, dataset: QADataset, recipe: Recipe, work_dir: Path, *,
          stop_after: Optional[int] = None, progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on ``dataset``; continues from ``work_dir``'s state when there is
    one. Returns ``{"steps", "seconds", "final_loss"}``; raises :class:`Stopped` at ``stop_after``."""
    recipe.check()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    per_epoch = steps_per_epoch(n, recipe.batch_size)
    total = total_steps(n, recipe)
    opt = _optimizer(model, recipe)
    warmup = max(1, round(recipe.warmup_epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(per_epoch * recipe.epochs, warmup))
    state_path = work_dir / STATE_FILE
    # LoRA: the frozen base is not in the state, only its digest (a resume must start from the same base)
    frozen = frozen_weights_digest(model) if any(not p.requires_grad for p in model.parameters()) else None
    step, seconds_before = resume_state(state_path, model, opt, scheduler, recipe, frozen) \
        if state_path.exists() else (0, 0.0)
    saved = step
    truncate_jsonl(work_dir / LOG_FILE, step)

    def save() -> None:
        nonlocal saved
        saved = step
        write_state(state_path, {"recipe": recipe.to_dict(), "step": step, "optimizer": opt.state_dict(),
                                 "scheduler": scheduler.state_dict(), "frozen_digest": frozen,
                                 "seconds": seconds_before + time.perf_counter() - t0,
                                 "model": {k: v.detach().cpu() for k, v in _trainable(model).items()}})

    t0, loss_value = time.perf_counter(), None
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(total=total, initial=step, desc="fine-tune", unit="step", disable=not progress)
    with JsonlAppender(work_dir / LOG_FILE) as log:
        while step < total:
            if stop_after is not None and step >= stop_after:
                if saved != step:
                    save()
                bar.close()
                raise Stopped(f"stopped after step {step} (state saved in {work_dir}); continue with --resume")
            epoch, batch = divmod(step, per_epoch)
            plan = plan_step(n, recipe.batch_size, recipe.grad_accum, 1, 0, recipe.seed, epoch, batch)
            items = [[dataset[i] for i in chunk] for chunk in plan.chunks]
            tokens = max(1, n_tokens([it for chunk in items for it in chunk]))  # the step's answer tokens
            opt.zero_grad(set_to_none=True)
            loss_value = 0.0
            for chunk in items:
                b = {k: v.to(device) for k, v in collate_qa(chunk).items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = nll(logits, b["labels"], num_items_in_batch=tokens)  # token mean over the whole step
                loss.backward()
                loss_value += float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step}: the loss is {loss_value}; lower --lr")
            norm = torch.nn.utils.clip_grad_norm_(list(_trainable(model).values()),
                                                  recipe.max_grad_norm if recipe.max_grad_norm > 0 else math.inf)
            if not math.isfinite(float(norm)):  # refused before the step: the weights stay finite
                raise FloatingPointError(f"step {step}: the gradient norm is {float(norm)}; lower --lr")
            opt.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            log.append([{"step": step, "epoch": epoch, "loss": loss_value, "grad_norm": float(norm), "lr": lr}])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            # not at the last step: the caller writes the model next (an interruption there redoes the last steps)
            if step < total and (step % per_epoch == 0 or (recipe.save_every and step % recipe.save_every == 0)):
                save()
    bar.close()
    model.eval()
    # every invocation's training time up to its last saved state, and this one's whole
    return {"steps": step, "seconds": round(seconds_before + time.perf_counter() - t0, 2), "final_loss": loss_value}
