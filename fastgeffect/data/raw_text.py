"""Raw-text corpora as fixed-length training windows (issue 27: MUSE, WMDP), with the items of
:class:`~fastgeffect.data.qa.QADataset`, so that :class:`~fastgeffect.data.pairs.ForgetRetainDataset`,
``collate_pairs``, the objectives, the fused losses and the G-effect risks take them unchanged.

Every token of a document is an answer token: there is no prompt, and no EOS is appended (MUSE's
and lm-eval's perplexity windows do not add one either).

Chunking (:func:`chunk_windows`, the strided windows of Hugging Face's perplexity guide; lm-eval's
rolling loglikelihood windows likewise score every token once): window k covers tokens
``[k·stride, k·stride + max_length)``, the last one cut at the document's end; windows start
``stride`` apart until one reaches the end, so the tail window is kept, shorter. Only the tokens
that the previous window did not cover carry labels; the overlap (``max_length − stride``
tokens) is context, labelled -100. So every token is labelled exactly once, and with
``stride < max_length`` each labelled token after the first window sees at least
``max_length − stride`` tokens of context.

A causal LM's loss reads label t from the logits at t − 1, so the label at a window's position 0
is never scored. :class:`TextWindowDataset` therefore puts BOS first in every window (when the
tokenizer has a BOS token and ``add_bos`` is not False): the window holds BOS + up to
``max_length − 1`` text tokens, so every token of the document is scored exactly once (the first
one predicted from BOS alone, as MUSE's windows do). Without BOS the document's first token is
context only (nothing predicts it) and ``stride`` must be smaller than ``max_length``, so that a
later window's position 0 is a token the previous window already labelled.

Documents are never merged: each document is chunked on its own (MUSE's ``.txt`` path joins its
corpus into one stream; here no window mixes two documents).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .templates import IGNORE_INDEX


def check_texts(texts: Sequence, name: str) -> None:
    """A non-empty list of strings: a null or a number would be tokenised as "None" or fail deep inside."""
    if isinstance(texts, str):
        raise ValueError(f"{name}: expected a list of documents, got one string")
    if len(texts) == 0:
        raise ValueError(f"{name}: no document")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name}: documents {bad[:5]} are not strings (document {bad[0]}: {texts[bad[0]]!r})")


def check_window_args(max_length, stride) -> None:
    for name, v in (("max_length", max_length), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if stride > max_length:  # a gap between windows: the tokens in it would never be trained on
        raise ValueError(f"stride {stride} is larger than the window length {max_length}: the tokens between "
                         "two windows would never be labelled")


def chunk_windows(token_ids: Sequence[int], max_length: int, stride: int) -> List[Dict[str, List[int]]]:
    """Windows ``{"input_ids", "labels"}`` of one document's ``token_ids`` (module docstring):
    each at most ``max_length`` tokens, starting ``stride`` apart; ``labels`` is the token where
    no earlier window covered it, else -100. Empty input gives no window."""
    check_window_args(max_length, stride)
    ids = [int(t) for t in token_ids]
    windows: List[Dict[str, List[int]]] = []
    covered = 0  # tokens [0, covered) are labelled by earlier windows
    start = 0
    while covered < len(ids):
        end = min(start + max_length, len(ids))
        window = ids[start:end]
        labels = [IGNORE_INDEX] * (covered - start) + window[covered - start:]
        windows.append({"input_ids": window, "labels": labels})
        covered = end
        start += stride
    return windows


class TextWindowDataset(Dataset):
    """Windows of raw-text documents (module docstring), items as :class:`~.qa.QADataset`'s:
    ``input_ids``, ``attention_mask``, ``labels`` (LongTensors of ``max_length``, right-padded
    with the pad id (else EOS), padding masked and labelled -100) and ``index`` (the window's
    number in this dataset, ``0..len-1``; ``doc_of[index]`` is its document's position in ``texts``).

    ``stride``: the distance between window starts in text tokens; default (None) the window's
    whole text budget (``max_length − 1`` with BOS, ``max_length`` without), i.e. no overlap.
    ``add_bos``: None (default) puts BOS first when the tokenizer has one; True requires one.
    """

    def __init__(self, texts: Sequence[str], tokenizer, max_length: int, stride: Optional[int] = None, *,
                 add_bos: Optional[bool] = None, name: str = "raw text"):
        check_texts(texts, name)
        bos = tokenizer.bos_token_id if add_bos is not False else None
        if add_bos and bos is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        budget = max_length - (1 if bos is not None else 0)  # text tokens per window
        if isinstance(max_length, int) and budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room for a text token after BOS")
        stride = budget if stride is None else stride
        check_window_args(budget, stride)
        if bos is None and stride >= max_length:
            raise ValueError(f"without a BOS token, stride ({stride}) must be smaller than max_length "
                             f"({max_length}): a window's first token has nothing before it to predict it, so it "
                             "must be context the previous window already labelled")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: cannot pad a window")
        self.max_length, self.stride, self.add_bos = max_length, stride, bos is not None
        rows, self.doc_of = [], []
        for d, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) + (bos is not None) < 2:
                raise ValueError(f"{name}: document {d} has {len(ids)} token(s) and no BOS before it: no token "
                                 f"to train on ({text[:60]!r})")
            for k, w in enumerate(chunk_windows(ids, budget, stride)):
                x, y = w["input_ids"], w["labels"]
                if bos is not None:
                    x, y = [bos] + x, [IGNORE_INDEX] + y
                elif k == 0:
                    y = [IGNORE_INDEX] + y[1:]  # the document's first token: nothing predicts it
                rows.append(_padded(x, y, max_length, pad))
                self.doc_of.append(d)
        self.tensors: Dict[str, torch.Tensor] = {
            k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}

    def __len__(self) -> int:
        return len(self.doc_of)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.tensors.items()}
        item["index"] = i
        return item


def _padded(x: List[int], y: List[int], max_length: int, pad: int) -> Dict[str, List[int]]:
    n = max_length - len(x)
    return {"input_ids": x + [pad] * n, "attention_mask": [1] * len(x) + [0] * n,
            "labels": y + [IGNORE_INDEX] * n}


__all__ = ["chunk_windows", "check_texts", "check_window_args", "TextWindowDataset"]
