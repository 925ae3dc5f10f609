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
