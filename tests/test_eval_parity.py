"""Evaluation parity with TOFU (docs/design.md §13): the two generation modes
against straightforward implementations of their budget rules, ROUGE's reference decoded from
truncated tokens on real TOFU rows, both Truth Ratio aggregations against hand computations,
and the driver's evaluation settings per preset."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for
from rouge_score import rouge_scorer

from fastgeffect.data.templates import get_template
from fastgeffect.data.tofu import load_tofu_split
from fastgeffect.driver import cli
from fastgeffect.driver.evaluation import eval_options
from fastgeffect.driver.presets import PRESETS
from fastgeffect.embedded import TokenizerConfig, train_tokenizer
from fastgeffect.eval import aggregate, evaluate_set, file_metrics, greedy_generate
from fastgeffect.eval.__main__ import main as eval_main
from fastgeffect.eval.aggregate import TRUTH_RATIO_AGGS, forget_quality
from fastgeffect.eval.cached_generate import cached_greedy_generate
from fastgeffect.eval.generate import GEN_MODES
from fastgeffect.eval.tofu import rouge_references

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"
TPL = get_template("phi")


@pytest.fixture(scope="module")
def never_eos():
    """A tiny random Llama whose EOS logit is -1e4: it always spends its whole budget, so the
    budget rule alone decides how much is generated. Prompts of 6 to 40 tokens, in no order."""
    recs = toy_qa_records(12)
    tok = toy_tokenizer_for(recs, TPL)
    model = tiny_llama(len(tok), hidden_size=24, layers=2, heads=2, seed=5, tokenizer=tok).double()
    eos = tok.eos_token_id

    def no_eos(module, args, out):
        out = out.clone()
        out[..., eos] = -1e4
        return out

    model.lm_head.register_forward_hook(no_eos)
    words = " ".join(r["answer"] for r in recs).split()
    prompts = [TPL.prompt(" ".join(words[(7 * i) % 50: (7 * i) % 50 + (13 * i) % 35 + 1])) for i in range(41)]
    return model, tok, prompts


def argmax_continuation(model, tok, prompt: str, budget: int) -> str:
    """The greedy continuation of one prompt, no padding, no cache: a plain argmax loop."""
    ids = tok(prompt)["input_ids"]
    new = []
    for _ in range(max(budget, 0)):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_independent_mode_ignores_batching(never_eos):
    model, tok, prompts = never_eos
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    max_length = max(lengths) + 3  # budgets from 3 to 37 new tokens
    runs = {bs: greedy_generate(model, tok, prompts, mode="independent", max_length=max_length, batch_size=bs)
            for bs in (1, 7, 32)}
    assert runs[1] == runs[7] == runs[32]
    for p, n, g in zip(prompts, lengths, runs[7]):  # each sample's own budget: max_length − its length
        assert g == argmax_continuation(model, tok, p, max_length - n)
    for bs in (1, 7, 32):  # the TOFU metrics' KV-cache loop (rows leave as they end) keeps the rule
        assert cached_greedy_generate(model, tok, prompts, mode="independent", max_length=max_length,
                                      batch_size=bs) == runs[7]
    ids = greedy_generate(model, tok, prompts, mode="independent", max_length=max_length, return_ids=True)
    assert [len(x) for x in ids] == [max_length - n for n in lengths]


def test_tofu_mode_reproduces_tofu_batches_and_budgets(never_eos):
    model, tok, prompts = never_eos
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    max_length = max(lengths) + 3
    got = greedy_generate(model, tok, prompts, mode="tofu", max_length=max_length, batch_size=30)
    # TOFU's rule, written out: batches of 30 in dataset order, max_length − the batch's longest prompt
    want = []
    for s in range(0, len(prompts), 30):
        T = max(lengths[s: s + 30])
        want += [argmax_continuation(model, tok, p, max_length - T) for p in prompts[s: s + 30]]
    assert got == want
    assert cached_greedy_generate(model, tok, prompts, mode="tofu", max_length=max_length, batch_size=30) == want
    independent = greedy_generate(model, tok, prompts, mode="independent", max_length=max_length)
    # the rule matters: short prompts next to a long one get a shorter budget than their own
    assert sum(a != b for a, b in zip(got, independent)) >= 10
    # evaluate_set generates in TOFU's batches of 30 whatever its loss batch size
    recs = [{"question": p[len(TPL.question_start):-len(TPL.question_end)], "answer": "x", "paraphrased_answer": "x",
             "perturbed_answer": ["x"]} for p in prompts]
    for reference in (True, False):
        log = evaluate_set(model, tok, TPL, recs, "retain", ds_size=None, max_length=max_length, batch_size=4,
                           gen_mode="tofu", reference=reference)
        assert [log["generated_text"][str(i)][1] for i in range(len(recs))] == want


def test_generation_mode_is_checked(never_eos):
    model, tok, prompts = never_eos
    with pytest.raises(ValueError, match="unknown generation mode 'sorted'; valid: tofu, independent"):
        greedy_generate(model, tok, prompts[:2], mode="sorted")


def _real_rows(n):
    if not (SHARED / "forget10_perturbed.json").exists():
        pytest.skip("real TOFU data not available")
    rows = load_tofu_split("forget10_perturbed", SHARED)[:n]
    texts = [TPL.full(r["question"], r["answer"]) for r in rows] + [v for r in rows for v in r.values()
                                                                   if isinstance(v, str)]
    tok = train_tokenizer(texts + [get_template("llama2").full("", "")], TokenizerConfig(vocab_size=400))
    return rows, tok


@pytest.mark.parametrize("template", ["phi", "llama2"])
def test_rouge_reference_is_the_decoded_truncated_answer_on_real_rows(template):
    rows, tok = _real_rows(40)
    tpl = get_template(template)
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    lengths = sorted(len(tok(tpl.full(q, a))["input_ids"]) for q, a in zip(qs, ans))
    max_length = lengths[len(lengths) // 2]  # about half the rows do not fit
    refs = rouge_references(tok, tpl, qs, ans, max_length)
    # TOFU's run_generation: decode the (truncated, EOS-padded) sequence, split on its split symbol
    split_symbol = {"phi": "Answer: ", "llama2": " [/INST]"}[template]
    tofu = [tok.decode(tok(tpl.full(q, a), truncation=True, max_length=max_length)["input_ids"],
                       skip_special_tokens=True).split(split_symbol)[1] for q, a in zip(qs, ans)]
    assert refs == tofu
    truncated = [i for i, (r, a) in enumerate(zip(refs, ans)) if r != a]
    assert len(truncated) >= 10 and all(ans[i].startswith(refs[i]) for i in truncated)


def test_rouge_is_scored_against_the_decoded_reference():
    rows, tok = _real_rows(12)
    model = tiny_llama(len(tok), hidden_size=16, layers=1, heads=2, seed=0, tokenizer=tok)
    max_length = 60  # most forget10 questions + answers are longer with this small vocabulary
    log = evaluate_set(model, tok, TPL, rows, "forget", max_length=max_length, max_new_tokens=4)
    refs = rouge_references(tok, TPL, [r["question"] for r in rows], [r["answer"] for r in rows], max_length)
    assert sum(r != row["answer"] for r, row in zip(refs, rows)) >= len(rows) // 2
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for i, ref in enumerate(refs):
        prompt, gen, truth = log["generated_text"][str(i)]
        assert truth == ref
        assert log["rougeL_recall"][str(i)] == scorer.score(ref, gen)["rougeL"].recall


def _log(para, pert, gt=None):
    n = len(para)
    gt = gt if gt is not None else [0.5] * n
    idx = [str(i) for i in range(n)]
    return {"avg_gt_loss": dict(zip(idx, gt)), "rougeL_recall": dict(zip(idx, [0.5] * n)),
            "avg_paraphrased_loss": dict(zip(idx, para)), "average_perturb_loss": dict(zip(idx, pert))}


PARA = [0.7, 1.9, 2.4]
PERT = [[1.1, 2.3, 0.4], [0.9, 1.6, 3.0], [2.2, 2.0, 2.6]]


def hand_truth_ratio(forget: bool, agg: str) -> float:
    """TOFU's two formulas, written out with plain floats."""
    vals = []
    for p, ps in zip(PARA, PERT):
        if agg == "geometric":  # aggregate_eval_stat.py: r = exp(mean perturbed loss − paraphrased loss)
            r = math.exp(sum(ps) / len(ps) - p)
            vals.append(min(r, 1 / r) if forget else max(0.0, 1 - 1 / r))
        else:  # utils.get_model_utility: c = mean perturbed probability / paraphrased probability
            c = (sum(math.exp(-x) for x in ps) / len(ps)) / math.exp(-p)
            vals.append(min(c, 1 / c) if forget else max(0.0, 1 - c))
    return sum(vals) / len(vals)


@pytest.mark.parametrize("agg", TRUTH_RATIO_AGGS)
def test_truth_ratio_aggregations_match_hand_computation(agg):
    log = _log(PARA, PERT)
    forget = file_metrics(log, "eval_log_forget.json", agg)["Truth Ratio Forget"]
    retain = file_metrics(log, "eval_log.json", agg)["Truth Ratio Retain"]
    assert forget == pytest.approx(hand_truth_ratio(True, agg), rel=1e-12)
    assert retain == pytest.approx(hand_truth_ratio(False, agg), rel=1e-12)
    # the two are different numbers on these losses (the test would catch a swap)
    other = "arithmetic" if agg == "geometric" else "geometric"
    assert abs(retain - hand_truth_ratio(False, other)) > 0.01


def test_truth_ratio_choice_changes_only_truth_ratios_and_utility():
    logs = {f: _log(PARA, PERT) for f in ("eval_log.json", "eval_real_author_wo_options.json",
                                          "eval_real_world_wo_options.json", "eval_log_forget.json")}
    retain = _log([1.0, 1.5, 2.0], PERT)
    geo = aggregate(logs, retain)
    ari = aggregate(logs, retain, truth_ratio="arithmetic")
    assert geo == aggregate(logs, retain, truth_ratio="geometric")  # the default
    changed = {k for k in geo if geo[k] != ari[k]}
    assert changed == {k for k in geo if k.startswith("Truth Ratio")} | {"Model Utility"}
    assert ari["Forget Quality"] == forget_quality(logs["eval_log_forget.json"], retain)["Forget Quality"]
    with pytest.raises(ValueError, match="unknown truth-ratio aggregation 'harmonic'; valid: geometric, arithmetic"):
        aggregate(logs, truth_ratio="harmonic")


def test_driver_eval_settings_per_preset():
    assert cli.GEN_MODES == GEN_MODES and cli.TRUTH_RATIO_AGGS == TRUTH_RATIO_AGGS  # spelled out in cli.py
    target = argparse.Namespace(max_length=321)
    for name, length, mode in (("phi", 200, "tofu"), ("llama", 200, "tofu"), ("embedded", 321, "independent")):
        args = cli.parse_args(["--preset", name] + (["--model", "m"] if name != "embedded" else []))
        assert eval_options(args, target) == {"max_length": length, "gen_mode": mode, "truth_ratio": "geometric"}
        assert PRESETS[name].max_length in (500, None)  # training keeps its own length
    args = cli.parse_args(["--preset", "embedded", "--eval-max-length", "64", "--gen-mode", "tofu",
                           "--truth-ratio-agg", "arithmetic"])
    assert eval_options(args, target) == {"max_length": 64, "gen_mode": "tofu", "truth_ratio": "arithmetic"}
    with pytest.raises(SystemExit):
        cli.parse_args(["--eval-max-length", "0"])


@pytest.mark.parametrize("agg", TRUTH_RATIO_AGGS)
def test_eval_cli_aggregates_with_either_truth_ratio(tmp_path, agg):
    logs = {f: _log(PARA, PERT) for f in ("eval_log.json", "eval_real_author_wo_options.json",
                                          "eval_real_world_wo_options.json", "eval_log_forget.json")}
    for name, log in logs.items():
        (tmp_path / name).write_text(json.dumps(log))
    assert eval_main(["aggregate", "--logs", str(tmp_path), "--out", str(tmp_path / "m.json"),
                 "--truth-ratio-agg", agg]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["Truth Ratio Retain"] == pytest.approx(hand_truth_ratio(False, agg), rel=1e-12)
    assert got == pytest.approx(aggregate(logs, truth_ratio=agg), rel=1e-12)
