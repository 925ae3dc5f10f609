"""``benchmarks/bench_eval.py --quick`` (the tiny embedded target, four rows), run by the test suite:
every PS row is the reference's m and score exactly, under each protocol and both question kinds,
and the TOFU-metric and UWC section compares both paths on the same inputs with the same numbers
(times are printed, never checked)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_eval  # noqa: E402


def test_bench_eval_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTGEFFECT_CACHE", str(tmp_path))  # builds its own tiny target
    out = bench_eval.main(["--quick", "--device", "cpu"])
    rows = out["PS"]
    assert {(r["set"], r["protocol"]) for r in rows} == {(s, p) for s in bench_eval.SETS for p in bench_eval.PROTOCOLS}
    for r in rows:
        assert r["max abs Δm"] == 0 and r["max abs Δscore"] == 0.0, r
        assert r["reference s"] > 0 and r["new s"] > 0
    tofu = out["TOFU metrics and UWC"]
    assert [r["what"].split(" embedded")[0] for r in tofu if "embedded" in r["what"]] == \
        ["TOFU metrics", "TOFU metrics", "UWC calibration"]
    for r in tofu:
        assert float(r["reference s"]) > 0 and float(r["new s"]) > 0 and "NO" not in r["largest difference"], r
        assert r["generations identical"] in ("yes", ""), r
    uwc = tofu[-1]
    a, b = uwc["α"].split(" / ")
    assert a == b and "θ_u restored bitwise: yes" in uwc["largest difference"]
    printed = capsys.readouterr().out
    assert "### PS" in printed and "### TOFU metrics and UWC" in printed
