"""TensorBoard output of the driver (``--report-to tensorboard``): the scalars' names and values are
those of the JSON-lines logs and metric files next to them; a resumed run shows each step once."""
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastgeffect import tensorboard as tb_module
from fastgeffect.driver import cli
from fastgeffect.geffect import GEffectResult, read_geffect_log
from fastgeffect.run import main
from fastgeffect.scalars import geffect_scalars, metric_scalars, train_scalars
from fastgeffect.unlearn import Unlearner

pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module

# tiny forget10 has 5 rows: batch 4 gives 2 steps per epoch
TWO_STEPS = ["--size", "tiny", "--no-progress", "--method", "wga", "--epochs", "1", "--batch-size", "4",
             "--report-to", "tensorboard"]


def events(out):
    return EventAccumulator(str(out / "tensorboard")).Reload()


def by_step(acc, tag):
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_scalar_names():
    res = {"unlearn": GEffectResult(-3.0, {"embed": -1.0, "lm": -2.0}, 2.5)}
    assert geffect_scalars(res) == {"geffect/unlearn/total": -3.0, "geffect/unlearn/embed": -1.0,
                                    "geffect/unlearn/lm": -2.0, "risk/unlearn": 2.5}
    row = {"step": 3, "epoch": 0, "grad_norm": 0.5, "loss": -1.0, "inv_conf": None, "flag": True,
           "weights": {"mean": 0.2, "max": 0.9}}
    assert train_scalars(row) == {"train/grad_norm": 0.5, "train/loss": -1.0, "weights/mean": 0.2, "weights/max": 0.9}
    assert metric_scalars({"Model Utility": 0.5, "n": 3, "note": "x", "bad": math.nan}, "eval_after") == \
        {"eval_after/Model Utility": 0.5, "eval_after/n": 3.0}


def test_driver_writes_losses_geffects_weights_and_metrics(tmp_path):
    out = tmp_path / "run"
    assert main([*TWO_STEPS, "--out", str(out)]) == 0
    acc = events(out)
    tags = set(acc.Tags()["scalars"])
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    records = read_geffect_log(out / "geffect.jsonl")
    assert len(rows) == 2 and len(records) == 4
    for row in rows:  # losses, gradient norm and objective-weight statistics of every step
        for name, value in train_scalars(row).items():
            assert by_step(acc, name)[row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert {"train/loss", "train/forget_loss", "train/grad_norm", "weights/mean", "weights/std"} <= tags
    for r in records:  # G-effects per group and total, and the risk values
        assert by_step(acc, f"geffect/{r['risk']}/total")[r["step"]] == pytest.approx(r["total"], rel=1e-6)
        for group, value in r["groups"].items():
            assert by_step(acc, f"geffect/{r['risk']}/{group}")[r["step"]] == pytest.approx(value, rel=1e-6)
        assert by_step(acc, f"risk/{r['risk']}")[r["step"]] == pytest.approx(r["risk_value"], rel=1e-6)
    # evaluation metrics: before at step 0, after unlearning (and UWC) at the number of steps taken
    for name, step, prefix in (("metrics_before.json", 0, "eval_before"), ("metrics_after.json", 2, "eval_after"),
                               ("metrics_uwc.json", 2, "eval_uwc")):
        metrics = metric_scalars(json.loads((out / name).read_text()), prefix)
        assert f"{prefix}/Model Utility" in metrics or prefix == "eval_uwc"
        assert metrics
        for tag, value in metrics.items():
            assert by_step(acc, tag) == {step: pytest.approx(value, rel=1e-6, abs=1e-12)}, tag


def test_a_resumed_run_shows_each_step_once(tmp_path, monkeypatch):
    """Interrupted during step 3 with the state saved after step 1: step 2's events of the first
    attempt are hidden, the resumed run's shown, each step once."""
    out = tmp_path / "run"
    common = [*TWO_STEPS, "--eval", "none", "--epochs", "2", "--save-every", "2", "--out", str(out)]
    measure = Unlearner.measure

    def interrupted_at_step_3(self, *a, **k):
        if self.step == 3:
            raise KeyboardInterrupt
        return measure(self, *a, **k)

    monkeypatch.setattr(Unlearner, "measure", interrupted_at_step_3)
    assert main(common) == 130
    assert [e.step for e in events(out).Scalars("train/loss")] == [0, 1, 2]
    monkeypatch.setattr(Unlearner, "measure", measure)
    assert main([*common, "--resume"]) == 0
    acc = events(out)
    assert [e.step for e in acc.Scalars("geffect/unlearn/total")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]


def test_driver_without_report_to_writes_no_event_files(tmp_path):
    out = tmp_path / "run"
    assert main([*TWO_STEPS[:-2], "--eval", "none", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists()


def test_missing_tensorboard_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tb_module.importlib.util, "find_spec", lambda name: None)
    assert "pip install tensorboard" in tb_module.tensorboard_missing()
    monkeypatch.setattr(cli, "tensorboard_missing", tb_module.tensorboard_missing)
    with pytest.raises(SystemExit) as e:
        main([*TWO_STEPS, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert "--report-to tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
