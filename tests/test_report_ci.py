"""``report compare --ci`` on hand-made run folders: grouping by setting, the refusals (a setting whose
runs differ in more than the seed, a seed twice), the note where settings differ, and the bookkeeping
list kept alike with the driver's."""
import json

import pytest

from fastgeffect.driver.config import MAY_CHANGE_ON_RESUME
from fastgeffect.report import compare
from fastgeffect.report.intervals import interval
from fastgeffect.report.seed_groups import BOOKKEEPING, group_runs, identity


def make_run(root, name, method, seed, mu, **config):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"method": method, "regularizer": "none", "lam": 1.0, "lr": 1e-3, "objective_hparams": {}, "seed": seed,
           "epochs": 2, "out": str(d), "argv": ["--seed", str(seed)],
           "setup": {"target": f"/cache{seed}/target-abc",
                     "target_report": {"cache_key": "abc", "train_seconds": seed}},
           **config}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "metrics_after.json").write_text(json.dumps({"Model Utility": mu, "Forget Quality": 0.5 + seed / 10}))
    return d


def test_groups_by_setting_and_pairs_by_seed(tmp_path):
    runs = [make_run(tmp_path, f"{m}-seed{s}", m, s, mu) for m, s, mu in
            (("ga", 0, 0.4), ("ga", 1, 0.5), ("ga", 2, 0.3), ("npo", 2, 0.2), ("npo", 0, 0.6), ("npo", 1, 0.1))]
    text = compare(runs, tmp_path / "cmp", ci=True).read_text()
    record = json.loads((tmp_path / "cmp" / "compare_ci.json").read_text())
    assert record["groups"][1]["runs"] == {"0": "npo (npo-seed0)", "1": "npo (npo-seed1)", "2": "npo (npo-seed2)"}
    mu = {(r["setting"], r["metric"]): r for r in record["intervals"]}
    assert mu[("npo", "Model Utility")]["mean"] == pytest.approx(0.3, abs=1e-12)
    diff = next(d for d in record["differences"] if d["metric"] == "Model Utility")
    assert diff["per_seed"] == pytest.approx({"0": 0.2, "1": -0.4, "2": -0.1}, abs=1e-12)  # npo − ga, seed by seed
    want = interval([0.2, -0.4, -0.1])
    assert (diff["t_low"], diff["t_high"]) == pytest.approx((want.t_low, want.t_high), abs=1e-12)
    assert "| Model Utility | npo − ga | 0,1,2 |" in text and "## Paired differences over seeds" in text


def test_a_setting_whose_runs_differ_in_more_than_the_seed_is_refused(tmp_path):
    runs = [make_run(tmp_path, "ga-seed0", "ga", 0, 0.4), make_run(tmp_path, "ga-seed1", "ga", 1, 0.5, epochs=3)]
    with pytest.raises(ValueError, match=r"runs of setting ga differ in more than their seed \(epochs: .* 2, .* 3\)"):
        compare(runs, tmp_path / "cmp", ci=True)
    assert not (tmp_path / "cmp").exists()
    other_target = make_run(tmp_path, "ga-seed2", "ga", 2, 0.5, setup={"target_report": {"cache_key": "def"}})
    with pytest.raises(ValueError, match="differ in more than their seed \\(setup:"):
        compare([runs[0], other_target], tmp_path / "cmp", ci=True)
    twice = make_run(tmp_path / "b", "ga-seed0", "ga", 0, 0.1)
    with pytest.raises(ValueError, match=r"runs ga \(.*\) and ga \(.*\) are both seed 0 of setting ga"):
        compare([runs[0], twice], tmp_path / "cmp", ci=True)


def test_settings_made_under_other_conditions_are_refused_unless_asked(tmp_path):
    runs = [make_run(tmp_path, f"{m}-seed{s}", m, s, 0.5, epochs=e) for m, e in (("ga", 2), ("npo", 5)) for s in (0, 1)]
    with pytest.raises(ValueError, match="settings compared differ in more than the setting \\(epochs"):
        compare(runs, tmp_path / "cmp", ci=True)
    text = compare(runs, tmp_path / "cmp", ci=True, allow_different=True).read_text()
    assert "**Settings made under other conditions too**: epochs:" in text


def test_setting_names_carry_what_tells_them_apart():
    configs = {f"r{i}": {"method": "wga", "objective_hparams": {"alpha": a}, "seed": 0, "lr": 1e-3}
               for i, a in enumerate((0.5, 2.0))}
    assert [g.name for g in group_runs(configs)] == ["wga alpha=0.5", "wga alpha=2.0"]


def test_bookkeeping_covers_what_may_change_on_resume():
    assert set(MAY_CHANGE_ON_RESUME) <= set(BOOKKEEPING)
    assert identity({"seed": 3, "epochs": 2, "alpha": None, "setup": {"target_report": {"cache_key": "k"}}}) == \
        {"epochs": 2, "setup": {"embedded target": "k"}}


def test_summary_says_where_forget_quality_cannot_resolve(tmp_path):
    from fastgeffect.report import write_report
    d = make_run(tmp_path, "ga-seed0", "ga", 0, 0.4)
    (d / "eval_after").mkdir()
    log = {"avg_paraphrased_loss": {str(i): 1.0 for i in range(10)}}
    (d / "eval_after" / "eval_log_forget.json").write_text(json.dumps(log))
    summary = write_report(d).read_text()
    assert "Forget Quality cannot resolve at n = 10 forget rows against m = 10" in summary
    assert "0.994 (D = 0.2), 0.787 (D = 0.3), 0.418 (D = 0.4), 0.168 (D = 0.5)" in summary
    log = {"avg_paraphrased_loss": {str(i): 1.0 for i in range(300)}}
    (d / "eval_after" / "eval_log_forget.json").write_text(json.dumps(log))
    assert "cannot resolve" not in write_report(d).read_text()
