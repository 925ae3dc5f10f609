"""The study documents' tables are rebuilt from their committed logs by their own scripts."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "docs" / "studies"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def steer():
    return load_script("smollm2_steer_tables")


def test_steer_document_holds_the_tables_its_logs_give(steer):
    assert steer.main(["--check"]) == 0


def test_steer_check_sees_a_changed_log(steer, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(steer.RUNS, runs)
    doc = tmp_path / "doc.md"
    shutil.copy(steer.DOC, doc)
    assert steer.main(["--check", "--runs", str(runs), "--doc", str(doc)]) == 0
    after = runs / "ga-none" / "metrics_after.json"
    metrics = json.loads(after.read_text())
    metrics["PS-exact forget"] += 0.125
    after.write_text(json.dumps(metrics))
    assert steer.main(["--check", "--runs", str(runs), "--doc", str(doc)]) == 1
    assert steer.main(["--write", "--runs", str(runs), "--doc", str(doc)]) == 0
    assert steer.main(["--check", "--runs", str(runs), "--doc", str(doc)]) == 0
    assert doc.read_text() != steer.DOC.read_text()


def test_steer_tables_read_every_run(steer):
    tables = steer.build()
    for _, label in steer.SPECS:
        assert f"| {label} |" in tables["metrics"], label
    for _, label in steer.SECOND_ORDER_RUNS:
        assert f"| {label} |" in tables["second-order"], label


def test_steer_refuses_a_missing_runs_folder(steer, tmp_path):
    assert steer.main(["--check", "--runs", str(tmp_path / "nowhere")]) == 2


@pytest.fixture(scope="module")
def privacy():
    return load_script("smollm2_privacy_tables")


def test_privacy_document_holds_the_tables_its_logs_give(privacy):
    assert privacy.main(["--check"]) == 0


def test_privacy_check_sees_a_changed_log(privacy, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(privacy.LOGS, logs)
    doc = tmp_path / "doc.md"
    shutil.copy(privacy.DOC, doc)
    assert privacy.main(["--check", "--logs", str(logs), "--doc", str(doc)]) == 0
    attacks = logs / "npo-uwc" / "attacks.json"
    res = json.loads(attacks.read_text())
    res["quantize"]["rows"][-1]["nll"] += 0.5
    attacks.write_text(json.dumps(res))
    assert privacy.main(["--check", "--logs", str(logs), "--doc", str(doc)]) == 1
    assert privacy.main(["--write", "--logs", str(logs), "--doc", str(doc)]) == 0
    assert privacy.main(["--check", "--logs", str(logs), "--doc", str(doc)]) == 0
    assert doc.read_text() != privacy.DOC.read_text()


def test_privacy_tables_refuse_scores_that_do_not_give_the_reported_auc(privacy, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(privacy.LOGS, logs)
    scores = logs / "ga-none" / "mia_scores_after.json"
    res = json.loads(scores.read_text())
    res["per_sample"]["mia_loss"]["forget_scores"].reverse()
    res["per_sample"]["mia_loss"]["forget_scores"][0] = 1e9  # a member now scores as the least likely row
    scores.write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="do not give the reported AUC"):
        privacy.build(logs)


def test_privacy_tables_read_every_model(privacy):
    tables = privacy.build()
    for label in ("Target (before unlearning)", "GA", "NPO", "Retain twin"):
        assert f"| {label}" in tables["mia"], label
    for label in ("GA + UWC", "NPO + UWC"):
        assert f"| {label}" in tables["relearn"] and f"| {label}" in tables["quantize"], label


def test_privacy_bootstrap_equals_roc_auc_on_each_resample(privacy):
    """The vectorised resampled AUCs (pair matrix × draw counts) against scikit-learn's AUC of the
    explicit resamples, with tied scores."""
    import numpy as np
    rng = np.random.default_rng(7)
    f = rng.integers(0, 6, 13).astype(float)  # few distinct values: ties within and across sets
    h = rng.integers(2, 9, 9).astype(float)
    fast = privacy.resampled_aucs(f, h)
    draws = np.random.default_rng(privacy.SEED)
    fi = draws.integers(0, len(f), (privacy.RESAMPLES, len(f)))
    hi = draws.integers(0, len(h), (privacy.RESAMPLES, len(h)))
    for b in range(0, privacy.RESAMPLES, 97):
        assert abs(fast[b] - privacy.auc_of(f[fi[b]], h[hi[b]])) <= 1e-12, b
    assert len(set(np.round(fast, 9))) > 10  # the resamples differ
