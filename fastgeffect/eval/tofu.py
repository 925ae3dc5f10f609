"""TOFU evaluator: per-sample logs with TOFU's file names and keys (docs/design.md §5).

For each evaluation set this reproduces TOFU's ``get_all_evals``:

* ``avg_gt_loss`` / ``gt_loss`` / ``num_token_gt``: answer loss of (question, answer);
* ``generated_text`` (``[prompt, greedy continuation, ground truth]``), ``rouge1_recall`` and
  ``rougeL_recall`` (``rouge_score``, stemming, ground truth as target);
* ``avg_paraphrased_loss`` / ``paraphrased_loss`` / ``num_token_paraphrased``: loss of the base
  answer (``paraphrased_answer`` on retain/forget, ``answer`` on real authors / world facts);
* ``average_perturb_loss`` / ``perturb_loss`` / ``num_token_perturb``: the perturbed answers;
* ``truth_ratio`` = exp(avg_paraphrased_loss − mean avg perturbed loss), TOFU's per-sample value
  (null where it overflows: files are strict JSON, written atomically);
* ``normalized_gt_loss`` on real authors / world facts.

Indices are the string positions "0", "1", ... of the (first ``ds_size``) records. Generation
follows ``gen_mode`` (:mod:`.generate`): ``tofu`` reproduces TOFU's batches and budgets, the
batching-independent ``independent`` does not. The ground truth in ``generated_text`` and for
ROUGE is TOFU's: the answer as decoded back from its (possibly truncated) tokens
(:func:`rouge_references`). Loss batches are length-sorted, which changes no number.

Speed (docs/design.md §5.1): the answers of a question share its prompt, which runs once into a
KV cache for all of them (:mod:`.prefix_losses`), and generation is a KV-cache loop in which a
row leaves its batch when it ends (:mod:`.cached_generate`); in ``independent`` mode, whose
continuations do not depend on which prompts share a batch, :func:`evaluate_tofu` generates the
prompts of all its sets in one call (:func:`generate_sets`), so that its length-sorted batches
span sets: fewer, fuller batches, hence fewer decode steps, which on a CPU cost about the same at
any batch height. ``reference=True`` runs the previous path (a full forward per pair, Hugging Face
``generate``, set by set) that the tests hold them to.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from ..data.templates import IGNORE_INDEX, Template
from ..data.tofu import load_tofu_split
from ..jsonfile import write_json
from ._common import as_list, check_ds_size, check_records
from .aggregate import aggregate, check_retain_log, check_truth_ratio, load_retain_log
from .answer_losses import answer_losses, encode_pairs
from .batch_encode import batch_encode_pairs
from .cached_generate import cached_greedy_generate
from .generate import TOFU_BATCH_SIZE, check_gen_mode, greedy_generate
from .open_unlearning import write_open_unlearning
from .prefix_losses import shared_prefix_losses

# set name -> (TOFU log file, answer key used for the truth ratio's base, forget set?)
TASKS = {
    "retain": ("eval_log.json", "paraphrased_answer"),
    "real_authors": ("eval_real_author_wo_options.json", "answer"),
    "world_facts": ("eval_real_world_wo_options.json", "answer"),
    "forget": ("eval_log_forget.json", "paraphrased_answer"),
}
# TOFU split that feeds each set (the forget one depends on the chosen split)
TOFU_SPLITS = {"retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
               "world_facts": "world_facts_perturbed"}


def _rouge(generated: Sequence[str], truths: Sequence[str]):
    from rouge_score import rouge_scorer  # pulls in nltk (~0.6 s): loaded only when scoring

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = {}, {}
    for i, (gen, gt) in enumerate(zip(generated, truths)):
        s = scorer.score(gt, gen)
        r1[str(i)], rl[str(i)] = s["rouge1"].recall, s["rougeL"].recall
    return r1, rl


def rouge_references(tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str],
                     max_length: int) -> List[str]:
    """ROUGE's reference per pair, as TOFU's ``run_generation`` takes it: the answer decoded back
    from the tokens kept within ``max_length``.

    A pair that fits keeps its answer string (decoding gives it back). A truncated one is decoded
    (special tokens skipped) and cut after TOFU's split marker (phi: "Answer: ", llama2:
    " [/INST]", i.e. the template's answer start, else its question end); where the decoded text
    lacks the marker (a tokenizer that does not round-trip the template, the chat template) the
    kept answer tokens are decoded instead.
    """
    ids, labels, real, _ = encode_pairs(tokenizer, template, questions, answers, max_length)
    return decoded_references(tokenizer, template, answers, ids, labels, real, max_length)


def decoded_references(tokenizer, template: Template, answers: Sequence[str], ids, labels, real,
                       max_length: int) -> List[str]:
    """:func:`rouge_references` from the pairs' encodings (``encode_pairs``' ids, labels, lengths)."""
    marker = template.answer_start or template.question_end
    refs = []
    for a, x, y, n in zip(answers, ids, labels, real):
        if n < max_length:
            refs.append(a)
            continue
        text = tokenizer.decode(x[:n], skip_special_tokens=True)
        if marker and marker in text:
            refs.append(text.split(marker)[1])  # TOFU's s.split(split_symbol)[1]
        else:
            refs.append(tokenizer.decode([t for t, lab in zip(x, y) if lab != IGNORE_INDEX],
                                         skip_special_tokens=True))
    return refs


def _idx(values) -> Dict[str, object]:
    return {str(i): v for i, v in enumerate(values)}


def _check_finite(task: str, key: str, values: torch.Tensor, records: Sequence[dict]) -> None:
    """A NaN/inf loss would turn every metric of the set into NaN: refuse it, naming the sample."""
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        i = int(bad[0][0])
        raise ValueError(f"{task}: the model's {key} of sample {i} is {values[i].tolist()} (question "
                         f"{records[i]['question'][:60]!r}): its outputs are not finite (a diverged or overflowing "
                         "model, or a too small dtype), so no metric can be computed")


def set_losses(model, tokenizer, template: Template, questions: Sequence[str], answers: Sequence[str],
               base: Sequence[str], perturbed: Sequence[Sequence[str]], *, max_length: int, batch_size: int,
               reference: bool = False) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
    """``(loss, tokens)`` of the answers, of the base answers and of the perturbed ones (N × k) of
    one set: every pair in one shared-prefix pass (:mod:`.prefix_losses`: each prompt runs once),
    or with ``reference`` as before it, a full forward per pair (:func:`.answer_losses.answer_losses`)."""
    n, k = len(questions), len(perturbed[0])
    flat_q = [q for q in questions for _ in range(k)]
    flat_p = [a for p in perturbed for a in p]
    if reference:
        gt = answer_losses(model, tokenizer, template, questions, answers, max_length=max_length, batch_size=batch_size)
        pl, pn = answer_losses(model, tokenizer, template, flat_q, flat_p, max_length=max_length, batch_size=batch_size)
        bs = answer_losses(model, tokenizer, template, questions, base, max_length=max_length, batch_size=batch_size)
        return gt, bs, (pl.view(n, k), pn.view(n, k))
    loss, count = shared_prefix_losses(model, tokenizer, template, list(questions) * 2 + flat_q,
                                       list(answers) + list(base) + flat_p, max_length=max_length,
                                       batch_size=batch_size)
    return ((loss[:n], count[:n]), (loss[n: 2 * n], count[n: 2 * n]),
            (loss[2 * n:].view(n, k), count[2 * n:].view(n, k)))


def generate_sets(model, tokenizer, template: Template, prompts: Mapping[str, Sequence[str]], *,
                  gen_mode: str = "tofu", max_length: int = 200, max_new_tokens: Optional[int] = None,
                  batch_size: int = 32, reference: bool = False) -> Dict[str, List[str]]:
    """Greedy continuations of each set's prompts (``{set name: prompts}``), as :func:`evaluate_set`
    generates them. ``tofu`` mode generates set by set in TOFU's batches of 30 (a budget depends on
    its batch), ``reference`` set by set by Hugging Face ``generate``; the fast ``independent``
    path generates all sets' prompts in one call, its length-sorted batches spanning sets (a
    continuation does not depend on its batch, :mod:`.generate`), and hands each set its own."""
    kw = dict(mode=gen_mode, max_length=max_length, max_new_tokens=max_new_tokens,
              add_special_tokens=not template.chat, batch_size=TOFU_BATCH_SIZE if gen_mode == "tofu" else batch_size)
    if reference or gen_mode == "tofu":
        fn = greedy_generate if reference else cached_greedy_generate
        return {name: fn(model, tokenizer, list(p), **kw) for name, p in prompts.items()}
    flat = cached_greedy_generate(model, tokenizer, [x for p in prompts.values() for x in p], **kw)
    out, start = {}, 0
    for name, p in prompts.items():
        out[name], start = flat[start: start + len(p)], start + len(p)
    return out


def set_records(records: Sequence[dict], task: str, ds_size: Optional[int]) -> List[dict]:
    """The first ``ds_size`` records of a set (None: all), checked for the fields ``task`` reads and
    for the same (non-zero) number of perturbed answers in every record."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    check_ds_size(ds_size)
    records = list(records[:ds_size] if ds_size is not None else records)
    check_records(records, ("question", "answer", TASKS[task][1], "perturbed_answer"), task)
    k = len(as_list(records[0]["perturbed_answer"]))
    ragged = [i for i, r in enumerate(records) if len(as_list(r["perturbed_answer"])) != k or k == 0]
    if ragged:
        raise ValueError(f"{task}: every record needs the same (non-zero) number of perturbed answers; "
                         f"records {ragged[:5]} differ from record 0 ({k})")
    return records


def evaluate_set(model, tokenizer, template: Template, records: Sequence[dict], task: str, *,
                 ds_size: Optional[int] = 300, max_length: int = 200, max_new_tokens: Optional[int] = None,
                 batch_size: int = 32, gen_mode: str = "tofu", generate: bool = True, progress=None,
                 reference: bool = False, generations: Optional[Sequence[str]] = None) -> dict:
    """TOFU's per-sample log of one set. ``task`` is one of ``retain``, ``forget``,
    ``real_authors``, ``world_facts`` (it picks the base answer key and whether
    ``normalized_gt_loss`` is written). Only the first ``ds_size`` records are used, as TOFU's
    ``ds_size=300`` (None: all; zero or a negative size is refused); ``generate=False`` skips
    generation and ROUGE (losses only). ``gen_mode`` ``tofu`` generates in TOFU's batches of 30
    whatever ``batch_size`` (which sizes the loss batches and ``independent``'s generation batches).
    A non-finite loss (a diverged model) is refused. ``reference=True`` computes the same log the
    slow way the fast path is tested against: a full forward per (question, answer) pair and
    Hugging Face ``generate`` (the default runs each prompt once for all its answers and generates
    by :mod:`.cached_generate`; equal losses up to float rounding, identical generations).
    ``generations`` (one continuation per used record, e.g. from :func:`generate_sets`) are logged
    and scored instead of generating."""
    records = set_records(records, task, ds_size)
    base_key = TASKS[task][1]
    perturbed = [as_list(r["perturbed_answer"]) for r in records]
    if generations is not None and (not generate or len(generations) != len(records)):
        raise ValueError(f"{task}: generations= needs generate=True and one text per record: got "
                         f"{len(generations)} for {len(records)} records")
    qs = [r["question"] for r in records]
    step = (lambda: progress.update(1)) if progress is not None else (lambda: None)
    log: Dict[str, dict] = {}

    (gt_loss, gt_n), (bl, bn), (pl, pn) = set_losses(
        model, tokenizer, template, qs, [r["answer"] for r in records], [r[base_key] for r in records], perturbed,
        max_length=max_length, batch_size=batch_size, reference=reference)
    _check_finite(task, "answer loss", gt_loss, records)
    _check_finite(task, "perturbed answer losses", pl, records)
    _check_finite(task, f"{base_key} loss", bl, records)
    log["avg_gt_loss"] = _idx((gt_loss / gt_n).tolist())
    log["gt_loss"] = _idx(gt_loss.tolist())
    log["num_token_gt"] = _idx(gt_n.tolist())
    step()
    if generate:
        prompts = [template.prompt(q, tokenizer) for q in qs]
        gens = list(generations) if generations is not None else generate_sets(
            model, tokenizer, template, {task: prompts}, gen_mode=gen_mode, max_length=max_length,
            max_new_tokens=max_new_tokens, batch_size=batch_size, reference=reference)[task]
        answers = [r["answer"] for r in records]
        truths = (rouge_references(tokenizer, template, qs, answers, max_length) if reference else
                  decoded_references(tokenizer, template, answers,
                                     *batch_encode_pairs(tokenizer, template, qs, answers, max_length)[:3], max_length))
        log["generated_text"] = _idx([[p, g, t] for p, g, t in zip(prompts, gens, truths)])
        log["rouge1_recall"], log["rougeL_recall"] = _rouge(gens, truths)
    step()
    avg_pert = pl / pn
    avg_base = bl / bn
    log["average_perturb_loss"] = _idx(avg_pert.tolist())
    log["avg_paraphrased_loss"] = _idx(avg_base.tolist())
    # JSON has no infinity: a ratio that overflows (avg losses ~700 apart) is logged as null; the
    # aggregator recomputes it in log space from the two losses
    log["truth_ratio"] = _idx([v if math.isfinite(v) else None
                               for v in torch.exp(avg_base - avg_pert.mean(-1)).tolist()])
    log["paraphrased_loss"] = _idx(bl.tolist())
    log["perturb_loss"] = _idx(pl.tolist())
    log["num_token_paraphrased"] = _idx(bn.tolist())
    log["num_token_perturb"] = _idx(pn.tolist())
    if task in ("real_authors", "world_facts"):
        # -log( p_true / (p_true + Σ p_perturbed) ), p = exp(-avg loss)
        all_l = torch.cat([(gt_loss / gt_n)[:, None], avg_pert], dim=1)
        log["normalized_gt_loss"] = _idx(((gt_loss / gt_n) + torch.logsumexp(-all_l, dim=1)).tolist())
    step()
    return log


def write_logs(logs: Mapping[str, dict], out_dir: Union[str, Path]) -> Path:
    """Write each log under its TOFU file name, plus ``eval_log_aggregated.json`` nesting them; each
    file atomically (a crash or a full disk leaves no partial log for a rerun to trip over)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fname, log in logs.items():
        write_json(out / fname, log, indent=4)
    write_json(out / "eval_log_aggregated.json", dict(logs), indent=4)
    return out


def evaluate_tofu(model, tokenizer, template: Template, sets: Mapping[str, Sequence[dict]], *,
                  out_dir: Optional[Union[str, Path]] = None, retain_log=None, ds_size: Optional[int] = 300,
                  max_length: int = 200, max_new_tokens: Optional[int] = None, batch_size: int = 32,
                  gen_mode: str = "tofu", truth_ratio: str = "geometric", progress: bool = True,
                  reference: bool = False) -> dict:
    """Evaluate the TOFU sets and aggregate them.

    ``sets`` maps task names (``retain``, ``forget``, ``real_authors``, ``world_facts``) to
    record lists in TOFU's schema. Returns ``{"metrics": aggregated metrics, "logs": {file name:
    per-sample log}}``; with ``out_dir`` the logs are written there under TOFU's names, the metrics
    as ``metrics.json``, and both in open-unlearning's ``TOFU_EVAL.json`` / ``TOFU_SUMMARY.json``
    (:func:`.open_unlearning.write_open_unlearning`).
    ``retain_log`` (a path or an ``eval_log_forget.json`` dict of a retain-only model) adds
    Forget Quality; it is read and checked against the forget rows before anything is evaluated.
    Model Utility needs the three non-forget sets; with fewer, only the available sub-metrics are
    reported. ``gen_mode`` (:mod:`.generate`) and ``truth_ratio`` (:func:`.aggregate.aggregate`)
    default to TOFU's published evaluation. ``reference=True``: the slow reference path of
    :func:`evaluate_set`. The fast path in ``independent`` mode generates all sets at once
    (:func:`generate_sets`); otherwise each set generates in turn.
    """
    check_gen_mode(gen_mode)
    check_truth_ratio(truth_ratio)
    unknown = [s for s in sets if s not in TASKS]
    if unknown:
        raise ValueError(f"unknown set names {unknown}; valid: {', '.join(TASKS)}")
    if not sets:
        raise ValueError("no set to evaluate")
    check_ds_size(ds_size)
    retain = None
    if retain_log is not None:
        if "forget" not in sets:
            raise ValueError("a retain_log (for Forget Quality) needs the forget set among the sets")
        retain = load_retain_log(retain_log)
        forget = sets["forget"][:ds_size]
        check_records(forget, ("question", "answer"), "forget")
        name = retain_log if isinstance(retain_log, (str, Path)) else "the retain model's eval_log_forget.json"
        answers = [r["answer"] for r in forget]
        stored = rouge_references(tokenizer, template, [r["question"] for r in forget], answers, max_length)
        check_retain_log(retain, len(forget), answers, name=str(name), stored=stored,
                         questions=[r["question"] for r in forget])
    records = {name: set_records(sets[name], name, ds_size) for name in TASKS if name in sets}  # TOFU's order
    gen_kw = dict(gen_mode=gen_mode, max_length=max_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  reference=reference)
    was_training = model.training
    model.eval()
    logs = {}
    try:
        with tqdm(total=3 * len(sets), desc="TOFU eval", disable=not progress) as bar:
            gens: Dict[str, Optional[List[str]]] = dict.fromkeys(records)
            if gen_mode == "independent" and not reference:  # one call: its batches span the sets
                bar.set_postfix_str("generation")
                gens.update(generate_sets(model, tokenizer, template, {
                    name: [template.prompt(r["question"], tokenizer) for r in recs] for name, recs in records.items()},
                    **gen_kw))
            for name, recs in records.items():
                bar.set_postfix_str(name)
                logs[TASKS[name][0]] = evaluate_set(model, tokenizer, template, recs, name, ds_size=None,
                                                    progress=bar, generations=gens[name], **gen_kw)
    finally:
        model.train(was_training)
    if out_dir is not None:
        write_logs(logs, out_dir)
    metrics = aggregate(logs, retain, require_all=False, truth_ratio=truth_ratio)
    if out_dir is not None:
        write_json(Path(out_dir) / "metrics.json", metrics)
        write_open_unlearning(out_dir, logs, metrics)  # the same evaluation in open-unlearning's files
    return {"metrics": metrics, "logs": logs}


def load_tofu_sets(split: str, data_dir=None) -> Dict[str, list]:
    """The four TOFU evaluation sets of a forget split (``forget01/05/10``, with or without
    ``_perturbed``) from ``data_dir`` (a folder of TOFU JSON-lines files) or the hub."""
    split = split.replace("_perturbed", "")
    if split not in ("forget01", "forget05", "forget10"):
        raise ValueError(f"unknown forget split {split!r}; valid: forget01, forget05, forget10")
    sets = {name: load_tofu_split(s, data_dir) for name, s in TOFU_SPLITS.items()}
    sets["forget"] = load_tofu_split(split + "_perturbed", data_dir)
    return sets
