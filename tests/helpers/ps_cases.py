"""Tokenizers and tiny models for PS's fast path against its reference (tests/test_eval_ps_fast.py):
three tokenizer kinds (word-level, GPT-2-style byte-level BPE that attaches a word's preceding
space, and the embedded tokenizer's BPE that attaches the following one) and models trained on
token sequences chosen to make teacher forcing and generation disagree."""
from __future__ import annotations

from typing import List, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastgeffect.embedded import TokenizerConfig, train_tokenizer


def byte_level_tokenizer(texts: Sequence[str], vocab_size: int = 400):
    """GPT-2-style byte-level BPE trained on ``texts`` (a word carries its preceding space; decoding
    keeps a continuation's leading space, as Phi-1.5's does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def trailing_space_tokenizer(texts: Sequence[str], vocab_size: int = 500):
    """The embedded target's tokenizer kind (a word carries its following space), trained on ``texts``."""
    return train_tokenizer(list(texts), TokenizerConfig(vocab_size=vocab_size, min_frequency=1))


def char_ids(tok, text: str) -> List[int]:
    """``text`` as one byte-level token per character (ASCII): a tokenisation BPE never produces."""
    return [tok.convert_tokens_to_ids("Ġ" if c == " " else "Ċ" if c == "\n" else c) for c in text]


def memorise_ids(model, seqs: Sequence[Sequence[int]], starts: Sequence[int], *, steps: int = 200,
                 lr: float = 1e-2, pad: int = 0) -> float:
    """Fine-tune ``model`` in place to continue every ``seqs[i][:starts[i]]`` with the rest of
    ``seqs[i]`` (full batch, AdamW); returns the last loss."""
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), pad)
    y = torch.full((len(seqs), T), -100)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, starts)):
        x[i, :len(s)] = torch.tensor(list(s))
        y[i, a:len(s)] = torch.tensor(list(s[a:]))
        att[i, :len(s)] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())
