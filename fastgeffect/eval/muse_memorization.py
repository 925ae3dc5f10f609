"""MUSE's memorisation metrics (``swj0419/muse_bench``, ``metrics/verbmem.py``, ``knowmem.py`` and
``logger.py``), by MUSE's names; each is the mean over rows of a ROUGE-L F1, times 100.

* ``verbmem_f``: the greedy continuation of each verbmem prompt, ``max_new_tokens`` = 128 new
  tokens (the prompt encoded with the tokenizer's special tokens), against ``gt`` cut as MUSE cuts
  it: ``gt`` encoded with special tokens, its first 128 ids kept (BOS counts among them), decoded
  without special tokens.
* ``knowmem_f`` / ``knowmem_r``: MUSE's few-shot prompt, every in-context row first as
  ``"Question: {q}\\nAnswer: {a}\\n\\n"``, then ``"Question: {q}\\nAnswer: "``; 32 new tokens; the
  answer cut before the first ``"\\n\\n"``, then before ``"\\nQuestion"``, then before ``"Question:"``
  (MUSE's ``get_prefix_before_words_occur``), against the row's ``answer``.

ROUGE-L F1 is ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=False).score(target,
prediction)["rougeL"].fmeasure``, as MUSE's ``RougeEvalLogger`` (its other rouge types do not
change the rougeL score). Outputs are decoded with ``skip_special_tokens=True,
clean_up_tokenization_spaces=True`` as in MUSE, and cut at the first EOS.

MUSE generates one prompt at a time; here prompts are generated in left-padded batches
(:func:`~.generate.greedy_generate`, ``independent`` mode: every prompt gets the full budget),
which gives the same tokens up to float rounding.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from ._common import check_records
from .cached_generate import eos_ids
from .generate import greedy_generate

VERBMEM_MAX_NEW_TOKENS = 128  # MUSE's eval_model defaults
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")  # MUSE's knowmem stop rule, applied in this order
DEFAULT_BATCH_SIZE = 32


def rouge_l_f1(targets: Sequence[str], predictions: Sequence[str]) -> List[float]:
    """ROUGE-L F1 of each (target, prediction) pair, MUSE's scorer settings."""
    from rouge_score import rouge_scorer  # pulls in nltk: loaded only when scoring

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions)]


def knowmem_prompt(question: str, icl_rows: Sequence[dict]) -> str:
    """MUSE's few-shot knowmem prompt."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl_rows)
    return shots + f"Question: {question}\nAnswer: "


def cut_answer(output: str, stops: Sequence[str] = KNOWMEM_STOPS) -> str:
    """The output before the first occurrence of each stop string in turn (MUSE's rule)."""
    for s in stops:
        output = output.split(s)[0]
    return output


def truncate_gt(tokenizer, gt: str, max_new_tokens: int) -> str:
    """MUSE's reference continuation: ``gt``'s first ``max_new_tokens`` ids (special tokens counted)."""
    ids = tokenizer(gt, add_special_tokens=True)["input_ids"][:max_new_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> List[str]:
    """Greedy continuations decoded as MUSE decodes them (cut after the first EOS id)."""
    rows = greedy_generate(model, tokenizer, list(prompts), mode="independent", max_new_tokens=max_new_tokens,
                           batch_size=batch_size, add_special_tokens=True, return_ids=True)
    stop = set(eos_ids(model, tokenizer))
    cut = []
    for r in rows:
        ends = [i for i, t in enumerate(r) if t in stop]
        cut.append(r[: ends[0] + 1] if ends else r)
    return tokenizer.batch_decode(cut, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def _limit(rows: Sequence[dict], max_rows: Optional[int]) -> List[dict]:
    return list(rows) if max_rows is None else list(rows)[:max_rows]


def verbmem_f(model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
              batch_size: int = DEFAULT_BATCH_SIZE, max_rows: Optional[int] = None) -> Tuple[float, List[dict]]:
    """``(verbmem_f, log)``: mean ROUGE-L F1 × 100 over verbmem rows ``{"prompt", "gt"}``; ``log``
    has per row ``prompt``, ``gt`` (MUSE's cut), ``response`` and ``rougeL``."""
    rows = _limit(rows, max_rows)
    check_records(rows, ("prompt", "gt"), "MUSE verbmem")
    outputs = generate_texts(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    gts = [truncate_gt(tokenizer, r["gt"], max_new_tokens) for r in rows]
    return _scored(gts, outputs, [{"prompt": r["prompt"]} for r in rows])


def knowmem(model, tokenizer, qa_rows: Sequence[dict], icl_rows: Sequence[dict], *,
            max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
            max_rows: Optional[int] = None) -> Tuple[float, List[dict]]:
    """``(knowmem, log)``: mean ROUGE-L F1 × 100 of the few-shot answers to ``qa_rows`` (with
    ``icl_rows`` as the shots; all of them, whatever ``max_rows``); ``log`` per row: ``question``,
    ``prompt``, ``gt``, ``response``, ``rougeL``. ``knowmem_f`` on forget_qa, ``knowmem_r`` on retain_qa."""
    qa_rows = _limit(qa_rows, max_rows)
    check_records(qa_rows, ("question", "answer"), "MUSE knowmem questions")
    if len(icl_rows):
        check_records(icl_rows, ("question", "answer"), "MUSE knowmem in-context rows")
    prompts = [knowmem_prompt(r["question"], icl_rows) for r in qa_rows]
    outputs = [cut_answer(o) for o in generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size)]
    return _scored([r["answer"] for r in qa_rows], outputs,
                   [{"question": r["question"], "prompt": p} for r, p in zip(qa_rows, prompts)])


def _scored(gts: List[str], outputs: List[str], extra: List[Dict[str, str]]) -> Tuple[float, List[dict]]:
    scores = rouge_l_f1(gts, outputs)
    log = [{**e, "gt": g, "response": o, "rougeL": s} for e, g, o, s in zip(extra, gts, outputs, scores)]
    return sum(scores) / len(scores) * 100.0, log


__all__ = ["KNOWMEM_MAX_NEW_TOKENS", "KNOWMEM_STOPS", "VERBMEM_MAX_NEW_TOKENS", "cut_answer", "knowmem",
           "knowmem_prompt", "rouge_l_f1", "truncate_gt", "verbmem_f"]
