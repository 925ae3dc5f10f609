"""``bench_eval.py --quick`` (the tiny embedded target, four rows): every PS row of the table is
the reference's m and score exactly, under each protocol and both question kinds; the fast path
is timed against the reference in the same run."""
import bench_eval


def test_bench_eval_quick(benchmark, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTGEFFECT_CACHE", str(tmp_path))  # builds its own tiny target
    out = benchmark.pedantic(lambda: bench_eval.main(["--quick", "--device", "cpu"]), rounds=1, iterations=1)
    rows = out["PS"]
    assert {(r["set"], r["protocol"]) for r in rows} == {(s, p) for s in bench_eval.SETS for p in bench_eval.PROTOCOLS}
    for r in rows:
        assert r["max abs Δm"] == 0 and r["max abs Δscore"] == 0.0, r
        assert r["reference s"] > 0 and r["new s"] > 0
    printed = capsys.readouterr().out
    assert "### PS" in printed and printed.count("| embedded (tiny) |") == len(rows)
