"""``build_embedded``: data folder, tokenizer, target model and retain twin, cached on disk.

Layout under the cache dir (default ``~/.cache/fastgeffect`` or ``$FASTGEFFECT_CACHE``)::

    embedded/<data key>/base/            data/ (TOFU split files), tokenizer/, setup.json
    embedded/<data key>/target-<key>/    model, tokenizer, train_report.json
    embedded/<data key>/retain90-<key>/  the retain twin of forget10 (retain95/99 likewise)

Keys hash every config that shapes the artefact plus ``CODE_VERSION`` (bump it when a change
of code changes what is built). Each directory is written atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Union

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.qa import QADataset
from ..data.splits import add_holdout_files, add_subset_holdout, has_holdout, subset_tofu
from ..data.templates import Template, get_template
from ..data.tofu import RETAIN_OF, SPLIT_FIELDS, load_tofu_split
from ..losses.po import load_refusals
from .cache import cached_dir, config_hash, default_cache_dir
from .generator import GeneratorConfig, generate_holdout, write_embedded_data
from .target import ModelConfig, TrainConfig, train_and_save
from .tokenizer import TokenizerConfig, corpus_texts, train_tokenizer

CODE_VERSION = 3
TEMPLATE = "phi"
KNOWLEDGE_SPLITS = ("real_authors_perturbed", "world_facts_perturbed")
# answer accuracy / loss of every built model on these goes into its train_report.json
EVAL_SPLITS = ("forget01", "forget05", "forget10", "retain_perturbed")


@dataclass(frozen=True)
class EmbeddedConfig:
    generator: GeneratorConfig = GeneratorConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


SIZES: Dict[str, EmbeddedConfig] = {
    # ~1.2 M parameters, 400 QA rows of 40 authors + 60 knowledge rows; memorised in 20 epochs
    "default": EmbeddedConfig(GeneratorConfig(n_authors=40, questions_per_author=10, n_real_authors=30,
                                              n_world_facts=30),
                              TokenizerConfig(vocab_size=2048),
                              ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3),
                              TrainConfig(epochs=20, batch_size=32, lr=5e-3)),
    # for tests: seconds to build
    "tiny": EmbeddedConfig(GeneratorConfig(n_authors=12, questions_per_author=5, n_real_authors=8,
                                           n_world_facts=8),
                           TokenizerConfig(vocab_size=1024),
                           ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=3),
                           TrainConfig(epochs=30, batch_size=16, lr=5e-3, warmup_steps=10)),
}


@dataclass
class EmbeddedSetup:
    data_dir: Path            # TOFU-format folder: load_tofu_split(split, data_dir)
    tokenizer: PreTrainedTokenizerFast
    target_path: Path         # fine-tuned on full (+ knowledge sets)
    retain_path: Path         # fine-tuned on RETAIN_OF[forget_split] (+ knowledge sets)
    template: Template
    max_length: int           # fits every question/answer variant of the data
    forget_split: str
    reports: Dict[str, dict] = field(default_factory=dict)  # train_report.json of target / retain

    def load_target(self) -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(self.target_path).eval()

    def load_retain(self) -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(self.retain_path).eval()


@contextlib.contextmanager
def _torch_threads(n: Optional[int]) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def folder_digest(folder: Path) -> str:
    """Hash of a TOFU folder's split and refusal files (their bytes), for the cache key of a subset."""
    h = hashlib.sha256()
    for name in sorted(f"{s}.json" for s in SPLIT_FIELDS) + ["idontknow.jsonl"]:
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def needed_length(tokenizer, data_dir: Path, template: Template) -> int:
    """Smallest ``max_length`` (a multiple of 8) that holds every (paraphrased) question with every
    answer variant of every split or a refusal, plus the label EOS: nothing is ever truncated."""
    refusals = load_refusals() + (load_refusals(data_dir / "idontknow.jsonl")
                                  if (data_dir / "idontknow.jsonl").is_file() else [])
    longest_q = 0
    longest_a = max(len(tokenizer(" " + a)["input_ids"]) for a in refusals)
    for split in SPLIT_FIELDS:
        for row in load_tofu_split(split, data_dir):
            for q in (row["question"], row.get("paraphrased_question", row["question"])):
                longest_q = max(longest_q, len(tokenizer(template.prompt(q) + template.answer_start)["input_ids"]))
            answers = [row["answer"], row.get("paraphrased_answer", row["answer"]), *row.get("perturbed_answer", [])]
            longest_a = max(longest_a, max(len(tokenizer(" " + a)["input_ids"]) for a in answers))
    # a prompt and an answer tokenised apart can merge at the seam: +1 covers it, +1 the EOS
    return -(-(longest_q + longest_a + 2) // 8) * 8


def _build_base(tmp: Path, cfg: EmbeddedConfig, tofu_dir: Optional[Path], n_authors: Optional[int]) -> None:
    if tofu_dir is None:
        write_embedded_data(tmp / "data", cfg.generator)
    else:
        subset_tofu(tofu_dir, tmp / "data", n_authors)
    tokenizer = train_tokenizer(corpus_texts(tmp / "data"), cfg.tokenizer)
    tokenizer.save_pretrained(tmp / "tokenizer")
    max_length = needed_length(tokenizer, tmp / "data", get_template(TEMPLATE))
    (tmp / "setup.json").write_text(json.dumps({"max_length": max_length, "template": TEMPLATE}))


def _add_holdout(data_dir: Path, cfg: EmbeddedConfig, tofu_dir: Optional[Path], n_authors: Optional[int]) -> None:
    """A base cached before the data had holdout files gets them, the bytes a fresh build writes: the
    tokenizer and the models never see them (nor ``needed_length``, nor the keys), so nothing
    already built changes or is rebuilt."""
    if has_holdout(data_dir):
        return
    if tofu_dir is None:
        add_holdout_files(data_dir, generate_holdout(cfg.generator), cfg.generator.n_authors)
    else:
        add_subset_holdout(data_dir, tofu_dir, n_authors)


def _qa(rows, tokenizer, max_length) -> QADataset:
    return QADataset(rows, tokenizer, get_template(TEMPLATE), max_length)


def build_embedded(cache_dir: Optional[Union[str, Path]] = None, size: str = "default", seed: int = 0, *,
                   forget_split: str = "forget10", tofu_dir: Optional[Union[str, Path]] = None,
                   n_authors: Optional[int] = None, config: Optional[EmbeddedConfig] = None,
                   num_threads: Optional[int] = 1) -> EmbeddedSetup:
    """Build (or reuse from the cache) the offline default: data, tokenizer, target, retain twin.

    ``tofu_dir`` + ``n_authors``: use real TOFU text restricted to ``n_authors`` authors instead
    of generated authors (same layout, same models). ``config`` overrides the ``size`` preset;
    ``seed`` seeds the generator and the training. ``num_threads`` is the torch thread count
    while training (1 by default: on a small shared CPU two OpenMP threads were measured up to
    10x slower per step than one for models of this size).
    """
    if size not in SIZES and config is None:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    if forget_split not in RETAIN_OF:
        raise ValueError(f"unknown forget split {forget_split!r}; valid: {', '.join(sorted(RETAIN_OF))}")
    if (tofu_dir is None) != (n_authors is None):
        raise ValueError("tofu_dir and n_authors go together (real TOFU restricted to n_authors authors)")
    cfg = config or SIZES[size]
    cfg = replace(cfg, generator=replace(cfg.generator, seed=seed), train=replace(cfg.train, seed=seed))
    if tofu_dir is not None:
        tofu_dir = Path(tofu_dir)
        source = {"tofu": folder_digest(tofu_dir), "n_authors": n_authors}
    else:
        source = {"generator": cfg.generator.to_dict()}
    data_key = config_hash({"version": CODE_VERSION, "source": source, "tokenizer": cfg.tokenizer.to_dict()})
    root = Path(cache_dir or default_cache_dir()) / "embedded" / data_key
    base = cached_dir(root / "base", lambda tmp: _build_base(tmp, cfg, tofu_dir, n_authors))
    data_dir = base / "data"
    _add_holdout(data_dir, cfg, tofu_dir, n_authors)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base / "tokenizer")
    max_length = json.loads((base / "setup.json").read_text())["max_length"]
    model_key = config_hash({"version": CODE_VERSION, "data": data_key, "model": cfg.model.to_dict(),
                             "train": cfg.train.to_dict(), "max_length": max_length})
    knowledge = [r for s in KNOWLEDGE_SPLITS for r in load_tofu_split(s, data_dir)]

    def train(tmp: Path, split: str) -> None:
        rows = load_tofu_split(split, data_dir)
        eval_sets = {s: _qa(load_tofu_split(s, data_dir), tokenizer, max_length) for s in EVAL_SPLITS}
        eval_sets["knowledge"] = _qa(knowledge, tokenizer, max_length)
        with _torch_threads(num_threads):
            train_and_save(tmp, tokenizer, _qa(rows + knowledge, tokenizer, max_length), cfg.model, cfg.train,
                           eval_sets, meta={"trained_on": [split, *KNOWLEDGE_SPLITS], "cache_key": model_key})

    retain_split = RETAIN_OF[forget_split]
    target = cached_dir(root / f"target-{model_key}", lambda tmp: train(tmp, "full"))
    retain = cached_dir(root / f"{retain_split}-{model_key}", lambda tmp: train(tmp, retain_split))
    reports = {name: json.loads((p / "train_report.json").read_text()) for name, p in (("target", target),
                                                                                          ("retain", retain))}
    return EmbeddedSetup(data_dir, tokenizer, target, retain, get_template(TEMPLATE), max_length, forget_split,
                         reports)
