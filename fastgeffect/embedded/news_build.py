"""``build_embedded_news``: the offline MUSE-style default — a generated MUSE folder, a tokenizer, a
tiny target trained on forget + retain articles and its retrained twin (retain articles only),
cached on disk like :func:`.build.build_embedded`.

Layout under the cache dir::

    embedded-news/<data key>/base/            data/ (a MUSE folder), tokenizer/, setup.json
    embedded-news/<data key>/target-<key>/    model, tokenizer, train_report.json
    embedded-news/<data key>/retrain-<key>/   the twin trained without the forget articles

Both models learn raw text: every token of an article is a label, in windows of ``max_length``
tokens ``stride`` apart (:class:`..data.raw_text.TextWindowDataset`); a window holds a whole
article here, so training sees each article once per epoch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Union

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.muse import load_muse
from ..data.raw_text import TextWindowDataset
from .build import _torch_threads
from .cache import cached_dir, config_hash, default_cache_dir
from .news_generator import NewsConfig, write_news_folder
from .target import ModelConfig, TrainConfig, train_and_save
from .tokenizer import TokenizerConfig, train_tokenizer

CODE_VERSION = 1
TARGET_SPLITS = ("forget", "retain1", "retain2")  # what the target learns; the twin all but forget


@dataclass(frozen=True)
class NewsEmbeddedConfig:
    news: NewsConfig = NewsConfig()
    tokenizer: TokenizerConfig = TokenizerConfig(vocab_size=1024)
    model: ModelConfig = ModelConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3)
    train: TrainConfig = TrainConfig(epochs=30, batch_size=16, lr=5e-3, warmup_steps=10)


NEWS_SIZES: Dict[str, NewsEmbeddedConfig] = {
    "default": NewsEmbeddedConfig(),
    # for tests: seconds to build
    "tiny": NewsEmbeddedConfig(NewsConfig(n_forget=6, n_retain1=6, n_retain2=6, n_holdout=6, n_icl=2),
                               TokenizerConfig(vocab_size=512),
                               ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2),
                               TrainConfig(epochs=40, batch_size=8, lr=5e-3, warmup_steps=5)),
}


@dataclass
class NewsSetup:
    data_dir: Path                 # a MUSE folder: load_muse(data_dir)
    tokenizer: PreTrainedTokenizerFast
    target_path: Path              # trained on forget + retain1 + retain2
    retain_path: Path              # the retrained twin: retain1 + retain2
    max_length: int                # a window: holds the longest article
    stride: int
    reports: Dict[str, dict] = field(default_factory=dict)

    def load_target(self) -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(self.target_path).eval()

    def load_retain(self) -> LlamaForCausalLM:
        return LlamaForCausalLM.from_pretrained(self.retain_path).eval()


def _build_base(tmp: Path, cfg: NewsEmbeddedConfig) -> None:
    write_news_folder(tmp / "data", cfg.news)
    data = load_muse(tmp / "data")
    texts = [t for split in data.raw.values() for t in split]
    tokenizer = train_tokenizer(texts, cfg.tokenizer)
    tokenizer.save_pretrained(tmp / "tokenizer")
    longest = max(len(tokenizer(t)["input_ids"]) for t in texts)
    max_length = -(-(longest + 1) // 8) * 8  # + BOS, a multiple of 8: one window per article
    # a window holds BOS + max_length - 1 text tokens; windows that far apart never overlap
    (tmp / "setup.json").write_text(json.dumps({"max_length": max_length, "stride": max_length - 1}))


def build_embedded_news(cache_dir: Optional[Union[str, Path]] = None, size: str = "default", seed: int = 0, *,
                        config: Optional[NewsEmbeddedConfig] = None, num_threads: Optional[int] = 1) -> NewsSetup:
    """Build (or reuse from the cache) the offline MUSE-style default: data, tokenizer, target, twin.
    ``seed`` seeds the generator and the training; ``config`` overrides the ``size`` preset."""
    if size not in NEWS_SIZES and config is None:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(NEWS_SIZES)}")
    cfg = config or NEWS_SIZES[size]
    cfg = replace(cfg, news=replace(cfg.news, seed=seed), train=replace(cfg.train, seed=seed))
    data_key = config_hash({"version": CODE_VERSION, "news": cfg.news.to_dict(), "tokenizer": cfg.tokenizer.to_dict()})
    root = Path(cache_dir or default_cache_dir()) / "embedded-news" / data_key
    base = cached_dir(root / "base", lambda tmp: _build_base(tmp, cfg))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base / "tokenizer")
    setup = json.loads((base / "setup.json").read_text())
    max_length, stride = setup["max_length"], setup["stride"]
    data = load_muse(base / "data")
    model_key = config_hash({"version": CODE_VERSION, "data": data_key, "model": cfg.model.to_dict(),
                             "train": cfg.train.to_dict(), "max_length": max_length, "stride": stride})

    def windows(splits) -> TextWindowDataset:
        return TextWindowDataset([t for s in splits for t in data.raw[s]], tokenizer, max_length, stride)

    def train(tmp: Path, splits) -> None:
        eval_sets = {s: windows([s]) for s in ("forget", "retain2", "holdout")}
        with _torch_threads(num_threads):
            train_and_save(tmp, tokenizer, windows(splits), cfg.model, cfg.train, eval_sets,
                           meta={"trained_on": list(splits), "cache_key": model_key})

    target = cached_dir(root / f"target-{model_key}", lambda tmp: train(tmp, TARGET_SPLITS))
    retain = cached_dir(root / f"retrain-{model_key}", lambda tmp: train(tmp, TARGET_SPLITS[1:]))
    reports = {name: json.loads((p / "train_report.json").read_text()) for name, p in (("target", target),
                                                                                          ("retain", retain))}
    return NewsSetup(base / "data", tokenizer, target, retain, max_length, stride, reports)
