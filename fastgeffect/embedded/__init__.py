"""The offline default (docs/design.md §6): generated fictitious authors in TOFU's schema, a tokenizer
trained on them, and a tiny target model plus its retain-only twin, cached on disk."""
from .build import CODE_VERSION, SIZES, EmbeddedConfig, EmbeddedSetup, build_embedded, needed_length
from .cache import atomic_dir, cached_dir, default_cache_dir
from .generator import FAMILIES, GeneratorConfig, generate, write_embedded_data
from .target import ModelConfig, TrainConfig, answer_stats, make_model, train_lm
from .tokenizer import TokenizerConfig, corpus_texts, train_tokenizer

__all__ = [
    "CODE_VERSION", "SIZES", "EmbeddedConfig", "EmbeddedSetup", "build_embedded", "needed_length",
    "atomic_dir", "cached_dir", "default_cache_dir", "FAMILIES", "GeneratorConfig", "generate",
    "write_embedded_data", "ModelConfig", "TrainConfig", "answer_stats", "make_model", "train_lm",
    "TokenizerConfig", "corpus_texts", "train_tokenizer",
]
