"""Sweeps: a grid of runs sharing the target and reference artefacts, one UWC-calibrated table."""
import json
import os
from pathlib import Path

import pytest

from fastgeffect.report.tables import fmt
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


def tiny(out, *sweep, extra=()):
    return main([*sweep, "--out", str(out), "--", "--size", "tiny", "--epochs", "1", "--eval", "none",
                 "--no-progress", *extra])


def test_rerun_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "grid"
    two = ["--epochs", "2"]
    assert tiny(out, "--method", "wga", "--alpha", "0.5", extra=[*two, "--stop-at-step", "1"]) == 0
    assert not (out / "wga-alpha0.5" / "summary.md").exists()  # interrupted
    assert json.loads((out / "runs.json").read_text())["wga-alpha0.5"][:2] == ["--method", "wga"]
    assert tiny(out, "--method", "wga", "--alpha", "0.5", extra=two) == 0  # the same settings: resumed
    assert (out / "wga-alpha0.5" / "summary.md").exists()
    config = (out / "wga-alpha0.5" / "config.json").read_text()
    for sweep, extra, named in ((["--seed", "1"], two, "--seed 0 → 1"),
                                (["--regularizer", "gd"], two, "--regularizer 'none' → 'gd'"),  # resolved: wga's own
                                ([], ["--epochs", "3"], "--epochs 2 → 3")):
        with pytest.raises(SystemExit, match=f"holds a run with other settings \\({named}\\); nothing was run"):
            tiny(out, "--method", "wga", "--alpha", "0.5", *sweep, extra=extra)
        assert (out / "wga-alpha0.5" / "config.json").read_text() == config
    # --overwrite reruns with the new settings, which are then reused
    assert tiny(out, "--method", "wga", "--alpha", "0.5", "--seed", "1", extra=["--overwrite"]) == 0
    assert json.loads((out / "wga-alpha0.5" / "config.json").read_text())["seed"] == 1
    stamp = os.path.getmtime(out / "wga-alpha0.5" / "summary.md")
    assert tiny(out, "--method", "wga", "--alpha", "0.5", "--seed", "1") == 0
    assert os.path.getmtime(out / "wga-alpha0.5" / "summary.md") == stamp
    (out / "wga-alpha0.5" / "metrics_after.json").write_text("")  # a reused run's results are read strictly
    with pytest.raises(SystemExit, match="wga-alpha0.5/metrics_after.json is not valid JSON"):
        tiny(out, "--method", "wga", "--alpha", "0.5", "--seed", "1")


def test_whole_grid_is_checked_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "grid"
    with pytest.raises(SystemExit, match=r"run ga-beta4 would fail: unknown hyper-parameter\(s\) \['beta'\]"):
        tiny(out, "--methods", "tnpo,ga", "--beta", "4")
    with pytest.raises(SystemExit, match="the run flags after -- are invalid"):
        tiny(out, "--method", "wga", "--alpha", "1", extra=["--epochs", "x"])
    assert "--epochs: invalid int value" in capsys.readouterr().err
    for sweep, extra, message in ((["--alpha", ""], [], "--alpha: empty grid"),
                                  (["--alpha", ","], [], "--alpha: empty grid"),
                                  (["--alpha", "1,1.0"], [], "--alpha: 1.0 and 1.0 are the same setting"),
                                  (["--alpha", "0.1,0.1000001"], [], "are the same setting \\(run alpha0.1\\)"),
                                  (["--alpha", "nan"], [], "--alpha: nan is not a finite number"),
                                  (["--methods", "ga,ga"], [], "--methods: ga given twice"),
                                  (["--methods", ""], [], "--methods: empty list"),
                                  (["--alpha", "1"], ["--seed", "3"], "--seed is set by the sweep"),
                                  (["--seeds", "0,1,0"], [], "--seeds: 0 given twice"),
                                  (["--seeds", "0,x"], [], "--seeds: expected comma-separated integers"),
                                  (["--seeds", ","], [], "--seeds: empty list"),
                                  (["--alpha", "1"], ["--target-seed", "3"], "--target-seed is set by the sweep"),
                                  (["--target-seed", "1"], ["--model", "m"], "--target-seed needs the embedded target"),
                                  (["--alpha", "1"], ["--out", "x"], "--out is set by the sweep"),
                                  (["--alpha", "1"], ["--alpha=2"], "--alpha is set by the sweep")):
        with pytest.raises(SystemExit, match=message):
            tiny(out, "--method", "wga", *sweep, extra=extra)
    assert not out.exists()  # nothing was run, nothing was written


def test_an_interrupted_run_stops_the_sweep_with_its_status(tmp_path, monkeypatch, capsys):
    # Ctrl-C in a run (exit 130) used to be ignored: the sweep ran the rest and exited 0
    import fastgeffect.sweep as sweep
    started = []

    def fake_run(argv):
        started.append(argv[argv.index("--out") + 1])
        return 130 if len(started) == 2 else 0

    monkeypatch.setattr(sweep, "run_main", fake_run)
    out = tmp_path / "grid"
    assert tiny(out, "--method", "wga", "--alpha", "1,2,3") == 130
    assert [os.path.basename(p) for p in started] == ["wga-alpha1", "wga-alpha2"]  # alpha3 never started
    assert "run wga-alpha2 exited with status 130: the sweep stops here" in capsys.readouterr().err
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())] == ["wga-alpha1"]


def test_a_default_given_explicitly_is_the_same_setting(tmp_path, monkeypatch):
    # "--lr None → 0.001" used to be refused as another setting although 0.001 is the embedded preset's lr
    import fastgeffect.sweep as sweep
    calls = []

    def fake_run(argv):  # a run that stops before finishing: its folder holds config.json, no summary
        folder = Path(argv[argv.index("--out") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"argv": argv}))
        calls.append(argv)
        return 0

    monkeypatch.setattr(sweep, "run_main", fake_run)
    out = tmp_path / "grid"
    assert tiny(out, "--method", "wga", "--alpha", "1") == 0
    assert tiny(out, "--method", "wga", "--alpha", "1", extra=["--lr", "0.001"]) == 0
    assert calls[1][-1] == "--resume"  # the same run, continued
    with pytest.raises(SystemExit, match=r"other settings \(--lr 0.001 → 0.002\)"):
        tiny(out, "--method", "wga", "--alpha", "1", extra=["--lr", "0.002"])


def test_seeds_give_one_run_per_seed_on_one_target_and_compare_ci_intervals(tmp_path, capsys):
    # issue 29: seeds vary the unlearning, not the target; compare --ci's intervals and paired differences
    # are recomputed here from each run's metrics_after.json
    from fastgeffect.report import main as report_main
    from fastgeffect.report.intervals import interval
    out = tmp_path / "seeds"
    # batches of 2 of the 5 forget rows: the seed's order changes every step (one batch of 16 would hide it)
    assert main(["--methods", "ga,tnpo", "--seeds", "0,1", "--out", str(out), "--", "--size", "tiny", "--epochs", "2",
                 "--batch-size", "2", "--no-uwc", "--no-progress"]) == 0
    names = ["ga-seed0", "ga-seed1", "tnpo-seed0", "tnpo-seed1"]
    configs = {n: json.loads((out / n / "config.json").read_text()) for n in names}
    assert [configs[n]["seed"] for n in names] == [0, 1, 0, 1]
    assert {configs[n]["target_seed"] for n in names} == {0}
    assert len({configs[n]["setup"]["target"] for n in names}) == 1  # one target for every seed
    assert (out / "ga-seed0" / "geffect.jsonl").read_text() != (out / "ga-seed1" / "geffect.jsonl").read_text()
    metrics = {n: json.loads((out / n / "metrics_after.json").read_text()) for n in names}
    assert metrics["ga-seed0"] != metrics["ga-seed1"]  # the seed changes the unlearning: intervals have a width
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in sweep["runs"]] == names
    over = {s["setting"]: s for s in sweep["over_seeds"]}
    mu = interval([metrics["ga-seed0"]["Model Utility"], metrics["ga-seed1"]["Model Utility"]]).to_dict()
    assert over["ga"]["seeds"] == [0, 1] and over["ga"]["metrics"]["Model Utility"] == mu
    assert "## Over seeds: mean [95% t-interval] (headline)" in (out / "sweep.md").read_text()

    capsys.readouterr()
    assert report_main(["compare", "--ci", *(str(out / n) for n in names), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "cmp" / "compare_ci.json").read_text())
    assert [g["name"] for g in record["groups"]] == ["ga", "tnpo"] and record["resamples"] == 10_000
    rows = {(r["setting"], r["metric"]): r for r in record["intervals"]}
    diffs = {r["metric"]: r for r in record["differences"]}
    for metric in ("Model Utility", "Forget Quality", "PS-exact forget"):
        for method in ("ga", "tnpo"):
            want = interval([metrics[f"{method}-seed{s}"][metric] for s in (0, 1)])
            got = rows[(method, metric)]
            assert {k: got[k] for k in want.to_dict()} == pytest.approx(want.to_dict(), abs=1e-12)
            assert f"| {metric} | {method} | 0,1 | {fmt(want.mean)} | [{fmt(want.t_low)}, {fmt(want.t_high)}] | " \
                   f"[{fmt(want.boot_low)}, {fmt(want.boot_high)}] |" in printed
        per_seed = [metrics[f"tnpo-seed{s}"][metric] - metrics[f"ga-seed{s}"][metric] for s in (0, 1)]
        want = interval(per_seed)
        assert diffs[metric]["per_seed"] == pytest.approx({"0": per_seed[0], "1": per_seed[1]}, abs=1e-12)
        assert diffs[metric]["mean"] == pytest.approx(want.mean, abs=1e-12)
        assert (diffs[metric]["t_low"], diffs[metric]["boot_high"]) == pytest.approx((want.t_low, want.boot_high),
                                                                                    abs=1e-12)
        assert f"| {metric} | tnpo − ga | 0,1 | {fmt(want.mean)} | [{fmt(want.t_low)}, {fmt(want.t_high)}] |" in printed
    assert "Headline: the t-interval" in printed
    # a pair that lacks a seed of the other is refused, naming it, before anything is written
    assert report_main(["compare", "--ci", *(str(out / n) for n in names[:3]), "--out", str(tmp_path / "c2")]) == 2
    assert "tnpo − ga need the same seeds: tnpo lacks seed(s) 1" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()
