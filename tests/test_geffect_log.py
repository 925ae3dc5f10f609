"""JSON-lines G-effect log (flushed, resume-safe) and post-hoc analysis of saved checkpoints."""
import json
import math

import pytest
import torch
from helpers.model_families import flat_grads, logits_of, qa_batch, tiny_model

import fastgeffect.losses as L
from fastgeffect.geffect import (
    GEffect,
    GEffectLogger,
    GEffectResult,
    posthoc_geffects,
    read_geffect_log,
    step_from_checkpoint,
    weight_stats,
)


def result(total, risk=1.0):
    return GEffectResult(total, {"embed": total / 2, "lm": total / 2}, risk)


def test_write_read_flushed(tmp_path):
    path = tmp_path / "sub" / "ge.jsonl"
    log = GEffectLogger(path)
    lines = log.log(0, {"unlearn": result(-2.0), "retain": result(0.5, 3.0)}, epoch=0, objective="tnpo")
    # flushed: readable before close
    recs = read_geffect_log(path)
    assert recs == lines and len(recs) == 2
    assert recs[0] == {"step": 0, "risk": "unlearn", "total": -2.0, "groups": {"embed": -1.0, "lm": -1.0},
                       "risk_value": 1.0, "tied": False, "epoch": 0, "objective": "tnpo"}
    log.log(1, result(-1.0), risk="unlearn", weights=torch.tensor([[0.5, 2.0], [9.0, 1.0]]),
            mask=torch.tensor([[True, True], [False, True]]))
    log.close()
    recs = read_geffect_log(path)
    assert [(r["step"], r["risk"]) for r in recs] == [(0, "unlearn"), (0, "retain"), (1, "unlearn")]
    w = recs[-1]["weights"]
    assert w["count"] == 3 and w["min"] == 0.5 and w["max"] == 2.0
    assert w["mean"] == pytest.approx(3.5 / 3) and w["std"] == pytest.approx(torch.tensor([0.5, 2, 1.0]).std(
        unbiased=False).item())


def test_resume_truncates_and_repairs(tmp_path):
    path = tmp_path / "ge.jsonl"
    with GEffectLogger(path) as log:
        for step in range(5):
            log.log(step, {"u": result(-step)})
    with open(path, "a") as f:
        f.write('{"step": 5, "risk": "u", "tot')  # torn line from a crash
    # restart from the checkpoint of step 3: steps 3 and 4 are measured again
    with GEffectLogger(path) as log:
        assert [r["step"] for r in read_geffect_log(path)] == [0, 1, 2, 3, 4]  # torn line dropped
        for step in (3, 4, 5):
            log.log(step, {"u": result(-10 * step)})
    raw = read_geffect_log(path, dedupe=False)
    assert [r["step"] for r in raw] == [0, 1, 2, 3, 4, 5]
    assert [r["total"] for r in raw] == [0.0, -1.0, -2.0, -30.0, -40.0, -50.0]
    # explicit resume step
    GEffectLogger(path, resume_step=2).close()
    assert [r["step"] for r in read_geffect_log(path)] == [0, 1]


def test_reader_dedupes_last_wins(tmp_path):
    path = tmp_path / "ge.jsonl"
    recs = [{"step": 0, "risk": "u", "total": 1.0}, {"step": 0, "risk": "r", "total": 2.0},
            {"step": 0, "risk": "u", "total": 3.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert read_geffect_log(path) == recs[1:]
    assert read_geffect_log(path, dedupe=False) == recs
    path.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not a JSON record"):
        read_geffect_log(path)


def test_logger_refuses_nan_and_inf(tmp_path):
    # json.dumps wrote NaN / Infinity measurements, which strict JSON parsers reject
    path = tmp_path / "ge.jsonl"
    log = GEffectLogger(path)
    log.log(0, {"unlearn": result(-1.0)})
    for results, stats in (({"unlearn": result(1.0), "retain": result(float("nan"))}, None),
                           ({"unlearn": result(1.0, risk=float("inf"))}, None),
                           ({"unlearn": result(1.0)}, {"mean": float("nan")})):
        with pytest.raises(ValueError, match="step 1, risk '(retain|unlearn)' holds NaN or inf"):
            log.log(1, results, stats=stats)
    with pytest.raises(ValueError, match=r"ge.jsonl: refusing to write 'inv_conf' is inf.*None"):
        log.log(1, {"unlearn": result(1.0)}, inv_conf=float("inf"))  # extra fields: strict JSON too
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0]  # nothing half-written


def test_logger_bad_input(tmp_path):
    log = GEffectLogger(tmp_path / "ge.jsonl")
    with pytest.raises(ValueError, match="risk name"):
        log.log(0, result(1.0))
    with pytest.raises(TypeError, match="step must be an int"):
        log.log(0.5, {"u": result(1.0)})
    with pytest.raises(TypeError, match="not a GEffectResult"):
        log.log(0, {"u": 1.0})
    with pytest.raises(ValueError, match="collides"):
        log.log(0, {"u": result(1.0)}, total=3)
    with pytest.raises(ValueError, match="does not match"):
        weight_stats(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log(0, {"u": result(1.0)})
    assert weight_stats(torch.ones(2), torch.zeros(2, dtype=torch.bool)) == {"count": 0}


def test_weight_stats_one_function_two_precisions():
    """The G-effect log's statistics (float64, with the count) and the loop's (float32, its logs'
    "weights" as they always were: the formula it had inline) are one function's."""
    from fastgeffect.training.objective_logs import ObjectiveLogs
    from fastgeffect.weight_stats import weight_stats as the_one

    assert weight_stats is the_one
    torch.manual_seed(0)
    w = torch.rand(2, 7) * 3
    mask = torch.rand(2, 7) > 0.3
    flat = w[mask]
    f64 = flat.double()
    assert weight_stats(w, mask) == {"mean": float(f64.mean()), "std": float(f64.std(unbiased=False)),
                                     "min": float(f64.min()), "max": float(f64.max()), "count": int(mask.sum())}

    class Out:  # an ObjectiveOutput of a token-weighted objective
        details = {"weights": w, "mask": mask}

        def logs(self):
            return {"loss": 1.0}
    logs = ObjectiveLogs(1)
    logs.add(Out())
    old = {"mean": float(flat.mean()), "std": float(flat.std(unbiased=False)) if flat.numel() > 1 else 0.0,
           "min": float(flat.min()), "max": float(flat.max())}
    assert logs.result()["weights"] == old  # bit for bit: ==, not approx


def test_step_from_checkpoint():
    assert step_from_checkpoint("out/checkpoint-125", 0) == 125
    assert step_from_checkpoint("out/checkpoint-125/", 0) == 125
    assert step_from_checkpoint("out/step_7.pt", 0) == 7
    assert step_from_checkpoint("final", 4) == 4
    assert step_from_checkpoint({"any": "object"}, 2) == 2


def test_posthoc_matches_direct_and_logs(tmp_path):
    forget, retain = qa_batch(0), qa_batch(1)
    model = tiny_model("llama", layers=2, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ckpts = []
    for step in range(1, 4):  # a few GA steps, saving checkpoints
        opt.zero_grad()
        L.ga(logits_of(model, forget), forget["labels"]).backward()
        opt.step()
        path = tmp_path / f"checkpoint-{step * 10}.pt"
        torch.save(model.state_dict(), path)
        ckpts.append(path)

    def load(path):
        m = tiny_model("llama", layers=2, dtype=torch.float64, seed=99)
        m.load_state_dict(torch.load(path))
        return m

    def risks(m):
        return {"unlearn": lambda: L.nll(logits_of(m, forget), forget["labels"]),
                "retain": lambda: L.nll(logits_of(m, retain), retain["labels"])}

    log_path = tmp_path / "posthoc.jsonl"
    with GEffectLogger(log_path) as log:
        rows = posthoc_geffects(ckpts, load, lambda m: L.ga(logits_of(m, forget), forget["labels"]), risks,
                                logger=log)
    assert [r["step"] for r in rows] == [10, 20, 30]
    for row, path in zip(rows, ckpts):
        m = load(path)
        params = list(m.parameters())
        g_r = flat_grads(L.nll(logits_of(m, forget), forget["labels"]), params)
        assert row["results"]["unlearn"].total == pytest.approx(-sum(float((g * g).sum()) for g in g_r), rel=1e-9)
        assert math.isfinite(row["results"]["retain"].total) and row["loss"] < 0
    recs = read_geffect_log(log_path)
    assert len(recs) == 6 and recs[0]["checkpoint"] == str(ckpts[0]) and recs[0]["objective_loss"] == rows[0]["loss"]

    # a loss_fn that back-propagates itself (e.g. over several batches) returns None
    def self_backward(m):
        for b in (forget, qa_batch(2)):
            (0.5 * L.ga(logits_of(m, b), b["labels"])).backward()

    rows2 = posthoc_geffects(ckpts[:1], load, self_backward, risks, groups="blocks")
    assert rows2[0]["loss"] is None and "block.1" in rows2[0]["results"]["unlearn"].groups
    with pytest.raises(ValueError, match="scalar tensor or None"):
        posthoc_geffects(ckpts[:1], load, lambda m: logits_of(m, forget), risks)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        posthoc_geffects(ckpts[:1], lambda p: None, lambda m: None, risks)


def test_engine_result_roundtrip(tmp_path):
    model = tiny_model("gpt2", layers=2)
    batch = qa_batch(3)
    model.zero_grad(set_to_none=True)
    out, details = L.wga(logits_of(model, batch), batch["labels"], return_details=True)
    out.backward()
    res = GEffect(model).measure({"unlearn": lambda: L.nll(logits_of(model, batch), batch["labels"])})
    with GEffectLogger(tmp_path / "ge.jsonl") as log:
        log.log(0, res, weights=details["weights"], mask=details["mask"])
    rec = read_geffect_log(tmp_path / "ge.jsonl")[0]
    assert rec["tied"] is True and rec["total"] == res["unlearn"].total
    assert rec["groups"] == res["unlearn"].groups and 0 < rec["weights"]["max"] <= 1
