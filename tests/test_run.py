"""The driver end to end at the tiny embedded size: outputs, effect of unlearning, resume, bad input."""
import json
import math
from pathlib import Path

import pytest
from helpers.geffect_logs import abs_sum, assert_same_geffects

from fastgeffect.driver import study as study_module
from fastgeffect.geffect import read_geffect_log
from fastgeffect.run import main
from fastgeffect.unlearn import Unlearner

SHARED_TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"


pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module


def run(out, *extra):
    return main(["--size", "tiny", "--out", str(out), "--no-progress", *extra])


def test_default_run_end_to_end(tmp_path):
    out = tmp_path / "tnpo"
    assert run(out, "--method", "tnpo", "--checkpoint-epochs", "--save-model") == 0
    for name in ("config.json", "geffect.jsonl", "train_log.jsonl", "pg_effects.jsonl", "token_weights.jsonl",
                 "metrics_before.json", "metrics_after.json", "metrics_uwc.json", "summary.md", "timing.json",
                 "token_weights.html", "plots/geffect.png", "plots/risk.png", "plots/weights.png",
                 "plots/pg_effects.png", "eval_before/eval_log_forget.json", "eval_after/eval_log.json",
                 "eval_after/eval_real_author_wo_options.json", "eval_after/eval_real_world_wo_options.json",
                 "model/config.json", "checkpoints/epoch-5/config.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fused_resolved"] is True  # the tiny Llama exposes a plain linear LM head
    records = read_geffect_log(out / "geffect.jsonl")
    steps = cfg["train"]["epochs"] * -(-5 // cfg["train"]["batch_size"])  # tiny forget10: 5 rows
    assert [r["step"] for r in records if r["risk"] == "unlearn"] == list(range(steps))
    assert set(records[0]["groups"]) == {"embed", "shallow", "middle", "deep", "lm"}
    for r in records:
        assert abs(r["total"] - math.fsum(r["groups"].values())) <= 1e-9 * abs_sum(r["groups"])
    # TNPO removes the targeted knowledge: negative unlearning G-effects overall
    assert sum(r["total"] for r in records if r["risk"] == "unlearn") < 0
    before = json.loads((out / "metrics_before.json").read_text())
    after = json.loads((out / "metrics_after.json").read_text())
    assert before["PS-exact forget"] > 0.8  # the memorised target reproduces its answers
    assert after["PS-exact forget"] < before["PS-exact forget"] - 0.3
    assert after["Prob. Forget"] < 0.7 * before["Prob. Forget"]
    # retained knowledge stays within a band
    assert after["Model Utility"] > 0.85 * before["Model Utility"]
    assert after["PS-exact retain"] > 0.8 * before["PS-exact retain"]
    uwc = json.loads((out / "metrics_uwc.json").read_text())
    assert 0.0 <= uwc["alpha"] <= 1.0 and "PS-exact forget" in uwc
    assert "| Model Utility |" in (out / "summary.md").read_text()
    summary = (out / "summary.md").read_text()
    assert cfg["ps_protocol"] == "clean" and "ps_protocol=clean" in summary
    assert cfg["gen_mode"] == "independent" and "gen_mode=independent, truth_ratio_agg=geometric" in summary
    # the embedded target's Forget Quality is against its own retain twin, and the summary says so
    assert 0.0 < before["Forget Quality"] <= 1.0
    assert "- Forget Quality against the retain twin" in (out / "summary.md").read_text()
    assert cfg["forget_quality"].startswith("Forget Quality against the retain twin")


def test_resume_gives_the_same_geffect_log(tmp_path):
    common = ["--method", "wga", "--eval", "none", "--epochs", "3", "--batch-size", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full, *common) == 0
    assert run(part, *common, "--stop-at-step", "4") == 0
    assert len(read_geffect_log(part / "geffect.jsonl")) == 8  # steps 0-3, two risks each
    with pytest.raises(SystemExit, match="holds another run"):
        run(part, *common)
    assert run(part, *common, "--resume") == 0
    a, b = read_geffect_log(full / "geffect.jsonl"), read_geffect_log(part / "geffect.jsonl")
    assert_same_geffects(a, b, 1e-6)
    for ra, rb in zip(a, b):
        assert rb["risk_value"] == pytest.approx(ra["risk_value"], rel=1e-6)
    lines = (part / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(9))


def token_weight_rows(out):
    return [json.loads(x) for x in (out / "token_weights.jsonl").read_text().splitlines()]


def assert_same_token_weights(a, b):
    assert [(r["step"], r["epoch"], r["index"], r["tokens"]) for r in a] == \
        [(r["step"], r["epoch"], r["index"], r["tokens"]) for r in b]
    for ra, rb in zip(a, b):
        assert rb["weights"] == pytest.approx(ra["weights"], rel=1e-5, abs=1e-7)


def test_resume_keeps_every_token_weight_row(tmp_path):
    """Stopped mid-epoch, then at an epoch end (a state saved at the step of the epoch-end rows),
    then resumed to the end: token_weights.jsonl equals the uninterrupted run's; resuming a finished
    run changes none of its logs."""
    common = ["--method", "wga", "--eval", "none", "--epochs", "3", "--batch-size", "2", "--pg-steps", ""]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full, *common) == 0
    want = token_weight_rows(full)
    assert [r["epoch"] for r in want] == [e for e in range(4) for _ in range(3)]  # before + 3 epoch ends
    assert run(part, *common, "--stop-at-step", "4") == 0
    assert run(part, *common, "--resume", "--stop-at-step", "6") == 0  # 3 steps per epoch: an epoch end
    assert run(part, *common, "--resume") == 0
    assert_same_token_weights(want, token_weight_rows(part))
    logs = {n: (full / n).read_text() for n in ("token_weights.jsonl", "train_log.jsonl", "geffect.jsonl")}
    assert run(full, *common, "--resume") == 0
    assert {n: (full / n).read_text() for n in logs} == logs


def test_fused_and_materialised_runs_agree(tmp_path):
    common = ["--method", "tnpo", "--eval", "none", "--epochs", "1"]
    assert run(tmp_path / "f", *common, "--fused", "on") == 0
    assert run(tmp_path / "m", *common, "--fused", "off") == 0
    a, b = (read_geffect_log(tmp_path / d / "geffect.jsonl") for d in ("f", "m"))
    assert_same_geffects(b, a, 1e-4)
    for ra, rb in zip(a, b):
        assert ra["weights"]["mean"] == pytest.approx(rb["weights"]["mean"], rel=1e-5)


def test_gradient_accumulation_gives_the_same_geffects(tmp_path):
    """One process, --grad-accum 2: the step's micro-batches share its counts, so the objective gradient,
    the risk batches and hence the G-effects are those of one micro-batch (the risk batch is built from
    the step's samples, not by stacking micro-batches of different lengths)."""
    common = ["--method", "wga", "--eval", "none", "--epochs", "2", "--batch-size", "4", "--fused", "off"]
    assert run(tmp_path / "one", *common) == 0
    assert run(tmp_path / "two", *common, "--grad-accum", "2") == 0
    a, b = (read_geffect_log(tmp_path / d / "geffect.jsonl") for d in ("one", "two"))
    assert_same_geffects(a, b, 1e-5, groups=True)  # fp32 sums in another order, then trained on


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "r"
    assert run(out, "--method", "ga", "--eval", "none", "--epochs", "1") == 0
    with pytest.raises(SystemExit, match="other settings"):
        run(out, "--method", "npo", "--eval", "none", "--epochs", "1", "--resume")
    for flag, value in (("--max-grad-norm", "0.5"), ("--weight-decay", "0"), ("--warmup-epochs", "0"),
                        ("--geffect-groups", "blocks"), ("--eval-size", "3"), ("--pg-steps", "0"), ("--eval", "full"),
                        ("--fused", "off"), ("--max-length", "32"), ("--geffect-batch", "4"), ("--lam", "2")):
        key = flag[2:].replace("-", "_")
        with pytest.raises(SystemExit, match=rf"other settings \{{'{key}': "):
            run(out, "--method", "ga", "--eval", "none", "--epochs", "1", "--resume", flag, value)
    # where and how often state is saved, and progress bars, may change
    assert run(out, "--method", "ga", "--eval", "none", "--epochs", "1", "--resume", "--save-every", "1") == 0
    assert run(out, "--method", "npo", "--eval", "none", "--epochs", "1", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["method"] == "npo"


@pytest.mark.parametrize("method,reg", [("npo", "gd"), ("idkdpo", "gd"), ("po", "kl"), ("rmu", "rr"),
                                        ("wtnpo", "none"), ("simnpo", "gd"), ("dpo", "gd")])
def test_other_objectives_run(tmp_path, method, reg):
    out = tmp_path / method
    assert run(out, "--method", method, "--regularizer", reg, "--eval", "none", "--epochs", "1",
               "--pg-steps", "0") == 0
    assert len(read_geffect_log(out / "geffect.jsonl")) == 2
    assert (out / "pg_effects.jsonl").exists()


def test_nan_loss_stops_with_state_saved(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="last finite state"):
        run(out, "--method", "ga", "--eval", "none", "--epochs", "4", "--batch-size", "1", "--lr", "1e30",
            "--warmup-epochs", "0")
    err = json.loads((out / "error.json").read_text())
    assert "non-finite" in err["error"] and err["step"] > 0
    assert (out / "state.pt").exists()


def test_non_finite_gradient_is_never_stepped_into_the_saved_state(tmp_path):
    """Without G-effects nothing measures the gradient before the step: the gradient norm does. The run
    stops before stepping into NaN weights, and the state it saves is finite."""
    import torch

    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match="last finite state"):
        run(out, "--method", "ga", "--eval", "none", "--epochs", "4", "--batch-size", "1", "--lr", "1e30",
            "--warmup-epochs", "0", "--geffect-every", "0", "--pg-steps", "")
    assert json.loads((out / "error.json").read_text())["step"] > 0
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    for line in (out / "train_log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in train_log.jsonl"))  # strict JSON


def test_ctrl_c_names_the_saved_state_and_resume_completes(tmp_path, monkeypatch, capsys):
    common = ["--method", "ga", "--eval", "none", "--epochs", "2", "--batch-size", "2", "--save-every", "2"]
    out = tmp_path / "int"
    train_step = Unlearner.train_step

    def interrupted_at_step_3(self, micro, plan):
        if self.step == 3:
            raise KeyboardInterrupt
        return train_step(self, micro, plan)
    monkeypatch.setattr(Unlearner, "train_step", interrupted_at_step_3)
    assert run(out, *common) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the last resumable state is {out / 'state.pt'}; continue with --resume --out {out}" in err
    assert json.loads((out / "error.json").read_text())["error"] == "interrupted (KeyboardInterrupt)"
    monkeypatch.undo()
    assert run(out, *common, "--resume") == 0
    assert not (out / "error.json").exists()  # a successful resume clears the stale error
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == list(range(6))


def test_the_folder_is_claimed_before_set_up(tmp_path, monkeypatch):
    out = tmp_path / "claimed"

    def failing_set_up(*a, **k):
        assert json.loads((out / "config.json").read_text())["method"] == "ga"  # written first
        with pytest.raises(SystemExit, match="in use by another run"):
            run(out, "--method", "ga")
        raise OSError("no route to the hub")
    monkeypatch.setattr(study_module, "build_target", failing_set_up)
    with pytest.raises(OSError, match="no route"):
        run(out, "--method", "ga", "--eval", "none", "--epochs", "1")
    assert "no route to the hub" in json.loads((out / "error.json").read_text())["error"]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"stopped with an error \(error.json\): pass --resume"):
        run(out, "--method", "ga", "--eval", "none", "--epochs", "1")
    assert run(out, "--method", "ga", "--eval", "none", "--epochs", "1", "--resume") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fused_resolved"] is True and "setup" in cfg  # completed after set-up
    assert not (out / "error.json").exists()


def test_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--method", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--regularizer", "l2"])
    assert "invalid choice: 'l2'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a folder"):
        run(tmp_path / "x", "--data-dir", str(tmp_path / "missing"), "--authors", "10")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="full"):
        run(tmp_path / "y", "--data-dir", str(tmp_path / "empty"), "--authors", "10")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['alpha'\]"):
        run(tmp_path / "z", "--method", "npo", "--alpha", "2")


@pytest.mark.skipif(not (SHARED_TOFU / "full.json").exists(), reason="../shared/tofu is not present")
def test_real_tofu_subset_runs(tmp_path):
    out = tmp_path / "tofu"
    assert run(out, "--data-dir", str(SHARED_TOFU), "--authors", "10", "--method", "tnpo", "--eval", "none",
               "--epochs", "1") == 0
    cfg = json.loads((out / "config.json").read_text())
    # forget10 of 10 authors: the last author, 20 rows, two steps of 16
    assert cfg["authors"] == 10 and len(read_geffect_log(out / "geffect.jsonl")) == 4


def test_ctrl_c_before_the_first_saved_state_says_how_many_steps_are_redone(tmp_path, monkeypatch, capsys):
    # "no resumable state yet" alone read as if nothing had happened while train_log.jsonl held steps
    out = tmp_path / "early"
    train_step = Unlearner.train_step

    def interrupted_at_step_2(self, micro, plan):
        if self.step == 2:
            raise KeyboardInterrupt
        return train_step(self, micro, plan)
    monkeypatch.setattr(Unlearner, "train_step", interrupted_at_step_2)
    assert run(out, "--method", "ga", "--eval", "none", "--epochs", "1", "--batch-size", "2") == 130
    assert "interrupted: no resumable state yet (2 logged steps will be redone)" in capsys.readouterr().err


def test_a_folder_of_an_older_version_resumes_with_its_defaults_or_names_the_flags(tmp_path):
    # an older config.json lacks the settings added since; the refusal asked for "the saved values" (None)
    out = tmp_path / "old"
    common = ["--method", "ga", "--eval", "none", "--epochs", "2", "--batch-size", "2"]
    assert run(out, *common, "--stop-at-step", "1") == 0
    cfg = json.loads((out / "config.json").read_text())
    del cfg["truth_ratio_agg"]  # as if made before the setting existed
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="started by an older fastgeffect, which had no --truth-ratio-agg arithmetic "
                                         r"\(it ran as their defaults --truth-ratio-agg geometric\)"):
        run(out, *common, "--truth-ratio-agg", "arithmetic", "--resume")
    with pytest.raises(SystemExit, match=r"other settings \{'seed': \(0, 1\)\} \(saved, now\); to continue it, give "
                                         "--seed 0,"):
        run(out, *common, "--seed", "1", "--resume")
    assert run(out, *common, "--resume") == 0  # at the default, it continues


def _ps_rows_agree(folder: Path, metrics: dict) -> None:
    """ps_rows.json of an evaluation: per-row scores in row order whose mean is each reported PS."""
    rows = json.loads((folder / "ps_rows.json").read_text())
    assert set(rows) == {k for k in metrics if k.startswith("PS-")} and rows
    for name, r in rows.items():
        assert len(r["scores"]) == len(r["prefix_words"]) == len(r["num_words"]) > 0
        assert [1 - m / n for m, n in zip(r["prefix_words"], r["num_words"])] == r["scores"]
        mean = math.fsum(r["scores"]) / len(r["scores"])
        assert abs(mean - metrics[name]) <= 1e-12 * max(1.0, *map(abs, r["scores"]))


def _calibrated_again(out: Path, rows, forget, reference):
    """UWC calibrated anew on the saved unlearned model against its original, on ``rows``."""
    from fastgeffect.embedded import build_embedded
    from fastgeffect.eval import uwc_calibrate
    from fastgeffect.model_loading import load_causal_lm
    emb = build_embedded(None, size="tiny", seed=0, forget_split="forget10")
    unlearned, _ = load_causal_lm(str(out / "model"))
    return uwc_calibrate(emb.load_target(), unlearned, emb.tokenizer, emb.template, rows, forget, preset="phi",
                         reference_ps=reference, ps_protocol="clean")


@pytest.mark.parametrize("mode", ["reported", "heldout"])
def test_uwc_calibration_rows_and_ps_rows(tmp_path, monkeypatch, mode):
    """--uwc-rows: reported calibrates α on the reported rows against the original's PS before (today's
    numbers); heldout on the next --eval-size retain rows, disjoint from them, against the original's PS
    on those; every evaluation writes its PS rows."""
    from fastgeffect.driver import evaluation
    from fastgeffect.embedded import build_embedded
    from fastgeffect.eval import load_tofu_sets, ps_scores
    out, n, seen = tmp_path / mode, 2, []

    def spy(original, unlearned, tokenizer, template, retain, forget, **kw):
        seen.append(list(retain))
        return calibrate(original, unlearned, tokenizer, template, retain, forget, **kw)
    calibrate = evaluation.uwc_calibrate
    monkeypatch.setattr(evaluation, "uwc_calibrate", spy)
    assert run(out, "--method", "ga", "--epochs", "2", "--eval-size", str(n), "--uwc-rows", mode, "--save-model",
               "--eval-metrics", "tofu") == 0
    before, after, uwc = (json.loads((out / f"metrics_{w}.json").read_text()) for w in ("before", "after", "uwc"))
    for folder, metrics in (("eval_before", before), ("eval_after", after), ("eval_uwc", uwc)):
        _ps_rows_agree(out / folder, metrics)
    emb = build_embedded(None, size="tiny", seed=0, forget_split="forget10")
    sets = load_tofu_sets("forget10", str(emb.data_dir))
    reported = json.loads((out / "eval_uwc" / "ps_rows.json").read_text())["PS-exact retain"]["scores"]
    assert len(reported) == n  # UWC reports the same rows in both modes
    assert uwc["calibration_rows"] == mode
    assert len(seen) == 1 and seen[0] == (sets["retain"][:n] if mode == "reported" else sets["retain"][n:2 * n])
    if mode == "reported":
        rows, reference = sets["retain"][:n], before["PS-exact retain"]
        assert uwc["calibration"] == {"first_row": 0, "count": n, "reference_ps": reference}
        assert not (out / "uwc_reference.json").exists()
    else:
        rows = sets["retain"][n:2 * n]
        assert rows and not {r["question"] for r in rows} & {r["question"] for r in sets["retain"][:n]}
        reference = ps_scores(emb.load_target(), emb.tokenizer, emb.template, rows, protocol="clean")["ps"]
        assert uwc["calibration"] == {"first_row": n, "count": len(rows), "reference_ps": reference}
        assert uwc["reference_ps"] == reference
        assert json.loads((out / "uwc_reference.json").read_text())["PS-exact retain"] == reference
    again = _calibrated_again(out, rows, sets["forget"][:n], reference)
    assert again["alpha"] == uwc["alpha"] and again["reference_ps"] == uwc["reference_ps"]


def test_uwc_heldout_without_rows_left_is_refused(tmp_path):
    out = tmp_path / "none-left"
    with pytest.raises(SystemExit, match=r"--uwc-rows heldout: the retain set has \d+ rows, all of them reported"):
        run(out, "--method", "ga", "--epochs", "1", "--eval-size", "100000", "--uwc-rows", "heldout")
    assert not (out / "metrics_before.json").exists() and not (out / "eval_before").exists()
    for extra in (("--ps-protocol", "paper"), ("--no-uwc",)):
        with pytest.raises(SystemExit):
            run(tmp_path / "bad", "--uwc-rows", "heldout", *extra)
        assert not (tmp_path / "bad").exists()


def test_shared_ps_rows_and_uwc_reference_are_reused_only_for_their_rows(tmp_path, capsys):
    """A shared metrics_before.json without its ps_rows.json (an older version's) is recomputed; the
    original's PS on the heldout rows is reused for the same rows and recomputed for others."""
    shared = tmp_path / "shared"
    base = ("--method", "ga", "--epochs", "1", "--eval-metrics", "tofu", "--uwc-rows", "heldout",
            "--shared-dir", str(shared))
    assert run(tmp_path / "a", *base, "--eval-size", "2") == 0
    reference = json.loads((shared / "uwc_reference.json").read_text())
    (shared / "eval_before" / "ps_rows.json").unlink()
    capsys.readouterr()
    assert run(tmp_path / "b", *base, "--eval-size", "2") == 0
    err = capsys.readouterr().err
    assert "metrics_before.json: it cannot be read" in err and "uwc_reference.json" not in err
    assert (shared / "eval_before" / "ps_rows.json").exists()
    assert json.loads((tmp_path / "b" / "metrics_uwc.json").read_text())["reference_ps"] == reference["PS-exact retain"]
    assert run(tmp_path / "c", *base, "--eval-size", "1") == 0
    assert "uwc_reference.json: it was computed with other first_row, rows_sha256" in capsys.readouterr().err
    recomputed = json.loads((shared / "uwc_reference.json").read_text())
    assert (recomputed["first_row"], recomputed["count"]) == (1, 1)
