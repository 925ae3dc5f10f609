"""TOFU evaluator on a tiny random Llama: per-sample losses, truth ratio and generation
recomputed independently; log files; bad input; loading the real TOFU files."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for

from fastgeffect.data.templates import get_template
from fastgeffect.eval import (
    FILES,
    aggregate,
    answer_losses,
    evaluate_set,
    evaluate_tofu,
    greedy_generate,
    load_logs,
    load_tofu_sets,
    ps_scores,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"
TPL = get_template("phi")


@pytest.fixture(scope="module")
def toy():
    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, TPL)
    model = tiny_llama(len(tok), hidden_size=24, layers=2, heads=2, seed=3, tokenizer=tok).double()
    return model, tok, recs


def ref_loss(model, tok, q, a):
    """Sum of NLLs of 'Answer: a' + EOS given 'Question: q\\n', one sample, no padding, float64."""
    prompt = tok(TPL.prompt(q))["input_ids"]
    full = tok(TPL.full(q, a))["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full[:-1]])).logits[0].double()
    lp = F.log_softmax(logits, -1)
    targets = range(len(prompt), len(full))  # positions of answer tokens and EOS
    return -sum(lp[t - 1, full[t]].item() for t in targets), len(targets)


def test_answer_losses_match_reference(toy):
    model, tok, recs = toy
    qs = [r["question"] for r in recs] + [recs[0]["question"]]
    ans = [r["answer"] for r in recs] + [recs[1]["paraphrased_answer"]]
    for bs in (1, 3, 64):
        loss, n = answer_losses(model, tok, TPL, qs, ans, batch_size=bs)
        for i, (q, a) in enumerate(zip(qs, ans)):
            rl, rn = ref_loss(model, tok, q, a)
            assert int(n[i]) == rn
            assert float(loss[i]) == pytest.approx(rl, rel=1e-9)


def test_evaluate_set_logs(toy):
    model, tok, recs = toy
    for task in ("forget", "real_authors"):
        log = evaluate_set(model, tok, TPL, recs[:5], task, max_new_tokens=6, batch_size=3)
        base = "paraphrased_answer" if task == "forget" else "answer"
        keys = {"avg_gt_loss", "gt_loss", "num_token_gt", "generated_text", "rouge1_recall", "rougeL_recall",
                "average_perturb_loss", "avg_paraphrased_loss", "truth_ratio", "paraphrased_loss", "perturb_loss",
                "num_token_paraphrased", "num_token_perturb"}
        assert keys <= set(log) and ("normalized_gt_loss" in log) == (task == "real_authors")
        assert len(log["gt_loss"]) == 5
        for i, r in enumerate(recs[:5]):
            s = str(i)
            gl, gn = ref_loss(model, tok, r["question"], r["answer"])
            bl, bn = ref_loss(model, tok, r["question"], r[base])
            pert = [ref_loss(model, tok, r["question"], p) for p in r["perturbed_answer"]]
            assert log["gt_loss"][s] == pytest.approx(gl, rel=1e-9) and log["num_token_gt"][s] == gn
            assert log["avg_gt_loss"][s] == pytest.approx(gl / gn, rel=1e-9)
            assert log["paraphrased_loss"][s] == pytest.approx(bl, rel=1e-9)
            assert log["num_token_perturb"][s] == [n for _, n in pert]
            avg_pert = [loss_ / n for loss_, n in pert]
            assert log["average_perturb_loss"][s] == pytest.approx(avg_pert, rel=1e-9)
            assert log["truth_ratio"][s] == pytest.approx(math.exp(bl / bn - sum(avg_pert) / len(avg_pert)), rel=1e-9)
            if task == "real_authors":
                pt = math.exp(-gl / gn)
                ref = -math.log(pt / (pt + sum(math.exp(-x) for x in avg_pert)))
                assert log["normalized_gt_loss"][s] == pytest.approx(ref, rel=1e-9)
            prompt, gen, truth = log["generated_text"][s]
            assert prompt == TPL.prompt(r["question"]) and truth == r["answer"]
        json.dumps(log)  # serialisable as TOFU writes it


def test_batched_generation_equals_single(toy):
    model, tok, recs = toy
    prompts = [TPL.prompt(r["question"]) for r in recs] + [TPL.prompt("Who ?")]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=7, batch_size=8)
    single = [greedy_generate(model, tok, [p], max_new_tokens=7, batch_size=1)[0] for p in prompts]
    assert batched == single
    # the greedy continuation, recomputed with a plain argmax loop
    ids = tok(prompts[1])["input_ids"]
    out = []
    for _ in range(7):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
        out.append(nxt)
    assert single[1] == tok.decode(out, skip_special_tokens=True)
    # TOFU's budget: prompt + continuation <= max_length
    assert greedy_generate(model, tok, prompts[:1], max_length=len(tok(prompts[0])["input_ids"])) == [""]


def test_evaluate_tofu_writes_logs(toy, tmp_path):
    model, tok, recs = toy
    sets = {"retain": recs[:4], "forget": recs[4:], "real_authors": recs[:3], "world_facts": recs[5:]}
    res = evaluate_tofu(model, tok, TPL, sets, out_dir=tmp_path, max_new_tokens=5, batch_size=4, progress=False)
    expected = sorted(list(FILES) + ["eval_log_aggregated.json", "metrics.json", "TOFU_EVAL.json",
                                     "TOFU_SUMMARY.json"])
    assert sorted(p.name for p in tmp_path.glob("*.json")) == expected
    logs = load_logs(tmp_path)
    assert aggregate(logs) == pytest.approx(res["metrics"])
    assert aggregate(load_logs(tmp_path / "eval_log_aggregated.json")) == pytest.approx(res["metrics"])
    assert "Model Utility" in res["metrics"] and 0 <= res["metrics"]["Model Utility"] <= 1
    summary = json.loads((tmp_path / "TOFU_SUMMARY.json").read_text())  # open-unlearning's names
    assert summary["model_utility"] == pytest.approx(res["metrics"]["Model Utility"], rel=1e-12)
    assert summary["forget_Q_A_ROUGE"] == pytest.approx(res["metrics"]["ROUGE Forget"], rel=1e-12, abs=1e-15)
    again = evaluate_tofu(model, tok, TPL, {"forget": recs[4:]}, retain_log=tmp_path / "eval_log_forget.json",
                          max_new_tokens=5, progress=False)
    assert again["metrics"]["Forget Quality"] == 1.0 and "Model Utility" not in again["metrics"]
    assert model.training is False


def test_bad_input(toy):
    model, tok, recs = toy
    with pytest.raises(ValueError, match="empty"):
        evaluate_set(model, tok, TPL, [], "forget")
    with pytest.raises(ValueError, match="paraphrased_answer"):
        evaluate_set(model, tok, TPL, [{"question": "q", "answer": "a", "perturbed_answer": ["b"]}], "retain")
    ragged = [dict(recs[0]), dict(recs[1], perturbed_answer=recs[1]["perturbed_answer"][:2])]
    with pytest.raises(ValueError, match="same .*number of perturbed"):
        evaluate_set(model, tok, TPL, ragged, "forget", generate=False)
    with pytest.raises(ValueError, match="unknown set names"):
        evaluate_tofu(model, tok, TPL, {"retain_perturbed": recs}, progress=False)
    with pytest.warns(UserWarning, match="truncated"):
        answer_losses(model, tok, TPL, [recs[0]["question"]], [recs[0]["answer"]], max_length=12)


def test_tokenizer_without_pad_token(toy):
    model, tok, recs = toy
    nopad = copy.deepcopy(tok)
    nopad.pad_token = None
    assert nopad.pad_token_id is None
    a = evaluate_set(model, nopad, TPL, recs[:3], "forget", max_new_tokens=4)
    b = evaluate_set(model, tok, TPL, recs[:3], "forget", max_new_tokens=4)
    assert a["gt_loss"] == pytest.approx(b["gt_loss"]) and a["generated_text"] == b["generated_text"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/tofu (the TOFU data) is not present")
def test_load_real_tofu_files():
    from fastgeffect.data.tofu import SPLIT_FIELDS, load_tofu_split

    sizes = {}
    for split in SPLIT_FIELDS:
        rows = load_tofu_split(split, SHARED)
        assert all(f in rows[0] for f in SPLIT_FIELDS[split])
        sizes[split] = len(rows)
    assert sizes["full"] == 4000 and sizes["forget05"] == 200 and sizes["retain_perturbed"] == 400
    assert sizes["real_authors_perturbed"] == 100 and sizes["world_facts_perturbed"] == 117
    for split, n in (("forget01", 40), ("forget05", 200), ("forget10", 400)):
        sets = load_tofu_sets(split, SHARED)
        assert set(sets) == {"retain", "real_authors", "world_facts", "forget"} and len(sets["forget"]) == n
        assert all(len(r["perturbed_answer"]) == 5 for r in sets["forget"])
    assert all(len(r["perturbed_answer"]) == 3 for r in load_tofu_sets("forget01", SHARED)["real_authors"])
    with pytest.raises(ValueError, match="unknown forget split"):
        load_tofu_sets("forget07", SHARED)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/tofu (the TOFU data) is not present")
def test_cli_tofu_on_a_saved_tiny_model(toy, tmp_path):
    from fastgeffect.eval.__main__ import main

    model, tok, _ = toy
    copy.deepcopy(model).float().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    args = ["tofu", "--model", str(tmp_path / "m"), "--split", "forget01", "--data-dir", str(SHARED), "--ds-size", "3",
            "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    logs = load_logs(out)
    assert set(logs) == set(FILES) and all(len(v["avg_gt_loss"]) == 3 for v in logs.values())
    assert main(["aggregate", "--logs", str(out), "--retain-log", str(out / "eval_log_forget.json")]) == 0
    assert json.loads((out / "metrics.json").read_text())["Forget Quality"] == 1.0


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_non_positive_ds_size_is_refused(toy, size):
    """`[:-1]` silently dropped the last row, `[:0]` (falsy) evaluated every row."""
    model, tok, recs = toy
    with pytest.raises(ValueError, match=r"ds_size must be a positive number of rows .*got"):
        evaluate_set(model, tok, TPL, recs[:3], "forget", ds_size=size, generate=False)
    with pytest.raises(ValueError, match="ds_size must be a positive"):
        evaluate_tofu(model, tok, TPL, {"forget": recs[:3]}, ds_size=size, progress=False)
    assert len(evaluate_set(model, tok, TPL, recs[:3], "forget", ds_size=None, generate=False)["gt_loss"]) == 3


@pytest.mark.parametrize("flag, value", [("--ds-size", "-1"), ("--ds-size", "0"), ("--batch-size", "0"),
                                         ("--max-length", "-5"), ("--max-new-tokens", "0"), ("--ds-size", "a")])
def test_cli_refuses_non_positive_counts_as_usage_errors(flag, value, capsys):
    from fastgeffect.eval.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["tofu", "--model", "no/such-model", flag, value])
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, problem", [("answer", None, "'answer' of record 1 is None, not a string"),
                                                   ("perturbed_answer", [], "'perturbed_answer' of record 1 is"),
                                                   ("answer", "missing", "records \\[1\\] lack the field 'answer'")])
def test_bad_record_fields_are_named(toy, field, value, problem):
    model, tok, recs = toy
    bad = [dict(r) for r in recs[:3]]
    if value == "missing":
        del bad[1][field]
    else:
        bad[1][field] = value
    with pytest.raises(ValueError, match=f"forget: .*{problem}"):
        evaluate_set(model, tok, TPL, bad, "forget", generate=False)
    if field == "answer":  # PS scored str(None) = "None" as the answer
        with pytest.raises(ValueError, match=problem):
            ps_scores(model, tok, TPL, bad)


def test_non_finite_model_outputs_are_refused(toy):
    model, tok, recs = toy
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight[5].fill_(math.nan)
    with pytest.raises(ValueError, match=r"forget: the model's answer loss of sample 0 is nan .*not finite"):
        evaluate_set(broken, tok, TPL, recs[:3], "forget", generate=False)


def test_retain_log_is_read_and_checked_before_evaluating(toy, tmp_path):
    """A torn or mismatched retain log fails at once (model=None: nothing is evaluated), naming the file."""
    model, tok, recs = toy
    evaluate_tofu(model, tok, TPL, {"forget": recs[:5]}, out_dir=tmp_path, max_new_tokens=3, progress=False)
    log = tmp_path / "eval_log_forget.json"
    with pytest.raises(ValueError, match=rf"{log}.* has 5 samples but this forget evaluation 3: the same forget "
                                         "split evaluated with another eval size; evaluate with ds_size .*5"):
        evaluate_tofu(None, tok, TPL, {"forget": recs}, retain_log=log, ds_size=3, progress=False)
    with pytest.raises(ValueError, match=r"other ground-truth answers \(samples \[0, 1, 2\]\).*another forget split"):
        evaluate_tofu(None, tok, TPL, {"forget": recs[5:]}, retain_log=log, progress=False)
    log.write_text("")  # what a full disk left before writes were atomic
    with pytest.raises(ValueError, match=rf"{log}: is empty; .*delete it and rerun"):
        evaluate_tofu(None, tok, TPL, {"forget": recs[:5]}, retain_log=log, progress=False)


def test_log_writes_are_atomic_on_a_full_disk(toy, tmp_path):
    """A file-size limit makes every write past 2 kB fail like a full disk: the logs of the earlier
    evaluation stay whole and no temporary is left."""
    model, tok, recs = toy
    evaluate_tofu(model, tok, TPL, {"forget": recs[:2]}, out_dir=tmp_path, max_new_tokens=3, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert all(len(b) < 4096 for b in before.values())
    big = {"eval_log_forget.json": {"avg_gt_loss": {str(i): 1.0 for i in range(500)}}}
    code = ("import resource, signal, sys; from fastgeffect.eval import write_logs; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            f"write_logs({big!r}, sys.argv[1])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert res.returncode != 0 and "cannot write" in res.stderr and "eval_log_forget.json" in res.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_logs(tmp_path)


def test_cli_names_a_missing_or_empty_model_folder(tmp_path, capsys):
    from fastgeffect.eval.__main__ import main

    (tmp_path / "empty").mkdir()
    for model, problem in ((tmp_path / "none", "no such folder"), ("./relative/model", "no such folder"),
                           (tmp_path / "empty", "the folder holds no config.json")):
        assert main(["tofu", "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert f"--model {model}: {problem}" in err and "Repo id" not in err


def test_generation_budget_must_be_positive(toy):
    model, tok, recs = toy
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        greedy_generate(model, tok, [TPL.prompt(recs[0]["question"])], max_new_tokens=0)


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_huge_losses_give_strict_json_logs_and_finite_metrics(toy, tmp_path):
    """A model with ~2e4 nats per token (unlearning can get there): the per-sample truth ratio
    overflows, which TOFU's format wrote as Infinity; here it is null and the metrics stay finite."""
    model, tok, recs = toy
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(1e5)
    res = evaluate_tofu(sharp, tok, TPL, {"retain": recs, "forget": recs, "real_authors": recs, "world_facts": recs},
                        out_dir=tmp_path, max_new_tokens=2, progress=False)
    forget = _strict((tmp_path / "eval_log_forget.json").read_text())
    assert None in forget["truth_ratio"].values() and min(forget["avg_gt_loss"].values()) > 1e3
    for p in tmp_path.glob("*.json"):
        _strict(p.read_text())
    assert all(math.isfinite(v) for v in res["metrics"].values()), res["metrics"]
    assert aggregate(load_logs(tmp_path)) == pytest.approx(res["metrics"])


def test_cli_tofu_never_overwrites_earlier_logs_nor_writes_under_a_hub_name(tmp_path, monkeypatch):
    # the default folder used to hold only ds_size (another split or length overwrote it), and a hub name as
    # --model made ./org/name/eval_results in the current folder, after which that name no longer loaded
    from fastgeffect.eval.__main__ import build_parser, default_out, main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--model org/name is not a local folder or file: give --out"):
        main(["tofu", "--model", "org/name", "--split", "forget01"])
    assert not (tmp_path / "org").exists()
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    parse = build_parser().parse_args
    a, b = (default_out(parse(["tofu", "--model", str(model), "--split", s])) for s in ("forget01", "forget05"))
    assert a != b and a.parent == model / "eval_results" and "forget01" in a.name and "ds300" in a.name
    assert default_out(parse(["tofu", "--model", str(model), "--max-length", "96"])) != \
        default_out(parse(["tofu", "--model", str(model)]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval_log_forget.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"holds TOFU logs already \(eval_log_forget.json\): not overwritten"):
        main(["tofu", "--model", str(model), "--out", str(out)])  # refused before the model is loaded
