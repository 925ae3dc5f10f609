"""benchmarks/gpu_suite.py cannot lose its results: every section is written under --out as soon
as it is measured, with the build outcome first; budgets are checked inside the sections. Run on
CPU at tiny shapes (the GPU run itself is the suite, not a test)."""
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

gpu_suite = pytest.importorskip("gpu_suite")
STEMS = [stem for stem, _, _ in gpu_suite.SECTIONS]


def test_cpu_quick_run_writes_every_section_with_correctness_first(tmp_path):
    gpu_suite.main(["--device", "cpu", "--quick", "--no-build", "--out", str(tmp_path), "--budget-s", "60"])
    for i, stem in enumerate(STEMS, 1):
        assert (tmp_path / f"{i:02d}-{stem}.md").read_text().startswith("## ")
        rows = json.loads((tmp_path / f"{i:02d}-{stem}.json").read_text())["rows"]
        assert rows, stem
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.splitlines()[0] == "build: skipped (--no-build)"
    assert "failed:" not in text and "skipped: the suite" not in text
    assert text.index("Correctness against float64") < text.index("Fused token-weighted loss")
    checks = json.loads((tmp_path / "01-correctness.json").read_text())["rows"]
    assert {r["check"].split(" ")[0] for r in checks} == {"fused_linear_token_weighted", "fused_linear_kl",
                                                          "dot_accumulate_"}
    assert all(r["ok"] for r in checks)
    tables = {r["table"] for r in json.loads((tmp_path / "05-geffect.json").read_text())["rows"]}
    assert tables == {"measure", "accumulation", "per-sample", "update"}
    assert "paper" not in (tmp_path / "05-geffect.md").read_text()  # the copy-to-host style only with --paper
    chunks = json.loads((tmp_path / "06-chunks.json").read_text())["rows"]
    assert chunks[0]["default"] and chunks[0]["time_vs_default"] == 1.0
    assert len({r["chunk_rows"] for r in chunks}) == len(chunks) >= 2  # the default against forced sizes


def test_a_spent_budget_still_writes_each_section_saying_so(tmp_path):
    gpu_suite.main(["--device", "cpu", "--no-build", "--out", str(tmp_path), "--budget-s", "0", "--only", "losses,kl"])
    assert sorted(os.listdir(tmp_path)) == ["02-losses.json", "02-losses.md", "03-kl.json", "03-kl.md", "RESULTS.md"]
    assert "budget was used up" in (tmp_path / "03-kl.md").read_text()


def test_out_defaults_to_the_device_machines_out_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_suite.default_out() == str(tmp_path)
    monkeypatch.delenv("OUT")
    assert gpu_suite.default_out().startswith(os.path.join(ROOT, "benchmarks", "suite-"))


def test_deadline_is_checked_inside_a_section():
    import bench_losses
    rows = bench_losses.run("cpu", {"tiny": (16, 100)}, n_tokens=16, methods=("eager", "ours"), reps=1,
                            subprocess_cpu=False, deadline=time.perf_counter() - 1)
    assert [r["skipped"] for r in rows] == ["time budget used up"] * 2
    assert bench_losses.run_kl("cpu", {"tiny": (16, 100)}, n_tokens=16, reps=1, deadline=time.perf_counter() - 1) == []


def test_a_failed_build_is_the_first_line(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_suite, "ROOT", str(tmp_path))  # nothing to install there
    line = gpu_suite.build_extension(timeout_s=120)
    assert line.startswith("build: FAILED (rc ")
