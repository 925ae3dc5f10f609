"""open-unlearning's files: TOFU_EVAL.json / TOFU_SUMMARY.json written from our logs, and a retain
model's TOFU_EVAL.json read as the reference of Forget Quality and PrivLeak."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fastgeffect.eval import aggregate, load_retain_log, privleak_reference, write_open_unlearning
from fastgeffect.eval.__main__ import main as cli
from fastgeffect.eval.aggregate import check_retain_log

TOFU_FILES = ("eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json",
              "eval_log_forget.json")


def synth_log(rng, n, k, questions=None, answers=None):
    log = {
        "avg_gt_loss": {str(i): float(v) for i, v in enumerate(rng.uniform(0.05, 3.0, n))},
        "rouge1_recall": {str(i): float(v) for i, v in enumerate(rng.uniform(0, 1, n))},
        "rougeL_recall": {str(i): float(v) for i, v in enumerate(rng.uniform(0, 1, n))},
        "avg_paraphrased_loss": {str(i): float(v) for i, v in enumerate(rng.uniform(0.05, 3.0, n))},
        "average_perturb_loss": {str(i): [float(x) for x in row] for i, row in enumerate(rng.uniform(0.05, 4, (n, k)))},
    }
    if answers is not None:
        log["generated_text"] = {str(i): [f"Question: {q}\nAnswer:", "some generation", a]
                                 for i, (q, a) in enumerate(zip(questions, answers))}
    return log


QUESTIONS = [f"Where was author {i} born?" for i in range(23)]
ANSWERS = [f"Author {i} was born in town {i}." for i in range(23)]


@pytest.fixture
def synth():
    rng = np.random.default_rng(3)
    logs = {"eval_log.json": synth_log(rng, 31, 5), "eval_real_author_wo_options.json": synth_log(rng, 17, 3),
            "eval_real_world_wo_options.json": synth_log(rng, 19, 3),
            "eval_log_forget.json": synth_log(rng, 23, 5, QUESTIONS, ANSWERS)}
    retain = synth_log(rng, 23, 5, QUESTIONS, ANSWERS)
    return logs, retain


def _read(path):
    return json.loads(path.read_text())


def test_summary_values_are_our_metrics_under_their_names(synth, tmp_path):
    logs, retain = synth
    metrics = aggregate(logs, retain)
    write_open_unlearning(tmp_path, logs, metrics)
    ou, summary = _read(tmp_path / "TOFU_EVAL.json"), _read(tmp_path / "TOFU_SUMMARY.json")
    names = {"Forget Quality": "forget_quality", "Model Utility": "model_utility",
             "ROUGE Forget": "forget_Q_A_ROUGE", "Prob. Forget": "forget_Q_A_Prob",
             "Truth Ratio Forget": "forget_truth_ratio", "ROUGE Retain": "retain_Q_A_ROUGE",
             "Prob. Retain": "retain_Q_A_Prob", "Truth Ratio Retain": "retain_Truth_Ratio",
             "ROUGE Real Authors": "ra_Q_A_ROUGE", "Prob. Real Authors": "ra_Q_A_Prob_normalised",
             "Truth Ratio Real Authors": "ra_Truth_Ratio", "ROUGE Real World": "wf_Q_A_ROUGE",
             "Prob. Real World": "wf_Q_A_Prob_normalised", "Truth Ratio Real World": "wf_Truth_Ratio"}
    for ours, theirs in names.items():
        assert summary[theirs] == pytest.approx(metrics[ours], rel=1e-12, abs=1e-12), theirs
    assert summary == {k: v["agg_value"] for k, v in ou.items() if v["agg_value"] is not None}
    assert list(ou) == sorted(ou)  # open-unlearning's save_logs sorts the metrics

    # open-unlearning's own definitions, restated from the per-index entries it would read
    def ou_truth_ratios(prefix, name):
        para, pert = ou[f"{prefix}_Q_A_PARA_Prob"]["value_by_index"], ou[f"{prefix}_Q_A_PERT_Prob"]["value_by_index"]
        return np.array([math.exp(-np.mean(pert[i]["avg_loss"])) / (math.exp(-para[i]["avg_loss"]) + 1e-10)
                         for i in para]), ou[name]["value_by_index"]

    tr, vbi = ou_truth_ratios("forget", "forget_truth_ratio")
    assert [vbi[str(i)]["score"] for i in range(len(tr))] == pytest.approx(tr, rel=1e-8)
    assert summary["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(tr, 1 / (tr + 1e-10))), rel=1e-8)
    tr, _ = ou_truth_ratios("retain", "retain_Truth_Ratio")
    assert summary["retain_Truth_Ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - tr)), rel=1e-8, abs=1e-12)
    nine = [summary[f"{p}_{m}"] for p, prob in (("retain", "Q_A_Prob"), ("ra", "Q_A_Prob_normalised"),
                                                ("wf", "Q_A_Prob_normalised"))
            for m in (prob, "Q_A_ROUGE", "Truth_Ratio")]
    assert summary["model_utility"] == pytest.approx(stats.hmean(nine), rel=1e-12)
    gt = logs["eval_log_forget.json"]["avg_gt_loss"]
    assert ou["forget_Q_A_Prob"]["value_by_index"]["4"] == {"prob": pytest.approx(math.exp(-gt["4"])),
                                                            "avg_loss": gt["4"]}
    rouge = ou["forget_Q_A_ROUGE"]["value_by_index"]["2"]
    assert rouge["ground_truth"] == ANSWERS[2] and QUESTIONS[2] in rouge["input"]
    assert rouge["rougeL_recall"] == logs["eval_log_forget.json"]["rougeL_recall"]["2"]


def test_round_trip_forget_quality_of_a_run_against_itself_is_one(synth, tmp_path):
    logs, retain = synth
    write_open_unlearning(tmp_path / "self", logs)
    path = tmp_path / "self" / "TOFU_EVAL.json"
    for source in (path, path.parent, _read(path)):
        assert aggregate(logs, load_retain_log(source))["Forget Quality"] == 1.0
    # another model's log: the same Forget Quality from its TOFU log and from its open-unlearning file
    write_open_unlearning(tmp_path / "retain", {"eval_log_forget.json": retain})
    from_ou = load_retain_log(tmp_path / "retain" / "TOFU_EVAL.json")
    assert from_ou["avg_paraphrased_loss"] == retain["avg_paraphrased_loss"]
    assert from_ou["average_perturb_loss"] == retain["average_perturb_loss"]
    assert aggregate(logs, from_ou)["Forget Quality"] == aggregate(logs, retain)["Forget Quality"]
    assert privleak_reference(from_ou) is None and privleak_reference(tmp_path / "nothing.json") is None


def test_hand_written_open_unlearning_file_with_scores_only(synth, tmp_path):
    logs, _ = synth
    rng = np.random.default_rng(11)
    scores = rng.uniform(0.05, 3.0, 23)
    ou = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {str(i): {"score": float(s)}
                                                                     for i, s in enumerate(scores)}},
          "forget_Q_A_ROUGE": {"agg_value": 0.4, "value_by_index": {
              str(i): {"rougeL_recall": 0.4, "input": f"<|user|>{q}<|assistant|>", "generation": "x", "ground_truth": a}
              for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))}},
          "mia_min_k": {"agg_value": 0.37}, "model_utility": {"agg_value": 0.5}}
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(ou))
    retain = load_retain_log(path)
    fq = aggregate(logs, retain)["Forget Quality"]
    f = logs["eval_log_forget.json"]
    ours = [np.mean(f["average_perturb_loss"][i]) - f["avg_paraphrased_loss"][i] for i in f["avg_paraphrased_loss"]]
    assert fq == pytest.approx(stats.ks_2samp(np.exp(ours), 1 / scores).pvalue, rel=1e-12)
    assert privleak_reference(retain) == privleak_reference(ou) == privleak_reference(path) == 0.37
    assert privleak_reference(tmp_path) == 0.37  # the folder holding TOFU_EVAL.json
    check_retain_log(retain, 23, ANSWERS, questions=QUESTIONS)  # the same rows: accepted
    # the CLI's aggregate reads it too
    folder = tmp_path / "run"
    folder.mkdir()
    for name, log in logs.items():
        (folder / name).write_text(json.dumps(log))
    assert cli(["aggregate", "--logs", str(folder), "--retain-log", str(path)]) == 0
    assert _read(folder / "metrics.json")["Forget Quality"] == pytest.approx(fq)


def _ou_file(tmp_path, n=23, questions=QUESTIONS, answers=ANSWERS, **change):
    vbi = {str(i): {"score": 1.0 + i / 10} for i in range(n)}
    rouge = {str(i): {"rougeL_recall": 1.0, "input": f"Q: {q}", "generation": a, "ground_truth": a}
             for i, (q, a) in enumerate(zip(questions[:n], answers[:n]))}
    ou = {"forget_truth_ratio": {"agg_value": 0.5, "value_by_index": vbi},
          "forget_Q_A_ROUGE": {"agg_value": 1.0, "value_by_index": rouge}}
    for k, v in change.items():
        ou[k] = v
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(ou))
    return path


def test_a_file_for_other_rows_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has 22 samples but this forget evaluation 23"):
        check_retain_log(load_retain_log(_ou_file(tmp_path, n=22)), 23, ANSWERS, questions=QUESTIONS)
    other_answers = ANSWERS[:5] + ["Someone else entirely."] + ANSWERS[6:]
    with pytest.raises(ValueError, match=r"other ground-truth answers \(samples \[5\]\)"):
        check_retain_log(load_retain_log(_ou_file(tmp_path, answers=other_answers)), 23, ANSWERS)
    other_questions = QUESTIONS[:7] + ["Who painted the ceiling?"] + QUESTIONS[8:]
    with pytest.raises(ValueError, match=r"inputs of indices \[7\] do not hold this evaluation's forget questions"):
        check_retain_log(load_retain_log(_ou_file(tmp_path, questions=other_questions)), 23, ANSWERS,
                         questions=QUESTIONS)
    shifted = {"agg_value": 1.0, "value_by_index": {str(i + 1): {"score": 1.0} for i in range(23)}}
    with pytest.raises(ValueError, match="not 0 ... 22: it was evaluated on other rows"):
        load_retain_log(_ou_file(tmp_path, forget_truth_ratio=shifted))


@pytest.mark.parametrize("change, problem", [
    ({"forget_truth_ratio": {"agg_value": 0, "value_by_index": {"0": {"score": 0.0}}}},
     "score of index 0 is 0.0, not a positive finite number"),
    ({"mia_min_k": {"agg_value": 1.5}}, "mia_min_k agg_value is 1.5, not an AUC"),
    ({"forget_Q_A_PARA_Prob": {"value_by_index": {"0": {"avg_loss": 1.0}}},
      "forget_Q_A_PERT_Prob": {"value_by_index": {"0": {"avg_loss": [1.0, None]}}}},
     r"forget_Q_A_PERT_Prob avg_loss of index 0 is None"),
])
def test_bad_open_unlearning_values_are_named(tmp_path, change, problem):
    with pytest.raises(ValueError, match=problem):
        load_retain_log(_ou_file(tmp_path, **change))


def test_extra_metrics_are_written_under_their_names(synth, tmp_path):
    logs, _ = synth
    extra = {"privleak": -12.5, "mia_min_k": {"agg_value": 0.61, "value_by_index": {"0": {"score": 0.2}}},
             "extraction_strength": None}
    ou = write_open_unlearning(tmp_path, logs, None, extra)
    summary = _read(tmp_path / "TOFU_SUMMARY.json")
    assert summary["privleak"] == -12.5 and summary["mia_min_k"] == 0.61 and "extraction_strength" not in summary
    assert _read(tmp_path / "TOFU_EVAL.json")["mia_min_k"]["value_by_index"] == {"0": {"score": 0.2}}
    assert ou["extraction_strength"] == {"agg_value": None} and "forget_quality" not in ou
    with pytest.raises(ValueError, match="extra metric 'mia_loss'"):
        write_open_unlearning(tmp_path / "bad", logs, None, {"mia_loss": "high"})
    assert not (tmp_path / "bad").exists()  # refused before anything is written


SHARED_LOGS = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu" / "retain_model_logs"


@pytest.mark.skipif(not SHARED_LOGS.is_dir(), reason="../shared/tofu/retain_model_logs (TOFU's logs) is absent")
def test_tofus_published_retain_log_through_open_unlearning_gives_the_same_forget_quality(tmp_path):
    retain = load_retain_log(SHARED_LOGS / "phi_retain95_wd0_eval_log_forget.json")
    model = load_retain_log(SHARED_LOGS / "llama2-7b_retain95_wd0_eval_log_forget.json")
    write_open_unlearning(tmp_path, {"eval_log_forget.json": retain})
    from_ou = load_retain_log(tmp_path / "TOFU_EVAL.json")
    logs = {"eval_log_forget.json": model}
    assert aggregate(logs, from_ou, require_all=False)["Forget Quality"] == \
        aggregate(logs, retain, require_all=False)["Forget Quality"]


def test_evaluate_tofu_refuses_an_open_unlearning_log_of_other_rows_before_writing(tmp_path):
    from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for

    from fastgeffect.data.templates import get_template
    from fastgeffect.eval import evaluate_tofu

    tpl = get_template("phi")
    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, tpl)
    model = tiny_llama(len(tok), hidden_size=24, layers=2, heads=2, seed=3, tokenizer=tok)
    forget = recs[4:]
    sets = {"forget": forget}
    run = evaluate_tofu(model, tok, tpl, sets, out_dir=tmp_path / "run", max_new_tokens=4, progress=False)
    write_open_unlearning(tmp_path / "twin", run["logs"])
    again = evaluate_tofu(model, tok, tpl, sets, retain_log=tmp_path / "twin" / "TOFU_EVAL.json", max_new_tokens=4,
                          progress=False)
    assert again["metrics"]["Forget Quality"] == 1.0  # the same model as its own twin
    ou = _read(tmp_path / "twin" / "TOFU_EVAL.json")
    first = ou["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    first["input"] = first["input"].replace(forget[0]["question"], "Who painted the ceiling?")
    (tmp_path / "other.json").write_text(json.dumps(ou))
    with pytest.raises(ValueError, match=r"inputs of indices \[0\] do not hold this evaluation's forget questions"):
        evaluate_tofu(model, tok, tpl, sets, out_dir=tmp_path / "refused", retain_log=tmp_path / "other.json",
                      progress=False)
    assert not (tmp_path / "refused").exists()
