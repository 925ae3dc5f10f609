"""A plain HF ``Trainer`` whose loss is GA, on the rows of one forget batch, for the G-effect
callback tests (one process, and 2 gloo processes under torchrun: tests/helpers/hf_callback_ddp.py)."""
import torch
from transformers import Trainer, TrainingArguments

from fastgeffect.losses import ga

from .tiny_models import qa_batch

FORGET = {k: v for k, v in qa_batch(1, b=4, t=10).items() if k != "index"}
RETAIN = {k: v for k, v in qa_batch(2, b=3, t=10).items() if k != "index"}


class Rows(torch.utils.data.Dataset):
    """The forget batch's rows: when a step takes all 4 (2 per micro-batch with accumulation 2, or
    1 per micro-batch on each of 2 ranks), its accumulated GA gradient is that of the whole batch."""

    def __len__(self):
        return FORGET["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in FORGET.items()}


class GATrainer(Trainer):
    """A plain Trainer whose loss is GA, normalised by the tokens of the whole accumulated step of
    all ranks; times the number of ranks, as HF's own ``compute_loss`` does, since DDP averages."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = ga(out.logits, inputs["labels"], num_items_in_batch=num_items_in_batch) * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss


def ga_trainer(out_dir, model, lr, per_device=2, max_grad_norm=0.0, report_to=(), logging_steps=1, callbacks=None,
               **extra) -> GATrainer:
    """3 steps of SGD with accumulation 2 over :class:`Rows`, logging every ``logging_steps``."""
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=2, max_steps=3, learning_rate=lr, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=max_grad_norm, report_to=list(report_to),
                             logging_steps=logging_steps, save_strategy="no", use_cpu=True, seed=0, **extra)
    return GATrainer(model=model, args=args, train_dataset=Rows(), callbacks=callbacks)
