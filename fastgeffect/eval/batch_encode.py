"""The TOFU encoding of many (question, answer) pairs in two batched tokenizer calls: what
:func:`.answer_losses.encode_pairs` gives (``encode_qa`` pair by pair, two calls each), for the
fast paths of the TOFU metrics (docs/design.md §5.1), where a set's 5–7 answers per question
made tokenising a tenth of a small model's evaluation.

Each distinct question's prompt is rendered and tokenised once; every prompt + answer text is
tokenised in one call with the same truncation. A fast tokenizer encodes a batch exactly as it
encodes each text alone. A pair that ``encode_qa`` refuses (a prompt that fills ``max_length``,
or whose tokens are not a prefix of prompt + answer) is handed to ``encode_qa``, which raises its
own error.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from ..data.templates import IGNORE_INDEX, Template, encode_qa


def batch_encode_pairs(tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str],
                       max_length: int) -> Tuple[List[List[int]], List[List[int]], List[int], int, List[int]]:
    """``encode_pairs``' ``(input_ids, labels, n_real_tokens, n_truncated)`` and each pair's prompt
    length (its tokens are ``input_ids[i][:prompt_length]``)."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: TOFU-style labels need one")
    if len(questions) == 0:
        return [], [], [], 0, []
    add = not template.chat  # a chat template already inserts the special tokens (as encode_qa)
    distinct = list(dict.fromkeys(questions))
    text = {q: template.prompt(q, tokenizer) for q in distinct}
    prompt = dict(zip(distinct, tokenizer([text[q] for q in distinct], add_special_tokens=add)["input_ids"]))
    full = tokenizer([text[q] + template.answer_start + a for q, a in zip(questions, answers)],
                     add_special_tokens=add, truncation=True, max_length=max_length)["input_ids"]
    eos = tokenizer.eos_token_id
    ids, labels, real, plen, truncated = [], [], [], [], 0
    for q, a, x in zip(questions, answers, full):
        p = prompt[q]
        if len(p) >= len(x) or list(x[: len(p)]) != list(p):
            encode_qa(tokenizer, template, q, a, max_length)  # raises its own error for this pair
            raise AssertionError(f"encode_qa accepted a pair batch_encode_pairs refuses: question {q[:60]!r}")
        n = len(x)
        if n < max_length:
            x = list(x) + [eos]  # the EOS label; its input slot is padding
        else:
            x, truncated = list(x), truncated + 1  # no room for the EOS label (encode_pairs warns)
        ids.append(x)
        labels.append([IGNORE_INDEX] * len(p) + x[len(p):])
        real.append(n)
        plen.append(len(p))
    return ids, labels, real, truncated, plen
