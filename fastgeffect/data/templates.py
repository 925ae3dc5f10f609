"""Prompt templates and the TOFU-style encoding of one question/answer pair (docs/design.md §6).

Shared by the training data pipeline and the evaluator so both see identical tokens. The encoding
follows TOFU's ``convert_raw_data_to_model_format``: ``question_start + q + question_end`` is the
prompt (its tokens are masked in the labels), ``answer_start + a`` follows, EOS is appended to
the labels and the sequence is right-padded with EOS (padding labelled -100).

Formats: ``phi`` and ``llama2`` are TOFU's; ``chat`` is the tokenizer's own chat template (the
question as the user turn, the answer as the assistant turn, EOS ending it), the default for a
tokenizer that has one (:func:`choose_template`). Generation, PS and the answer mask all take the
prompt's tokens as the context, so :func:`encode_qa` checks that the prompt tokenises as a prefix
of the teacher-forced text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    name: str
    question_start: str
    question_end: str
    answer_start: str
    chat: bool = False  # use the tokenizer's own chat template (generic models)

    def prompt(self, question: str, tokenizer=None) -> str:
        if self.chat:
            if tokenizer is None or not has_chat_template(tokenizer):
                raise ValueError("the 'chat' template needs a tokenizer that has a chat_template")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        return self.question_start + question + self.question_end

    def full(self, question: str, answer: str, tokenizer=None) -> str:
        return self.prompt(question, tokenizer) + self.answer_start + answer


TEMPLATES: Dict[str, Template] = {
    "phi": Template("phi", "Question: ", "\n", "Answer: "),
    "llama2": Template("llama2", "[INST] ", " [/INST]", ""),
    "chat": Template("chat", "", "", "", chat=True),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def choose_template(tokenizer, name: Optional[str] = None, default: str = "phi") -> Template:
    """The template ``name`` when given (``--template``), else ``chat`` for a tokenizer with a chat
    template, else ``default`` (a preset's)."""
    if name is None:
        name = "chat" if has_chat_template(tokenizer) else default
    template = get_template(name)
    if template.chat and not has_chat_template(tokenizer):
        raise ValueError("the 'chat' template needs a tokenizer that has a chat_template; this one has none: "
                         f"use --template {' or '.join(sorted(k for k in TEMPLATES if k != 'chat'))}")
    return template


def encode_qa(tokenizer, template: Template, question: str, answer: str, max_length: int) -> Dict[str, List[int]]:
    """Token ids, attention mask and labels of one QA pair, TOFU style, padded to ``max_length``.

    Raises if the prompt alone fills ``max_length`` (no answer token would remain to learn from).
    An over-long answer is truncated, as TOFU does.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: TOFU-style labels need one")
    prompt = template.prompt(question, tokenizer)
    full = prompt + template.answer_start + answer
    add_special = not template.chat  # a chat template already inserts the special tokens
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    n_prompt = len(prompt_ids)
    ids = tokenizer(full, add_special_tokens=add_special, truncation=True, max_length=max_length)["input_ids"]
    if n_prompt >= len(ids):
        raise ValueError(f"the prompt takes {n_prompt} tokens, max_length {max_length} leaves no answer token: "
                         f"question {question[:60]!r}")
    if list(ids[:n_prompt]) != list(prompt_ids):  # generation would see other tokens than training did
        raise ValueError(f"with the {template.name!r} template the prompt's tokens are not a prefix of the "
                         f"prompt+answer tokens (the tokenizer merges across the boundary): question "
                         f"{question[:60]!r}; use another --template")
    pad = max_length - len(ids)
    eos = tokenizer.eos_token_id
    input_ids = ids + [eos] * pad
    attention_mask = [1] * len(ids) + [0] * pad
    labels = list(ids) if pad == 0 else ids + [eos] + [IGNORE_INDEX] * (pad - 1)
    for i in range(n_prompt):
        labels[i] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
