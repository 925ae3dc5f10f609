"""The loss benchmark and the GPU suite scripts run end to end on CPU at tiny shapes (numbers are
not checked, only that every method computes the same loss and the table is written)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

bench_losses = pytest.importorskip("bench_losses")


def test_bench_losses_rows_agree_on_the_loss():
    rows = bench_losses.run("cpu", {"tiny": (32, 500)}, n_tokens=64,
                            methods=("eager", "torch_chunked", "ours", "floor"), reps=1, subprocess_cpu=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"eager", "torch_chunked", "ours", "floor"}
    assert by["ours"]["loss"] == pytest.approx(by["eager"]["loss"], rel=1e-4)
    if "skipped" not in by["torch_chunked"]:
        assert by["torch_chunked"]["loss"] == pytest.approx(by["eager"]["loss"], rel=1e-4)
    assert by["ours"]["ms"] > 0 and "time_vs_eager" in by["ours"]
    kl = bench_losses.run_kl("cpu", {"tiny": (32, 500)}, n_tokens=64, reps=1)
    assert kl[0]["loss"] == pytest.approx(kl[1]["loss"], rel=1e-4)
    assert "| ours |" in bench_losses.format_table(rows)


def test_gpu_suite_writes_its_table(tmp_path):
    import gpu_suite
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the suite is the real run, not a unit test")
    gpu_suite.main(["--device", "cpu", "--quick", "--no-build", "--out", str(tmp_path)])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "CPU check run at small shapes" in text and "Fused token-weighted loss" in text
    assert "| ours |" in text and "failed:" not in text.split("## Grouped dot")[0]
