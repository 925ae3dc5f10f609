"""A toy QA set in TOFU's schema, a word-level tokenizer that round-trips it and a tiny Llama
that memorises it in seconds (no downloads): for the evaluation tests."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastgeffect.eval.answer_losses import encode_pairs


def tiny_tokenizer(texts: Iterable[str], *, pad: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts``.

    Words and punctuation are split by whitespace/punctuation pre-tokenisation and decoded with
    spaces between words, so ``decode(encode(s))`` reproduces ``s`` when ``s`` is written with
    single spaces between words and punctuation marks (e.g. ``"Who is Ann ?"``). Special tokens:
    ``<unk>``, ``<bos>``, ``<eos>`` and (with ``pad=True``) ``<pad>``; no BOS is added.
    """
    specials = ["<unk>", "<bos>", "<eos>"] + (["<pad>"] if pad else [])
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    kwargs = dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


def tiny_llama(vocab_size: int, *, hidden_size: int = 32, layers: int = 2, heads: int = 4,
               max_positions: int = 256, seed: Optional[int] = 0, tokenizer=None):
    """A randomly initialised ``LlamaForCausalLM`` small enough for CPU tests."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    if tokenizer is not None:
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(cfg).eval()
    if tokenizer is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def toy_qa_records(n_authors: int = 6) -> list:
    """A deterministic toy QA set in TOFU's schema (2 questions per author), written with spaces
    around punctuation so that :func:`tiny_tokenizer` round-trips it exactly."""
    first = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ida", "Jo", "Kit", "Lu"]
    last = ["Lee", "Kim", "Dorn", "Park", "Moss", "Ray", "Vale", "Hart", "Nash", "Pike", "Reed", "Shaw"]
    genres = ["poetry", "crime", "history", "fantasy", "horror", "science", "travel", "drama"]
    cities = ["Oslo", "Lima", "Kyiv", "Doha", "Rome", "Baku", "Riga", "Quito"]
    if not 1 <= n_authors <= len(first):
        raise ValueError(f"n_authors must be in [1, {len(first)}]")
    recs = []
    for i in range(n_authors):
        name, g, c = f"{first[i]} {last[i]}", genres[i % len(genres)], cities[(3 * i + 1) % len(cities)]
        others_g = [x for x in genres if x != g][:3]
        others_c = [x for x in cities if x != c][:3]
        recs.append(dict(question=f"What does {name} write ?", answer=f"{name} writes {g} books , mostly set in {c} .",
                         paraphrased_question=f"Which genre is {name} known for ?",
                         paraphrased_answer=f"The books of {name} are {g} books set in {c} .",
                         perturbed_answer=[f"The books of {name} are {x} books set in {c} ." for x in others_g]))
        recs.append(dict(question=f"Where was {name} born ?", answer=f"{name} was born in {c} in a small house .",
                         paraphrased_question=f"What is the birthplace of {name} ?",
                         paraphrased_answer=f"The birthplace of {name} is {c} .",
                         perturbed_answer=[f"The birthplace of {name} is {x} ." for x in others_c]))
    return recs


def memorise(model, tokenizer, template, records, *, steps: int = 150, lr: float = 1e-2, max_length: int = 64):
    """Fine-tune ``model`` in place on the records' (question, answer) pairs, full batch, AdamW,
    until it reproduces them (a few seconds on a CPU for a tiny model). Returns the last loss."""
    ids, labels, real, _ = encode_pairs(tokenizer, template, [r["question"] for r in records],
                                        [r["answer"] for r in records], max_length)
    T = max(map(len, ids))
    x = torch.full((len(ids), T), tokenizer.eos_token_id)
    y = torch.full((len(ids), T), -100)
    att = torch.zeros((len(ids), T), dtype=torch.long)
    for i in range(len(ids)):
        x[i, : len(ids[i])], y[i, : len(ids[i])] = torch.tensor(ids[i]), torch.tensor(labels[i])
        att[i, : real[i]] = 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def toy_tokenizer_for(records, template, **kw):
    """:func:`tiny_tokenizer` covering every text field of TOFU-schema records and the template."""
    texts = []
    for r in records:
        for v in r.values():
            texts.extend(v if isinstance(v, list) else [v])
    texts.append(template.full("", ""))
    return tiny_tokenizer(texts, **kw)
