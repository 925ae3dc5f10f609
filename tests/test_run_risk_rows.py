"""The rows of the two G-effect risks (--risk-rows fixed|step) and stopping on retain damage
(--stop-at-retain-damage): the loop against a reference computation, and the driver end to end at
the tiny embedded size (runs, resumes, older run folders, bad input)."""
import copy
import json
from itertools import accumulate

import pytest
import torch
from helpers.geffect_logs import assert_same_geffects
from helpers.toy_qa import toy_qa_records, toy_tokenizer_for
from transformers import GPT2Config, GPT2LMHeadModel

from fastgeffect.data.pairs import ForgetRetainDataset
from fastgeffect.data.qa import QADataset
from fastgeffect.data.templates import get_template
from fastgeffect.data.unlearning import UnlearningData
from fastgeffect.geffect import read_geffect_log
from fastgeffect.geffect.risk import (
    fixed_forget_items,
    fixed_retain_items,
    forget_risk_items,
    nll_risk_on,
    retain_risk_items,
)
from fastgeffect.objectives import get_objective
from fastgeffect.run import main
from fastgeffect.training.damage_stop import damage_stop_step
from fastgeffect.unlearn import UnlearnConfig, Unlearner

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module


# ---- the loop: the risks' rows against a reference computation --------------------------------------
def toy_unlearner(out, risk_rows):
    """The loop on a float64 tiny GPT-2 (no dropout) and toy QA: 6 forget rows, 8 held-out rows, 3 risk rows."""
    template = get_template("phi")
    records = toy_qa_records(10)  # 20 rows
    tok = toy_tokenizer_for(records, template)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(torch.float64)
    forget, retain = QADataset(records[:6], tok, template, 40), QADataset(records[6:12], tok, template, 40)
    held = QADataset(records[12:], tok, template, 40)
    data = UnlearningData(ForgetRetainDataset(forget, retain, seed=0), forget, retain, held)
    cfg = UnlearnConfig(epochs=2, batch_size=2, lr=1e-3, warmup_epochs=0, geffect_batch=3, seed=5,
                        risk_rows=risk_rows)
    return Unlearner(model, get_objective("ga", regularizer="gd"), data, cfg, out, progress=False), data


@pytest.mark.parametrize("risk_rows", ["fixed", "step"])
def test_each_step_measures_the_risks_on_the_rows_its_mode_names(tmp_path, risk_rows):
    u, data = toy_unlearner(tmp_path, risk_rows)
    before = [copy.deepcopy(u.model.state_dict())]  # the parameters each step starts from
    u.run(on_step=lambda row, g: before.append(copy.deepcopy(u.model.state_dict())))
    records = read_geffect_log(tmp_path / "geffect.jsonl")
    assert len(records) == 2 * 6  # 3 steps per epoch, 2 epochs, 2 risks
    model = copy.deepcopy(u.model).eval()
    for r in records:
        t, cfg = r["step"], u.cfg
        if risk_rows == "fixed":  # one draw for the run
            rows = {"unlearn": fixed_forget_items(data.forget, cfg.seed, 3), "retain": fixed_retain_items(
                data.heldout, cfg.seed, 3)}
        else:  # the step's first forget rows and a fresh held-out draw (as before --risk-rows)
            plan = u.plan(t // u.n_steps_epoch, t % u.n_steps_epoch)
            rows = {"unlearn": forget_risk_items(data.pairs, plan.global_chunks, 3),
                    "retain": retain_risk_items(data.heldout, cfg.seed, t, 3)}
        model.load_state_dict(before[t])
        with torch.no_grad():
            want = float(nll_risk_on(model, rows[r["risk"]], CPU)())
        assert r["risk_value"] == pytest.approx(want, rel=1e-12, abs=0), (t, r["risk"])
    if risk_rows == "fixed":  # the value after a step is the next step's value: one risk throughout
        for risk in ("unlearn", "retain"):
            line = [r for r in records if r["risk"] == risk]
            assert all(a["risk_after"] == b["risk_value"] for a, b in zip(line, line[1:]))


# ---- the driver at the tiny embedded size -----------------------------------------------------------
COMMON = ["--method", "ga", "--epochs", "2", "--batch-size", "2"]  # tiny forget10: 5 rows, 6 steps


def run(out, *extra):
    return main(["--size", "tiny", "--out", str(out), "--no-progress", *extra])


def retain_sums(records, field):
    """The retain risk's cumulative relative change Σ Δ / R(θ_0), by step (reference: plain sums)."""
    line = sorted((r for r in records if r["risk"] == "retain"), key=lambda r: r["step"])
    return [s / line[0]["risk_value"] for s in accumulate(r[field] for r in line)]


def test_fixed_risk_rows_are_one_risk_across_steps_and_a_resume(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full, *COMMON, "--eval", "none") == 0
    assert json.loads((full / "config.json").read_text())["train"]["risk_rows"] == "fixed"  # the default
    assert run(part, *COMMON, "--eval", "none", "--stop-at-step", "3") == 0
    assert run(part, *COMMON, "--eval", "none", "--resume") == 0
    a, b = read_geffect_log(full / "geffect.jsonl"), read_geffect_log(part / "geffect.jsonl")
    assert [(r["step"], r["risk"]) for r in a] == [(r["step"], r["risk"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["risk_value"] == pytest.approx(ra["risk_value"], rel=1e-6)
    for records in (a, b):  # steps 2 -> 3 cross the resume in ``part``
        for risk in ("unlearn", "retain"):
            line = [r for r in records if r["risk"] == risk]
            assert len(line) == 6
            for x, y in zip(line, line[1:]):
                assert y["risk_value"] == pytest.approx(x["risk_after"], rel=1e-9), (risk, y["step"])


def test_a_folder_from_before_risk_rows_resumes_as_it_ran(tmp_path):
    """A folder whose config.json predates --risk-rows ran with the risks redrawn at every step: a
    resume continues it so (driver/config.py OLDER_RUNS), whatever today's default, and gives the
    log a plain run with --risk-rows step gives."""
    out, whole = tmp_path / "old", tmp_path / "whole"
    assert run(out, *COMMON, "--eval", "none", "--risk-rows", "step", "--stop-at-step", "2") == 0
    cfg = json.loads((out / "config.json").read_text())
    del cfg["risk_rows"]  # as if made before the setting existed, when the risks were redrawn at every step
    (out / "config.json").write_text(json.dumps(cfg))
    assert run(out, *COMMON, "--eval", "none", "--resume") == 0
    assert run(whole, *COMMON, "--eval", "none", "--risk-rows", "step") == 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 6
    assert_same_geffects(read_geffect_log(whole / "geffect.jsonl"), read_geffect_log(out / "geffect.jsonl"), 1e-6,
                         groups=True)  # the risks redrawn per step, as a --risk-rows step run's


def test_unlearning_stops_after_the_step_whose_retain_damage_exceeds_the_threshold(tmp_path):
    full = tmp_path / "full"
    assert run(full, *COMMON, "--eval", "none") == 0
    records = read_geffect_log(full / "geffect.jsonl")
    for field, source, extra in (("predicted_opt", "predicted", ["--eval", "full"]),
                                 ("realised", "realised", ["--eval", "none"])):
        sums = retain_sums(records, field)
        # a threshold crossed first at a middle step k (GA raises the retain risk step by step)
        k = next(k for k in range(2, 5) if sums[k] > max(sums[:k]))
        x = (max(sums[:k]) + sums[k]) / 2
        out = tmp_path / source
        assert run(out, *COMMON, *extra, "--stop-at-retain-damage", repr(x), "--stop-damage-from", source) == 0
        got = read_geffect_log(out / "geffect.jsonl")
        assert sorted({r["step"] for r in got}) == list(range(k + 1))  # no step after it
        assert len((out / "train_log.jsonl").read_text().splitlines()) == k + 1
        # its own log, summed plainly: k is the first step above x
        own = retain_sums(got, field)
        assert own[k] > x and max(own[:k]) <= x and damage_stop_step(got, x, source) == k
        stopped = json.loads((out / "config.json").read_text())["unlearning_stopped"]
        assert stopped["step"] == k and stopped["steps_taken"] == k + 1 and stopped["from"] == source
        assert stopped["damage"] == pytest.approx(own[k], rel=1e-9) and stopped["threshold"] == x
        if source == "predicted":  # evaluation and UWC as usual
            assert (out / "metrics_after.json").exists() and (out / "metrics_uwc.json").exists()
            assert not (out / "error.json").exists()
            assert f"Unlearning stopped after step {k} ({k + 1} steps taken)" in (out / "summary.md").read_text()
        # a resume after the stop takes no further step
        log = (out / "geffect.jsonl").read_text()
        assert run(out, *COMMON, *extra, "--stop-at-retain-damage", repr(x), "--stop-damage-from", source,
                   "--resume") == 0
        assert (out / "geffect.jsonl").read_text() == log
        assert len((out / "train_log.jsonl").read_text().splitlines()) == k + 1


@pytest.mark.parametrize("flags, message", [
    (["--stop-at-retain-damage", "0"], "--stop-at-retain-damage must be a finite number > 0"),
    (["--stop-at-retain-damage", "-1"], "--stop-at-retain-damage must be a finite number > 0"),
    (["--stop-at-retain-damage", "0.1", "--geffect-every", "2"], "needs the retain risk's update effect at every "
                                                                 "step: --geffect-every 1 and --update-effects on"),
    (["--stop-at-retain-damage", "0.1", "--update-effects", "off"], "--update-effects off"),
    (["--stop-at-retain-damage", "0.1", "--geffect-every", "0"], "--geffect-every 0"),
    (["--risk-rows", "both"], "invalid choice: 'both'"),
    (["--stop-damage-from", "guess"], "invalid choice: 'guess'"),
])
def test_bad_stopping_and_risk_rows_flags_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        run(out, *flags)
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_loop_refuses_stopping_without_update_effects_at_every_step():
    with pytest.raises(ValueError, match="--geffect-every 1 and --update-effects on"):
        UnlearnConfig(stop_at_retain_damage=0.1, update_effects=False).check()
    with pytest.raises(ValueError, match="--geffect-every 3"):
        UnlearnConfig(stop_at_retain_damage=0.1, geffect_every=3).check()
    UnlearnConfig(stop_at_retain_damage=0.1).check()
