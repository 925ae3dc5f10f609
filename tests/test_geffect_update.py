"""Update effects (issue 17): the step predicted from the optimiser's state against the step it
really takes, in float64; the optimiser state and the G-effects untouched by the measurement;
the bad-input contract; in the unlearning loop, the realised change of each risk against the
prediction."""
import json
import math

import pytest
import torch
from helpers.geffect_logs import abs_sum, assert_same_geffects
from helpers.model_families import flat_grads, logits_of, qa_batch, tiny_model
from helpers.toy_qa import toy_qa_records, toy_tokenizer_for
from transformers import GPT2Config, GPT2LMHeadModel

import fastgeffect.losses as L
from fastgeffect.data.pairs import ForgetRetainDataset
from fastgeffect.data.qa import QADataset
from fastgeffect.data.templates import get_template
from fastgeffect.data.unlearning import UnlearningData
from fastgeffect.geffect import GEffect, read_geffect_log
from fastgeffect.geffect.update import SUPPORTED
from fastgeffect.objectives import get_objective
from fastgeffect.report import compare, group_shares, prediction_quality, with_outcome, write_report
from fastgeffect.unlearn import UnlearnConfig, Unlearner

FORGET, RETAIN = qa_batch(0), qa_batch(1)


def objective(model, seed):
    """GA on a batch that changes with ``seed`` (the warm-up steps see different data)."""
    batch = qa_batch(10 + seed)
    return L.ga(logits_of(model, batch), batch["labels"])


def risks(model):
    return {"unlearn": lambda: L.nll(logits_of(model, FORGET), FORGET["labels"]),
            "retain": lambda: L.nll(logits_of(model, RETAIN), RETAIN["labels"])}


def setup(make_opt, warm_steps, max_grad_norm):
    """A float64 model and its optimiser (two param groups, different lrs), ``warm_steps`` steps in."""
    model = tiny_model("llama", layers=3, seed=3, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt([{"params": params[::2]}, {"params": params[1::2], "lr": 0.5 * 1e-2}])
    for s in range(warm_steps):
        opt.zero_grad(set_to_none=True)
        objective(model, s).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    objective(model, warm_steps).backward()
    return model, params, opt


def lr_of(opt):
    return {id(p): float(g["lr"]) for g in opt.param_groups for p in g["params"]}


OPTIMISERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "sgd_dampening_maximize": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.8, dampening=0.3, maximize=True,
                                                         foreach=True),
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=False),
    "adam_amsgrad_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad_maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, amsgrad=True,
                                                           maximize=True, foreach=False),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
@pytest.mark.parametrize("warm_steps", [0, 3])
@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_predicted_step_is_the_real_step(name, warm_steps, max_grad_norm):
    model, params, opt = setup(OPTIMISERS[name], warm_steps, max_grad_norm)
    engine = GEffect(model, chunk_numel=97 if max_grad_norm else 1 << 20)  # odd chunks split every parameter
    grad_r = {r: flat_grads(fn(), params) for r, fn in risks(model).items()}
    res = engine.measure(risks(model), optimizer=opt, max_grad_norm=max_grad_norm)
    before = [p.detach().clone() for p in params]
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    lrs = lr_of(opt)
    for r, grads in grad_r.items():
        terms = {g: [] for g in engine.group_names}  # -<∇R, Δθ>/lr per parameter, the real step
        for p, b, gid, gr in zip(params, before, engine.grouping.group_ids, grads):
            terms[engine.group_names[gid]].append(-float((gr * (p.detach() - b)).sum()) / lrs[id(p)])
        for g, ts in terms.items():
            scale = sum(abs(t) for t in ts)
            assert scale > 0
            assert abs(res[r].update_groups[g] - math.fsum(ts)) <= 1e-9 * scale, (r, g)
        assert res[r].update_total == pytest.approx(math.fsum(res[r].update_groups.values()), rel=1e-12)
        assert abs(res[r].update_total - math.fsum(t for ts in terms.values() for t in ts)) \
            <= 1e-9 * sum(abs(t) for ts in terms.values() for t in ts)


@pytest.mark.parametrize("warm_steps", [0, 2])
@pytest.mark.parametrize("name", ["sgd_nesterov_wd", "adamw_amsgrad_maximize", "adamw_fused"])
def test_state_and_geffects_untouched(name, warm_steps):
    """Two identical runs, one measuring the update effect: the same optimiser state (bit for bit),
    parameters and G-effects; before its first step the optimiser gets no state entry either."""
    runs = []
    for with_update in (False, True):
        model, params, opt = setup(OPTIMISERS[name], warm_steps, 0.05)
        n_state = len(opt.state)
        res = GEffect(model).measure(risks(model), **({"optimizer": opt, "max_grad_norm": 0.05} if with_update else {}))
        assert len(opt.state) == n_state
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        opt.step()
        runs.append((res, opt.state_dict(), [p.detach().clone() for p in params], len(opt.state)))
    (res0, state0, params0, n0), (res1, state1, params1, n1) = runs
    assert n0 == n1
    for k, s in state0["state"].items():
        assert s.keys() == state1["state"][k].keys()
        for key, v in s.items():
            assert torch.equal(v, state1["state"][k][key]), (k, key)
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    for r in res0:
        assert res0[r].update_groups is None and res1[r].update_groups is not None
        scale = abs_sum(res0[r].groups)
        for g, v in res0[r].groups.items():
            assert abs(res1[r].groups[g] - v) <= 1e-12 * scale
        assert res1[r].to_dict()["update_total"] == res1[r].update_total


def test_plain_sgd_update_effect_is_the_geffect():
    model, params, opt = setup(lambda ps: torch.optim.SGD(ps, lr=1e-2), 2, None)
    res = GEffect(model).measure(risks(model), optimizer=opt)
    for r in res.values():
        scale = abs_sum(r.groups)
        assert scale > 0
        for g, v in r.groups.items():
            assert abs(r.update_groups[g] - v) <= 1e-12 * scale
        assert r.update_total == pytest.approx(r.total, rel=1e-12, abs=1e-12 * scale)


def test_unsupported_optimisers_are_refused():
    model, params, _ = setup(lambda ps: torch.optim.SGD(ps, lr=1e-2), 0, None)
    engine = GEffect(model)
    with pytest.raises(TypeError, match="RMSprop") as err:
        engine.measure(risks(model), optimizer=torch.optim.RMSprop(params))
    assert SUPPORTED in str(err.value)

    class MyAdamW(torch.optim.AdamW):  # a subclass may step differently
        pass

    with pytest.raises(TypeError, match="MyAdamW"):
        engine.measure(risks(model), optimizer=MyAdamW(params))
    with pytest.raises(ValueError, match="differentiable=True"):
        engine.measure(risks(model), optimizer=torch.optim.Adam(params, differentiable=True))
    with pytest.raises(ValueError, match="not in the optimiser's param_groups: model.embed_tokens.weight"):
        engine.measure(risks(model), optimizer=torch.optim.Adam(params[1:]))
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        engine.measure(risks(model), optimizer=torch.optim.Adam(params), max_grad_norm=0.0)
    assert all(p.grad is not None for p in params)  # the objective gradient survives every refusal


def tiny_unlearner(tmp_path, lr, update_effects=True):
    """The unlearning loop on a float64 tiny GPT-2 and toy QA (ΔR of a tiny step needs fp64)."""
    template = get_template("phi")
    records = toy_qa_records(6)
    tok = toy_tokenizer_for(records, template)
    torch.manual_seed(0)  # GPT-2: no float32 casts inside (Llama's RMSNorm has), so R is fp64-exact
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(torch.float64)
    forget, retain = QADataset(records[:4], tok, template, 40), QADataset(records[4:10], tok, template, 40)
    held = QADataset(records[10:], tok, template, 40)
    data = UnlearningData(ForgetRetainDataset(forget, retain, seed=0), forget, retain, held)
    cfg = UnlearnConfig(epochs=2, batch_size=2, lr=lr, warmup_epochs=0, geffect_batch=2, update_effects=update_effects)
    return Unlearner(model, get_objective("ga", regularizer="gd"), data, cfg, tmp_path, progress=False)


def test_realised_change_matches_the_prediction_for_a_tiny_step(tmp_path):
    tiny_unlearner(tmp_path / "on", 1e-7).run()
    records = read_geffect_log(tmp_path / "on" / "geffect.jsonl")
    assert len(records) == 8  # 4 steps, 2 risks
    for r in records:
        assert r["risk_after"] == pytest.approx(r["risk_value"] + r["realised"], rel=1e-12)
        assert r["predicted_gd"] == pytest.approx(-r["lr"] * r["total"], rel=1e-12)
        assert r["predicted_opt"] == pytest.approx(-r["lr"] * r["update_total"], rel=1e-12)
        assert set(r["update_groups"]) == set(r["groups"])
        assert abs(r["realised"] / r["predicted_opt"] - 1) < 1e-3, r  # ΔR = -lr·u + O(lr²)
    tiny_unlearner(tmp_path / "off", 1e-7, update_effects=False).run()
    plain = read_geffect_log(tmp_path / "off" / "geffect.jsonl")
    assert not any(k in r for r in plain for k in ("risk_after", "realised", "update_total"))
    assert_same_geffects(plain, records, 1e-9, groups=True)  # the option does not change the G-effects

    # the report: plot, summary and comparison of the predictions
    for d in ("on", "off"):
        (tmp_path / d / "config.json").write_text(json.dumps({"method": "ga"}))
    summary = write_report(tmp_path / "on").read_text()
    assert "## Predicted and realised changes" in summary and (tmp_path / "on" / "plots" / "updates.png").exists()
    assert "## Predicted and realised changes" not in write_report(tmp_path / "off").read_text()
    for risk in ("unlearn", "retain"):
        q = prediction_quality(with_outcome(records, risk), "predicted_opt")
        assert q["steps"] == 4 and abs(q["median_ratio"] - 1) < 1e-3 and q["corr"] > 0.99 and q["sign_agree"] == 4
        assert f"| {risk} | update effect, −lr·u | 4/4 | {q['iqr_log_ratio']:.4g} | {q['sum_ratio']:.4g} | " \
               f"{q['spearman']:.4g} | {q['median_ratio']:.4g} |" in summary
    table = compare([tmp_path / "on", tmp_path / "off"]).read_text()
    assert "| ga (on) | unlearn |" in table and "(off)" not in table.split("## Predicted vs realised")[1]


def test_prediction_quality_and_group_shares():
    recs = [{"step": s, "risk": "unlearn", "groups": {"a": 1.0, "b": -3.0}, "update_groups": {"a": 2.0, "b": 2.0},
             "realised": 2.0 * (s + 1), "predicted_gd": 0.5 * (s + 1), "predicted_opt": (s + 1) + 0.1 * (s % 2)}
            for s in range(5)]
    recs.append(dict(recs[0], step=5, realised=None))  # an overflowed step: no outcome, left out
    rows = with_outcome(recs, "unlearn")
    assert len(rows) == 5 and with_outcome(recs, "retain") == []
    gd = prediction_quality(rows, "predicted_gd")
    assert gd["corr"] == pytest.approx(1.0, abs=1e-12) and gd["median_ratio"] == pytest.approx(4.0, rel=1e-12)
    opt = prediction_quality(rows, "predicted_opt")
    assert opt["median_ratio"] == pytest.approx(2.0, rel=1e-12) and 0.9 < opt["corr"] < 1.0 and opt["steps"] == 5
    assert prediction_quality(rows[:1], "predicted_gd")["corr"] is None  # one step: no correlation
    assert group_shares(recs, "unlearn", "groups") == {"a": pytest.approx(0.25), "b": pytest.approx(-0.75)}
    assert group_shares(recs, "unlearn", "update_groups") == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
