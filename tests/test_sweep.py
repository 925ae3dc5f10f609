"""Sweeps: a grid of runs sharing the target and reference artefacts, one UWC-calibrated table."""
import json
import os

import pytest

from fastgeffect.sweep import main


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGEFFECT_CACHE", str(tmp_path / "cache"))


def test_method_comparison_table_and_reuse(tmp_path):
    out = tmp_path / "sweep"
    args = ["--methods", "ga,tnpo", "--out", str(out), "--", "--size", "tiny", "--epochs", "2", "--no-progress"]
    assert main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["ga", "tnpo"]
    for r in rows:
        m = r["metrics"]
        assert 0 <= m["uwc alpha"] <= 1 and "uwc PS-exact forget" in m and "Model Utility" in m
    # the reference log-probs and the evaluation before unlearning were computed once, in shared/
    assert (out / "shared" / "ref_logprobs_forget.pt").exists()
    assert (out / "shared" / "metrics_before.json").exists()
    assert not (out / "ga" / "ref_logprobs_forget.pt").exists()
    table = (out / "sweep.md").read_text()
    assert "PS-exact unlearn ↓" in table and "| tnpo |" in table
    stamp = os.path.getmtime(out / "tnpo" / "summary.md")
    assert main(args) == 0  # finished runs are reused, not redone
    assert os.path.getmtime(out / "tnpo" / "summary.md") == stamp


def test_grid_names_and_bad_input(tmp_path):
    out = tmp_path / "grid"
    assert main(["--method", "wga", "--alpha", "0.5,2", "--out", str(out), "--", "--size", "tiny", "--epochs", "1",
                 "--eval", "none", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["shared", "wga-alpha0.5", "wga-alpha2"]
    cfg = json.loads((out / "wga-alpha2" / "config.json").read_text())
    assert cfg["alpha"] == 2.0
    with pytest.raises(SystemExit, match="unknown method"):
        main(["--methods", "ga,bogus", "--out", str(out)])
    with pytest.raises(SystemExit, match="comma-separated numbers"):
        main(["--alpha", "a,b", "--out", str(out)])
