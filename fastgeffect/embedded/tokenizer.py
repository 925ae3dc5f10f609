"""A small byte-level BPE tokenizer trained on a TOFU-format folder with the ``tokenizers`` library.

Byte level: any text (refusals, generated answers, real TOFU text) encodes without unknown
tokens and decodes back exactly, which the ROUGE and PS evaluations rely on. Like Phi-1.5's
tokenizer it adds no BOS by itself; EOS ends every TOFU label sequence.

Words and punctuation runs carry their FOLLOWING space (GPT-2 attaches the preceding one), so
a prompt ending in a space ("Answer: ") tokenises to a prefix of prompt + answer: greedy
generation from the prompt then continues exactly as in training, with no lone-space token
the tiny model has never seen.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Union

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..data.templates import TEMPLATES
from ..data.tofu import HOLDOUT_OF
from ..jsonl import read_jsonl
from ..losses.po import load_refusals

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# a word (letters, digits, apostrophes) or a punctuation run, with one trailing space; or spaces
PRE_TOKEN = r"[\p{L}\p{N}']+ ?|[^\p{L}\p{N}'\s]+ ?|\s+"


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 2048
    min_frequency: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_texts(data_dir: Union[str, Path]) -> List[str]:
    """Every string of every split file in ``data_dir`` (the holdout files aside), the refusals, and
    every question/answer row as the plain templates (phi, llama2) format it, so template words merge like the rest."""
    texts: List[str] = []

    def add(value):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for v in value:
                add(v)

    # the holdout authors are never trained on, the tokenizer's merges included
    holdout = {f"{h}.json" for h in HOLDOUT_OF.values()}
    files = sorted(p for p in Path(data_dir).glob("*.json") if p.name not in holdout)
    if not files:
        raise FileNotFoundError(f"no TOFU split file (*.json) in {data_dir}")
    for path in files:
        for row in read_jsonl(path):
            for v in row.values():
                add(v)
            if "question" in row and "answer" in row:
                texts += [t.full(row["question"], row["answer"]) for t in TEMPLATES.values() if not t.chat]
    return texts + load_refusals()


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig = TokenizerConfig()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; returns it wrapped for ``transformers`` (bos/eos/pad set)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)
