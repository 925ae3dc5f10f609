"""The forget metrics the attacks measure after each relearning step count and each quantisation,
from the evaluators of :mod:`fastgeffect.eval` (nothing recomputed here)."""
from __future__ import annotations

from typing import Dict, Sequence

from ..data.templates import Template
from ..eval._common import check_records
from ..eval.answer_losses import answer_losses
from ..eval.memorization import memorization_scores

METRICS = ("nll", "exact_memorization", "extraction_strength")  # always measured
ROUGE = "rougeL_recall"  # with ``rouge=True``: greedy answers, slower


def forget_metrics(model, tokenizer, template: Template, records: Sequence[dict], *, rouge: bool = False,
                   max_length: int = 200, batch_size: int = 32) -> Dict[str, float]:
    """Means over ``records`` (TOFU-schema rows) of:

    * ``nll``: the answer's token-mean NLL (TOFU's ``avg_gt_loss``, :func:`fastgeffect.eval.answer_losses`);
    * ``exact_memorization`` / ``extraction_strength``: open-unlearning's teacher-forced metrics
      (:func:`fastgeffect.eval.memorization.memorization_scores`, one pass for both);
    * with ``rouge``: ``rougeL_recall`` of the greedy answer against the answer (TOFU's, by the
      evaluator's own generation and scorer; batching-independent generation).
    """
    check_records(records, ("question", "answer"), "forget metrics")
    qs, ans = [r["question"] for r in records], [r["answer"] for r in records]
    loss, count = answer_losses(model, tokenizer, template, qs, ans, max_length=max_length, batch_size=batch_size)
    mem = memorization_scores(model, tokenizer, template, records, max_length=max_length, batch_size=batch_size)
    out = {"nll": float((loss / count).mean()), "exact_memorization": float(mem["em"]),
           "extraction_strength": float(mem["es"])}
    if rouge:
        out[ROUGE] = rouge_l(model, tokenizer, template, qs, ans, max_length=max_length, batch_size=batch_size)
    return out


def rouge_l(model, tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str], *,
            max_length: int, batch_size: int) -> float:
    """Mean ROUGE-L recall of the greedy answers, as :func:`fastgeffect.eval.evaluate_set` computes it
    (``gen_mode="independent"``)."""
    from ..eval.cached_generate import cached_greedy_generate
    from ..eval.tofu import _rouge, rouge_references

    prompts = [template.prompt(q, tokenizer) for q in questions]
    gens = cached_greedy_generate(model, tokenizer, prompts, mode="independent", max_length=max_length,
                                  batch_size=batch_size, add_special_tokens=not template.chat)
    _, rl = _rouge(gens, rouge_references(tokenizer, template, questions, answers, max_length))
    return sum(rl.values()) / len(rl)
