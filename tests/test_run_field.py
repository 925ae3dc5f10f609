"""The driver runs the field's newer objectives (SatImp, UNDIAL, CE-U) and PDU's constraint mode at
the tiny embedded size: two steps each; PDU's λ logged, moved by the dual update and resumed."""
import json

import pytest

from fastgeffect.geffect import read_geffect_log
from fastgeffect.run import main

pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module


def run(out, *extra):
    return main(["--size", "tiny", "--out", str(out), "--no-progress", "--eval", "none", *extra])


def train_log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["satimp", "undial", "ceu"])
def test_new_objectives_run(tmp_path, method):
    out = tmp_path / method
    assert run(out, "--method", method, "--epochs", "2", "--pg-steps", "0") == 0
    assert len(read_geffect_log(out / "geffect.jsonl")) == 4  # two steps (one per epoch), two risks each
    logs = train_log(out)
    assert [r["step"] for r in logs] == [0, 1]
    assert all("lam" not in r for r in logs)  # no PDU
    assert (out / "pg_effects.jsonl").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["regularizer"] == {"satimp": "gd", "undial": "none", "ceu": "none"}[method]


def test_pdu_lambda_is_logged_updated_and_resumed(tmp_path):
    eps, eta = 0.06, 10.0  # the tiny target's retain NLL is about 0.05-0.07: λ moves both ways
    common = ["--method", "ga", "--regularizer", "gd", "--constraint-eps", str(eps), "--dual-step", str(eta),
              "--lam", "0.25", "--epochs", "1", "--batch-size", "2", "--geffect-every", "0", "--pg-steps", ""]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full, *common) == 0
    logs = train_log(full)
    assert len(logs) >= 3
    assert logs[0]["lam"] == 0.25
    for a, b in zip(logs, logs[1:]):  # each step's λ: the dual update of the step before
        assert b["lam"] == pytest.approx(max(0.0, a["lam"] + eta * (a["reg_loss"] - eps)), rel=1e-12, abs=1e-15)
    lams = [r["lam"] for r in logs]
    assert any(b > a for a, b in zip(lams, lams[1:])) and any(b < a for a, b in zip(lams, lams[1:]))
    # a run stopped after two steps and resumed continues with the λ it had reached
    assert run(part, *common, "--stop-at-step", "2") == 0
    assert run(part, *common, "--resume") == 0
    resumed = train_log(part)
    assert [r["step"] for r in resumed] == [r["step"] for r in logs]
    for a, b in zip(logs, resumed):
        assert b["lam"] == pytest.approx(a["lam"], rel=1e-6)
        assert b["reg_loss"] == pytest.approx(a["reg_loss"], rel=1e-5)


def test_pdu_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="give a dual step dual_step > 0 too"):
        run(tmp_path / "x", "--method", "ga", "--regularizer", "gd", "--constraint-eps", "1.0")
    assert not (tmp_path / "x").exists()  # refused before the run folder is claimed
