"""TOFU aggregation against an independent reference written from TOFU's published formulas."""
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fastgeffect.eval import aggregate, load_logs, load_retain_log
from fastgeffect.eval.__main__ import main as cli

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"
LOGS = SHARED / "retain_model_logs"
FILES = ["eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json", "eval_log_forget.json"]


def synth_log(rng, n, k, answers=None):
    avg_gt = rng.uniform(0.05, 3.0, n)
    para = rng.uniform(0.05, 3.0, n)
    pert = rng.uniform(0.05, 4.0, (n, k))
    log = {
        "avg_gt_loss": {str(i): float(v) for i, v in enumerate(avg_gt)},
        "rougeL_recall": {str(i): float(v) for i, v in enumerate(rng.uniform(0, 1, n))},
        "avg_paraphrased_loss": {str(i): float(v) for i, v in enumerate(para)},
        "average_perturb_loss": {str(i): [float(x) for x in row] for i, row in enumerate(pert)},
    }
    if answers is not None:
        log["generated_text"] = {str(i): ["q", "g", a] for i, a in enumerate(answers)}
    return log


def reference(logs, retain):
    """TOFU's aggregate_eval_stat.py, restated sample by sample."""
    names = {"eval_log.json": "Retain", "eval_real_author_wo_options.json": "Real Authors",
             "eval_real_world_wo_options.json": "Real World", "eval_log_forget.json": "Forget"}
    out = {}

    def ratios(log):
        return [math.exp(sum(log["average_perturb_loss"][i]) / len(log["average_perturb_loss"][i])
                         - log["avg_paraphrased_loss"][i]) for i in log["avg_paraphrased_loss"]]

    for f, log in logs.items():
        idx = list(log["avg_gt_loss"])
        if f in ("eval_log.json", "eval_log_forget.json"):
            prob = sum(math.exp(-log["avg_gt_loss"][i]) for i in idx) / len(idx)
        else:
            vals = []
            for i in idx:
                t = math.exp(-log["avg_gt_loss"][i])
                vals.append(t / (t + sum(math.exp(-x) for x in log["average_perturb_loss"][i])))
            prob = sum(vals) / len(vals)
        rouge = sum(log["rougeL_recall"][i] for i in idx) / len(idx)
        r = ratios(log)
        if f == "eval_log_forget.json":
            tr = sum(min(x, 1 / x) for x in r) / len(r)
        else:
            tr = sum(max(0.0, 1 - 1 / x) for x in r) / len(r)
        out[f"Prob. {names[f]}"], out[f"ROUGE {names[f]}"], out[f"Truth Ratio {names[f]}"] = prob, rouge, tr
    nine = [out[f"{m} {n}"] for n in ("Retain", "Real Authors", "Real World")
            for m in ("ROUGE", "Prob.", "Truth Ratio")]
    out["Model Utility"] = len(nine) / sum(1 / v for v in nine)
    ks = stats.ks_2samp(ratios(logs["eval_log_forget.json"]), ratios(retain))
    out["Forget Quality"] = ks.pvalue
    out["KS Test Forget"] = ks.statistic
    return out


@pytest.fixture
def synth():
    rng = np.random.default_rng(7)
    answers = [f"answer {i}" for i in range(37)]
    logs = {"eval_log.json": synth_log(rng, 53, 5), "eval_real_author_wo_options.json": synth_log(rng, 29, 3),
            "eval_real_world_wo_options.json": synth_log(rng, 31, 3),
            "eval_log_forget.json": synth_log(rng, 37, 5, answers)}
    retain = synth_log(rng, 37, 5, answers)
    return logs, retain


def test_matches_reference(synth):
    logs, retain = synth
    got = aggregate(logs, retain)
    ref = reference(logs, retain)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k
    assert got["log Forget Quality"] == pytest.approx(math.log(ref["Forget Quality"]))
    assert got["KS Test PVal Forget"] == got["Forget Quality"]
    assert len([k for k in got if k.split()[0] in ("Prob.", "ROUGE", "Truth")]) == 12


def logs_folder(tmp_path, logs):
    """A run's evaluation folder holding one file per TOFU log."""
    folder = tmp_path / "run"
    folder.mkdir()
    for f, log in logs.items():
        (folder / f).write_text(json.dumps(log))
    return folder


def test_both_layouts_and_cli(synth, tmp_path):
    logs, retain = synth
    folder = logs_folder(tmp_path, logs)
    (tmp_path / "eval_log_aggregated.json").write_text(json.dumps(logs))
    (tmp_path / "retain.json").write_text(json.dumps({"eval_log_forget.json": retain}))
    a = aggregate(load_logs(folder), load_retain_log(tmp_path / "retain.json"))
    b = aggregate(load_logs(tmp_path / "eval_log_aggregated.json"), retain)
    assert a == b == aggregate(logs, retain)
    out = tmp_path / "m.json"
    assert cli(["aggregate", "--logs", str(folder), "--retain-log", str(tmp_path / "retain.json"),
                "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == pytest.approx(a)


def test_bad_logs(synth, tmp_path):
    logs, retain = synth
    with pytest.raises(ValueError, match="missing TOFU log files"):
        aggregate({k: v for k, v in logs.items() if k != "eval_log.json"})
    partial = aggregate({"eval_log_forget.json": logs["eval_log_forget.json"]}, retain, require_all=False)
    assert "Model Utility" not in partial and "Forget Quality" in partial
    broken = dict(logs["eval_log.json"])
    del broken["rougeL_recall"]
    with pytest.raises(ValueError, match="rougeL_recall"):
        aggregate({**logs, "eval_log.json": broken})
    short = dict(logs["eval_log.json"])
    short["avg_paraphrased_loss"] = dict(list(short["avg_paraphrased_loss"].items())[:-1])
    with pytest.raises(ValueError, match="inconsistent"):
        aggregate({**logs, "eval_log.json": short})
    ragged = json.loads(json.dumps(logs["eval_log.json"]))
    ragged["average_perturb_loss"]["3"] = ragged["average_perturb_loss"]["3"][:2]
    with pytest.raises(ValueError, match="different lengths"):
        aggregate({**logs, "eval_log.json": ragged})
    with pytest.raises(ValueError, match="another forget split"):
        aggregate(logs, logs["eval_log.json"])  # 53 samples vs 37
    other = json.loads(json.dumps(retain))
    other["generated_text"]["5"][2] = "a different answer"
    with pytest.raises(ValueError, match="other ground-truth answers"):
        aggregate(logs, other)
    with pytest.raises(ValueError, match="unknown TOFU log files"):
        aggregate({**logs, "eval_foo.json": {}})
    (tmp_path / "x.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="neither"):
        load_logs(tmp_path / "x.json")
    assert cli(["aggregate", "--logs", str(tmp_path / "x.json")]) == 2


@pytest.mark.skipif(not LOGS.is_dir(), reason="../shared/tofu/retain_model_logs is not present (TOFU's published logs)")
def test_published_retain_logs():
    files = sorted(LOGS.glob("*_eval_log_forget.json"))
    assert len(files) == 12
    for f in files:
        logs = load_logs(f)
        m = aggregate(logs, load_retain_log(f), require_all=False)
        assert m["Forget Quality"] == 1.0 and m["KS Test Forget"] == 0.0  # a log against itself
        r = np.array([v for v in logs["eval_log_forget.json"]["truth_ratio"].values()])
        # TOFU's per-sample truth_ratio is 1/r of the aggregator's statistic
        para = np.array(list(logs["eval_log_forget.json"]["avg_paraphrased_loss"].values()))
        pert = np.array(list(logs["eval_log_forget.json"]["average_perturb_loss"].values())).mean(-1)
        np.testing.assert_allclose(r, np.exp(para - pert), rtol=1e-5)
        assert 0 < m["Truth Ratio Forget"] <= 1 and 0 < m["Prob. Forget"] < 1
    # two retain models of the same split agree in distribution; another split is refused
    a = load_logs(LOGS / "phi_retain95_wd0_eval_log_forget.json")
    fq = aggregate(a, load_retain_log(LOGS / "phi_retain95_wd0.01_eval_log_forget.json"), require_all=False)
    assert fq["Forget Quality"] > 0.01
    with pytest.raises(ValueError, match="another forget split"):
        aggregate(a, load_retain_log(LOGS / "phi_retain90_wd0_eval_log_forget.json"), require_all=False)
    # phi's forget10 log: ground truths equal up to spaces TOFU's decoding moved
    b = load_logs(LOGS / "phi_retain90_wd0_eval_log_forget.json")
    aggregate(b, load_retain_log(LOGS / "llama2-7b_retain90_wd0_eval_log_forget.json"), require_all=False)


@pytest.mark.parametrize("key, sample, value, problem", [
    ("avg_gt_loss", "3", None, "None, not a number"),
    ("rougeL_recall", "0", math.nan, "nan, not a finite number"),
    ("average_perturb_loss", "5", [1.0, math.inf, 1.0, 1.0, 1.0], "inf, not a finite number"),
    ("avg_paraphrased_loss", "2", "0.5", "'0.5', not a number"),
    ("average_perturb_loss", "1", [], "an empty list"),
])
def test_null_or_nan_per_sample_values_are_refused(synth, tmp_path, capsys, key, sample, value, problem):
    logs, retain = synth
    bad = json.loads(json.dumps(logs["eval_log.json"]))
    bad[key][sample] = value
    msg = rf"eval_log.json: '{key}' of sample '{sample}' is {problem}: .*re-evaluate the model"
    with pytest.raises(ValueError, match=msg):
        aggregate({**logs, "eval_log.json": bad})
    nan_retain = json.loads(json.dumps(retain))
    nan_retain["avg_paraphrased_loss"]["4"] = math.nan
    with pytest.raises(ValueError, match="retain model's eval_log_forget.json: 'avg_paraphrased_loss' of sample '4'"):
        aggregate(logs, nan_retain)
    folder = tmp_path / "run"
    folder.mkdir()
    for f, log in {**logs, "eval_log.json": bad}.items():
        (folder / f).write_text(json.dumps(log))  # NaN as NaN, as TOFU's own files may hold it
    assert cli(["aggregate", "--logs", str(folder)]) == 2
    err = capsys.readouterr().err
    assert re.search(msg, err) and str(folder) in err and "Model Utility" not in err
    assert not (folder / "metrics.json").exists()


def test_extreme_losses_give_finite_metrics(synth):
    """The large losses of an unlearned model: no 0/0 (Prob.) and no overflow (Truth Ratio)."""
    logs, _ = synth
    huge = json.loads(json.dumps(logs))
    for log in huge.values():
        for i in log["avg_gt_loss"]:
            log["avg_gt_loss"][i] += 800.0  # exp(-loss) underflows to 0 for every answer
            log["average_perturb_loss"][i] = [x + 800.0 for x in log["average_perturb_loss"][i]]
            log["avg_paraphrased_loss"][i] += 1000.0 * (-1) ** int(i)  # log r ≈ −200 or 1800
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = aggregate(huge)
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in got.values()), got
    for f, name in (("eval_real_author_wo_options.json", "Real Authors"),):
        log = huge[f]
        ref = np.mean([1 / (1 + sum(math.exp(log["avg_gt_loss"][i] - x) for x in log["average_perturb_loss"][i]))
                       for i in log["avg_gt_loss"]])
        assert got[f"Prob. {name}"] == pytest.approx(ref, rel=1e-12)
    n = len(huge["eval_log.json"]["avg_gt_loss"])
    assert got["Truth Ratio Retain"] == pytest.approx((n // 2) / n, rel=1e-12)  # 1 − 1/r: 1 on odd rows, else 0
    assert 0 < got["Truth Ratio Forget"] < 1e-80  # min(r, 1/r) <= e^−200


def test_forget_quality_underflow_writes_null_log(tmp_path, capsys):
    def log(lr):
        one = {str(i): 1.0 for i in range(len(lr))}
        return {"avg_gt_loss": one, "rougeL_recall": one, "avg_paraphrased_loss": one,
                "average_perturb_loss": {str(i): [1.0 + x] for i, x in enumerate(lr)}}

    forget, retain = log(np.linspace(0, 1, 600)), log(np.linspace(2, 3, 600))  # disjoint: p-value 0
    with pytest.warns(UserWarning, match="log Forget Quality is undefined"):
        m = aggregate({"eval_log_forget.json": forget}, retain, require_all=False)
    assert m["Forget Quality"] == 0.0 and m["log Forget Quality"] is None
    (tmp_path / "eval_log_forget.json").write_text(json.dumps(forget))
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    with pytest.warns(UserWarning):
        assert cli(["aggregate", "--partial", "--logs", str(tmp_path), "--retain-log",
                    str(tmp_path / "retain.json")]) == 0
    assert re.search(r"log Forget Quality +undefined", capsys.readouterr().out)
    text = (tmp_path / "metrics.json").read_text()
    assert '"log Forget Quality": null' in text and "Infinity" not in text and "NaN" not in text


def test_retain_log_of_another_eval_size_says_which_size_matches(synth):
    logs, retain = synth  # retain: 37 samples with the same ground truths as the forget log
    first3 = {k: dict(list(v.items())[:3]) for k, v in logs["eval_log_forget.json"].items()}
    with pytest.raises(ValueError, match="has 37 samples but this forget evaluation 3: the same forget split "
                                         r"evaluated with another eval size; evaluate with ds_size .* 37 to match"):
        aggregate({"eval_log_forget.json": first3}, retain, require_all=False)
    no_text = {k: v for k, v in first3.items() if k != "generated_text"}
    with pytest.raises(ValueError, match="the sizes differ.*evaluate with 37 to match.*or it comes from another "
                                         "forget split"):
        aggregate({"eval_log_forget.json": no_text}, retain, require_all=False)
    other = json.loads(json.dumps(first3))
    other["generated_text"]["1"][2] = "another author"
    with pytest.raises(ValueError, match=r"other ground-truth answers \(samples \[1\]\).*another forget split"):
        aggregate({"eval_log_forget.json": other}, retain, require_all=False)


def test_aggregate_cli_never_replaces_metrics_with_fewer(synth, tmp_path, capsys):
    logs, retain = synth
    folder = logs_folder(tmp_path, logs)
    (tmp_path / "retain.json").write_text(json.dumps(retain))
    full = ["aggregate", "--logs", str(folder), "--retain-log", str(tmp_path / "retain.json")]
    assert cli(full) == 0
    metrics = folder / "metrics.json"
    before = metrics.read_text()
    assert len(json.loads(before)) == 17
    assert cli(["aggregate", "--logs", str(folder)]) == 2  # no --retain-log: Forget Quality would be lost
    err = capsys.readouterr().err
    assert str(metrics) in err and "Forget Quality" in err and "--out" in err
    for f in FILES[:3]:
        (folder / f).unlink()
    assert cli(["aggregate", "--partial", "--logs", str(folder)]) == 2  # 3 metrics instead of 17
    assert metrics.read_text() == before
    out = tmp_path / "partial.json"
    assert cli(["aggregate", "--partial", "--logs", str(folder), "--out", str(out)]) == 0  # explicit: written
    assert len(json.loads(out.read_text())) == 3
    assert cli(["aggregate", "--partial", "--logs", str(folder), "--out", str(metrics)]) == 0
    assert len(json.loads(metrics.read_text())) == 3
    metrics.write_text("")  # a torn file holds nothing to keep: recomputed
    assert cli(["aggregate", "--partial", "--logs", str(folder)]) == 0
    assert len(json.loads(metrics.read_text())) == 3 and "replacing a broken file" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b'{"avg_gt_loss": {"0": 0.', "not valid JSON"),
                                              (b'\xff\xfe{}', "not UTF-8")])
def test_a_torn_log_is_named(synth, tmp_path, capsys, content, problem):
    logs, retain = synth
    for f, log in logs.items():
        (tmp_path / f).write_text(json.dumps(log))
    torn = tmp_path / "eval_log_forget.json"
    torn.write_bytes(content)
    for load in (load_logs, load_retain_log):
        with pytest.raises(ValueError, match=rf"{re.escape(str(torn))}: .*{problem}.*delete it and rerun"):
            load(tmp_path)
    assert cli(["aggregate", "--logs", str(tmp_path)]) == 2
    assert str(torn) in capsys.readouterr().err
