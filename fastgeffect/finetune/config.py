"""Every setting of ``python -m fastgeffect.finetune``, stated once: :class:`FinetuneConfig`, from
which its command line is generated (:mod:`fastgeffect.dataclass_cli`). The recipe's fields take
their defaults, help and bounds from :class:`.recipe.Recipe`, the loop's settings."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional, Sequence

from ..cli_help import HelpFormatter
from ..data.templates import TEMPLATES
from ..data.tofu import RETAIN_OF
from ..dataclass_cli import Parser, add_arguments, like, setting
from .recipe import DEFAULT_LR, FAMILY_LR, LORA_LR, Recipe

PROG = "python -m fastgeffect.finetune"
TARGET_SPLITS = ("full", "retain90", "retain95", "retain99")
RECIPE, RUNNING = "recipe (TOFU's defaults)", "running"


def _rate(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def recipe_field(name: str, **changes):
    """A recipe field as :class:`Recipe` states it, listed under the recipe group."""
    return like(Recipe, name, **{"group": RECIPE, **changes})


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = setting(help="hub name, local Hugging Face folder, .gguf file, or alias (smollm2-135m)", path=True)
    data_dir: str = setting(help="a folder of TOFU JSON-lines files", path=True)
    out: str = setting(help="output folder (see the layout above)", path=True)
    split: str = setting("full", "the target's training split", choices=TARGET_SPLITS)
    authors: Optional[int] = setting(None, "train on N TOFU authors (TOFU's proportions, as the driver's --authors)",
                                     low=1)
    forget_split: str = setting("forget10", "the forget split whose retain split the twin learns (default forget10 "
                                            "-> retain90)", choices=sorted(RETAIN_OF))
    retain_twin: bool = setting(False, "also train the retain-only twin and write its eval_log_forget.json")
    lora: int = like(Recipe, "lora")
    template: Optional[str] = setting(None, "prompt format (default: chat when the tokenizer has a chat template, "
                                            "else phi)", choices=sorted(TEMPLATES))
    epochs: int = recipe_field("epochs")
    lr: Optional[float] = recipe_field(
        "lr", default=None, help=f"default: {_rate(FAMILY_LR['llama'])} Llama, {_rate(FAMILY_LR['phi'])} Phi, "
                                 f"{_rate(DEFAULT_LR)} other families; {_rate(LORA_LR)} with --lora")
    weight_decay: float = recipe_field("weight_decay")
    batch_size: int = recipe_field("batch_size")
    grad_accum: int = recipe_field("grad_accum")
    warmup_epochs: float = recipe_field("warmup_epochs")
    max_grad_norm: float = recipe_field("max_grad_norm")
    max_length: int = recipe_field("max_length")
    max_steps: Optional[int] = recipe_field("max_steps")
    seed: int = recipe_field("seed")
    resume: bool = setting(False, "continue an interrupted run in --out", group=RUNNING)
    overwrite: bool = setting(False, "start again in --out: replace the fine-tune it holds (failed, interrupted or "
                                     "done; a folder that holds no fine-tune is never replaced)", group=RUNNING)
    save_every: int = recipe_field("save_every", group=RUNNING)
    stop_after: Optional[int] = setting(None, "stop after N steps of a model, as if interrupted: state saved, exit "
                                              "status 3 (see --resume)", group=RUNNING, low=0)
    eval_size: int = setting(300, "forget rows in the twin's log (TOFU's ds_size)", group=RUNNING, low=1)
    eval_batch_size: int = setting(8, "sequences per evaluation batch", group=RUNNING, low=1)
    bf16: bool = setting(False, "load and train in bfloat16", group=RUNNING)
    device: Optional[str] = setting(None, "default: cuda when available, else cpu", group=RUNNING)
    cache_dir: Optional[str] = setting(None, "where GGUF models are converted (default: $FASTGEFFECT_CACHE)",
                                       group=RUNNING, path=True)
    no_progress: bool = setting(False, "no progress bars", group=RUNNING)

    def recipe(self, lr: float) -> Recipe:
        """The loop's settings, at learning rate ``lr`` (``--lr``, or the model family's)."""
        return Recipe(lr=lr, **{f.name: getattr(self, f.name) for f in fields(Recipe) if f.name != "lr"})


def build_parser(doc: str = "") -> argparse.ArgumentParser:
    return add_arguments(Parser(prog=PROG, description=doc, formatter_class=HelpFormatter), FinetuneConfig)


def parse_args(argv: Optional[Sequence[str]] = None, doc: str = "") -> FinetuneConfig:
    return FinetuneConfig(**vars(build_parser(doc).parse_args(argv)))
