"""The driver's privacy and memorisation metrics (--eval-metrics) and attacks (--attacks) on the tiny
embedded target: every key written, the numbers equal to the library's on the same rows, bad input
refused before anything is written."""
import json
import math
from pathlib import Path

import pytest

from fastgeffect.attacks.report import FILE as ATTACKS_FILE
from fastgeffect.data.templates import get_template
from fastgeffect.embedded import build_embedded
from fastgeffect.eval.memorization import memorization_scores
from fastgeffect.eval.mia import ATTACKS, mia_report
from fastgeffect.eval.privleak import privleak
from fastgeffect.run import main

pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module

AUCS = tuple(ATTACKS)  # mia_loss, mia_zlib, mia_min_k, mia_min_k_plus_plus, mia_reference, mia_gradnorm
KEYS = AUCS + ("privleak", "exact_memorization", "extraction_strength")


def run(out, *extra):
    return main(["--size", "tiny", "--out", str(out), "--no-progress", "--epochs", "1", *extra])


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_all_metrics_and_both_attacks_are_written(tmp_path):
    out = tmp_path / "ga"
    assert run(out, "--method", "ga", "--eval-metrics", "all", "--attacks", "relearn,quantize") == 0
    for name in ("metrics_before.json", "metrics_after.json", "metrics_uwc.json"):
        metrics = _read(out / name)
        missing = [k for k in KEYS if k not in metrics]
        assert not missing, (name, missing)
        for k in AUCS:
            assert 0.0 <= metrics[k] <= 1.0, (name, k, metrics[k])
        assert math.isfinite(metrics["privleak"])
        assert metrics["privleak"] == pytest.approx(
            privleak(metrics["mia_min_k"], _read(out / "eval_after" / "mia_scores.json")["reference_auc"]), abs=1e-12)
    for folder in ("eval_before", "eval_after", "eval_uwc"):
        scores = _read(out / folder / "mia_scores.json")["per_sample"]
        assert set(scores) == set(AUCS)
    attacks = _read(out / ATTACKS_FILE)
    relearn = attacks["relearn"]
    assert [r["step"] for r in relearn["target"]] == [0, 1, 2, 4, 8, 16]
    assert relearn["twin"] is not None and len(relearn["gap"]) == 6  # the retain twin is the control
    assert [(r["bits"], r["granularity"]) for r in attacks["quantize"]["rows"]] == [
        (None, "none"), (8, "per_channel"), (8, "group128"), (4, "per_channel"), (4, "group128")]
    summary = (out / "summary.md").read_text()
    assert "## Attacks" in summary and "PrivLeak against the retain twin" in summary
    for k in ("mia_gradnorm", "privleak", "exact_memorization"):
        assert f"| {k} |" in summary
    cfg = _read(out / "config.json")
    assert cfg["privleak"].startswith("PrivLeak against the retain twin")


def test_the_metrics_are_the_librarys_on_the_evaluated_rows(tmp_path):
    """The driver's numbers before unlearning equal the library's, called here on the target, its
    twin and the same rows: the first --eval-size forget rows against as many holdout rows."""
    out = tmp_path / "npo"
    assert run(out, "--method", "npo", "--eval-metrics", "all", "--eval-size", "4", "--no-uwc") == 0
    emb = build_embedded(None, size="tiny")
    data = Path(emb.data_dir)
    forget = [json.loads(line) for line in (data / "forget10.json").read_text().splitlines()][:4]
    holdout = [json.loads(line) for line in (data / "holdout10.json").read_text().splitlines()][:4]
    target, twin = emb.load_target(), emb.load_retain()
    tpl = get_template("phi") if emb.template is None else emb.template
    before = _read(out / "metrics_before.json")
    max_length = _read(out / "eval_before" / "mia_scores.json")["max_length"]  # every row whole (mia_length)
    tpl0 = emb.template
    whole = max(len(emb.tokenizer(tpl0.full(r["question"], r["answer"]))["input_ids"]) + 1 for r in forget + holdout)
    assert max_length == max(emb.max_length, whole)  # every row scored whole, none cut
    lib = mia_report(target, emb.tokenizer, tpl, forget, holdout, reference_model=twin, max_length=max_length)
    for k in AUCS:
        assert before[k] == pytest.approx(lib[k], abs=1e-9), k
    ref = mia_report(twin, emb.tokenizer, tpl, forget, holdout, attacks=["mia_min_k"], max_length=max_length)
    assert before["privleak"] == pytest.approx(privleak(lib["mia_min_k"], ref["mia_min_k"]), abs=1e-9)
    mem = memorization_scores(target, emb.tokenizer, tpl, forget, max_length=emb.max_length)
    assert before["exact_memorization"] == pytest.approx(mem["em"], abs=1e-12)
    assert before["extraction_strength"] == pytest.approx(mem["es"], abs=1e-12)


def test_the_default_metrics_and_a_selection(tmp_path):
    out = tmp_path / "default"
    assert run(out, "--method", "ga", "--no-uwc") == 0
    after = _read(out / "metrics_after.json")
    assert {"privleak", "mia_min_k", "exact_memorization", "extraction_strength", "Model Utility"} <= set(after)
    assert not {"mia_loss", "mia_gradnorm"} & set(after)  # the other attacks only with mia / all
    out = tmp_path / "memorization"
    assert run(out, "--method", "ga", "--no-uwc", "--eval-metrics", "memorization") == 0
    after = _read(out / "metrics_after.json")
    assert "exact_memorization" in after and "PS-exact forget" in after
    assert not {"privleak", "Model Utility", "mia_min_k"} & set(after)


@pytest.mark.parametrize("flags, message", [
    (["--eval-metrics", "tofu,nope"], "--eval-metrics: unknown 'nope'"),
    (["--attacks", "relearn,prune"], "--attacks: unknown 'prune'"),
    (["--relearn-steps", "1,2"], "--relearn-steps and --relearn-lr need --attacks relearn"),
    (["--attacks", "relearn", "--relearn-steps", "4,2"], "strictly increasing"),
    (["--attacks", "relearn", "--relearn-steps", "a"], "comma-separated integers"),
    (["--eval", "none", "--attacks", "quantize"], "need --eval full"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as stop:
        run(out, *flags)
    said = f"{stop.value.code} {capsys.readouterr().err}"  # a usage error prints, a refusal carries its message
    assert message in said, said
    assert not out.exists()
