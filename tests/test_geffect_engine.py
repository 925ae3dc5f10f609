"""GEffect.measure against naive flat-gradient dot products, the GA identity, the untouched
p.grad / optimiser-step contract and the bad-input contract."""
import copy
import math

import pytest
import torch
from helpers.geffect_logs import abs_sum
from helpers.model_families import flat_grads, logits_of, qa_batch, tiny_model

import fastgeffect
import fastgeffect.losses as L
from fastgeffect.geffect import GEffect


def naive_by_group(engine, grads_u, grads_r):
    """Per-group float64 dot products of the naive flat gradients."""
    out = {g: 0.0 for g in engine.group_names}
    for _p, gid, gu, gr in zip(engine.grouping.params, engine.grouping.group_ids, grads_u, grads_r):
        out[engine.group_names[gid]] += float((gu * gr).sum())
    return out


def check_against_naive(model, objective, risks, rtol):
    """Backward the objective, measure, and compare every group and the total to flat vectors."""
    engine = GEffect(model)
    params = engine.grouping.params
    grads_u = flat_grads(objective(), params)
    model.zero_grad(set_to_none=True)
    objective().backward()
    results = engine.measure(risks)
    for name, fn in risks.items():
        ref = naive_by_group(engine, grads_u, flat_grads(fn(), params))
        res = results[name]
        scale = sum(abs(v) for v in ref.values())
        for g in engine.group_names:
            assert abs(res.groups[g] - ref[g]) <= rtol * scale, (name, g, res.groups[g], ref[g])
        assert res.total == pytest.approx(sum(ref.values()), rel=rtol, abs=rtol * scale)
        assert abs(res.total - math.fsum(res.groups.values())) <= 1e-12 * abs_sum(res.groups)
    return results


def test_ga_identity_float64():
    model = tiny_model("llama", dtype=torch.float64)
    forget = qa_batch(0)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, forget), forget["labels"]).backward()
    res = GEffect(model).measure({"unlearn": lambda: L.nll(logits_of(model, forget), forget["labels"])})["unlearn"]
    params = [p for p in model.parameters() if p.requires_grad]
    g = flat_grads(L.nll(logits_of(model, forget), forget["labels"]), params)
    norm2 = sum(float((x * x).sum()) for x in g)
    assert res.total == pytest.approx(-norm2, rel=1e-6)
    assert res.total < 0
    with torch.no_grad():
        assert res.risk == pytest.approx(float(L.nll(logits_of(model, forget), forget["labels"])), rel=1e-12)
    assert set(res.groups) == {"embed", "shallow", "middle", "deep", "lm"}
    assert res.to_dict()["total"] == res.total and res.tied is False


def _ref_logprobs(model, batch):
    with torch.no_grad():
        return L.token_logprobs(logits_of(model, batch), batch["labels"]) - 0.3


@pytest.mark.parametrize("objective_name", ["wga", "npo", "tnpo", "random"])
def test_objectives_match_naive_fp32(objective_name):
    model = tiny_model("llama", layers=4, seed=1)
    forget, retain = qa_batch(1), qa_batch(2)
    ref = _ref_logprobs(model, forget)
    w = torch.randn(forget["labels"].shape, generator=torch.Generator().manual_seed(5))

    def objective():
        logits = logits_of(model, forget)
        if objective_name == "wga":
            return L.wga(logits, forget["labels"], alpha=0.7)
        if objective_name == "npo":
            return L.npo(logits, forget["labels"], ref, beta=0.5)
        if objective_name == "tnpo":
            return L.tnpo(logits, forget["labels"], ref, beta=4.0)
        # "random": an arbitrary smooth loss with random signed token weights
        lp = L.token_logprobs(logits, forget["labels"])
        return (w * lp * L.valid_mask(forget["labels"])).sum() / 7.0 + logits.pow(2).mean() * 0.01

    risks = {"unlearn": lambda: L.nll(logits_of(model, forget), forget["labels"]),
             "retain": lambda: L.nll(logits_of(model, retain), retain["labels"])}
    check_against_naive(model, objective, risks, rtol=1e-5)


def test_rmu_plus_kl_matches_naive_fp32():
    model = tiny_model("llama", layers=4, seed=2)
    frozen = copy.deepcopy(model).requires_grad_(False)
    forget, retain = qa_batch(3), qa_batch(4)
    control = L.control_vector(model.config.hidden_size, coeff=4.0, seed=0)

    def objective():
        out = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"], output_hidden_states=True)
        rmu = L.rmu(out.hidden_states[2], forget["labels"], control)
        with torch.no_grad():
            ref_logits = logits_of(frozen, retain)
        return rmu + L.kl(logits_of(model, retain), ref_logits)

    risks = {"unlearn": lambda: L.nll(logits_of(model, forget), forget["labels"]),
             "retain": lambda: L.nll(logits_of(model, retain), retain["labels"])}
    res = check_against_naive(model, objective, risks, rtol=1e-5)
    assert res["unlearn"].groups["deep"] != 0.0  # KL reaches every block


@pytest.mark.parametrize("groups", ["blocks", "params"])
def test_other_groupings_sum_to_total(groups):
    model = tiny_model("gpt2", layers=3, dtype=torch.float64)
    forget = qa_batch(5)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, forget), forget["labels"]).backward()
    risk = {"r": lambda: L.nll(logits_of(model, forget), forget["labels"])}
    a = GEffect(model, groups=groups).measure(risk)["r"]
    b = GEffect(model, groups="paper").measure(risk)["r"]
    assert a.total == pytest.approx(b.total, rel=1e-12)
    assert a.tied and b.tied and b.groups["lm"] == 0.0


def test_chunking_and_batching_do_not_change_results():
    model = tiny_model("llama", layers=3, dtype=torch.float64)
    forget = qa_batch(6)
    model.zero_grad(set_to_none=True)
    L.wga(logits_of(model, forget), forget["labels"]).backward()
    risk = {"r": lambda: L.nll(logits_of(model, forget), forget["labels"])}
    base = GEffect(model).measure(risk)["r"]
    tiny = GEffect(model, chunk_numel=7, max_pending_bytes=0).measure(risk)["r"]
    big = GEffect(model, chunk_numel=1 << 30, max_pending_bytes=1 << 40).measure(risk)["r"]
    for other in (tiny, big):
        for g in base.groups:
            assert abs(other.groups[g] - base.groups[g]) <= 1e-12 * abs_sum(base.groups), g


def test_accumulate_dtype_default_and_explicit():
    model = tiny_model("llama", layers=2)
    forget = qa_batch(7)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, forget), forget["labels"]).backward()
    risk = {"r": lambda: L.nll(logits_of(model, forget), forget["labels"])}
    r64 = GEffect(model).measure(risk)["r"].total
    r32 = GEffect(model, accumulate_dtype=torch.float32).measure(risk)["r"].total
    assert r32 == pytest.approx(r64, rel=1e-5)
    with pytest.raises(ValueError, match="accumulate_dtype"):
        GEffect(model, accumulate_dtype=torch.bfloat16)


def test_grads_untouched_and_optimizer_step_bit_identical():
    torch.manual_seed(0)
    model_a = tiny_model("llama", layers=3, seed=3)
    model_b = copy.deepcopy(model_a)
    forget, retain = qa_batch(8), qa_batch(9)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    engine = GEffect(model_a)
    ref = _ref_logprobs(model_b, forget)
    for _step in range(2):
        for m in (model_a, model_b):
            m.zero_grad(set_to_none=True)
            L.tnpo(logits_of(m, forget), forget["labels"], ref).backward()
        before = [(p.grad, p.grad.clone()) for p in model_a.parameters()]
        engine.measure({"unlearn": lambda: L.nll(logits_of(model_a, forget), forget["labels"]),
                        "retain": lambda: L.nll(logits_of(model_a, retain), retain["labels"])})
        for p, (g, gc) in zip(model_a.parameters(), before):
            assert p.grad is g and torch.equal(p.grad, gc)
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            assert torch.equal(pa, pb)


def test_measure_under_no_grad_and_none_grads_count_zero():
    model = tiny_model("llama", layers=2, dtype=torch.float64)
    forget = qa_batch(10)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, forget), forget["labels"]).backward()
    model.lm_head.weight.grad = None  # a parameter the objective did not reach
    engine = GEffect(model)
    with torch.no_grad():
        res = engine.measure({"r": lambda: L.nll(logits_of(model, forget), forget["labels"])})["r"]
    assert res.groups["lm"] == 0.0 and res.groups["embed"] < 0
    assert model.lm_head.weight.grad is None


def test_frozen_parameters_are_ignored():
    model = tiny_model("llama", layers=3, dtype=torch.float64)
    model.model.embed_tokens.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    forget = qa_batch(11)
    engine = GEffect(model)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, forget), forget["labels"]).backward()
    res = engine.measure({"r": lambda: L.nll(logits_of(model, forget), forget["labels"])})["r"]
    assert res.groups["embed"] == 0.0 and res.groups["lm"] == 0.0
    params = engine.grouping.params
    norm2 = sum(float((g * g).sum()) for g in flat_grads(L.nll(logits_of(model, forget), forget["labels"]), params))
    assert res.total == pytest.approx(-norm2, rel=1e-9)


def test_top_level_import():
    assert fastgeffect.GEffect is GEffect


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def trained():
    model = tiny_model("llama", layers=2)
    batch = qa_batch(12)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, batch), batch["labels"]).backward()
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    return model, batch, grads


def assert_grads_restored(model, grads):
    for p, (g, gc) in zip(model.parameters(), grads):
        assert p.grad is g and torch.equal(p.grad, gc)


def test_no_trainable_parameters():
    model = tiny_model("llama", layers=2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GEffect(model)


def test_measure_before_backward():
    model = tiny_model("llama", layers=2)
    batch = qa_batch(0)
    with pytest.raises(RuntimeError, match="loss.backward"):
        GEffect(model).measure({"r": lambda: L.nll(logits_of(model, batch), batch["labels"])})


@pytest.mark.parametrize("bad, exc, msg", [
    (lambda logits, labels: L.token_logprobs(logits, labels), ValueError, "scalar"),
    (lambda logits, labels: L.nll(logits, labels) * float("nan"), FloatingPointError, "not finite"),
    (lambda logits, labels: L.nll(logits, labels) + float("inf"), FloatingPointError, "not finite"),
    (lambda logits, labels: L.nll(logits, labels).detach(), ValueError, "does not depend"),
    (lambda logits, labels: 3.0, TypeError, "must return a tensor"),
])
def test_bad_risk_values_leave_no_gradient_behind(trained, bad, exc, msg):
    model, batch, grads = trained
    engine = GEffect(model)
    risks = {"ok": lambda: L.nll(logits_of(model, batch), batch["labels"]),
             "bad": lambda: bad(logits_of(model, batch), batch["labels"])}
    with pytest.raises(exc, match=msg):
        engine.measure(risks)
    assert_grads_restored(model, grads)


def test_risk_raising_midway_leaves_no_gradient_behind(trained):
    model, batch, grads = trained
    engine = GEffect(model)

    def explode():
        L.nll(logits_of(model, batch), batch["labels"]).backward()  # gradients half-made ...
        raise KeyError("boom")  # ... then the callable fails

    with pytest.raises(KeyError, match="boom"):
        engine.measure({"ok": lambda: L.nll(logits_of(model, batch), batch["labels"]), "bad": explode})
    assert_grads_restored(model, grads)
    # and the engine still works afterwards
    res = engine.measure({"ok": lambda: L.nll(logits_of(model, batch), batch["labels"])})
    assert math.isfinite(res["ok"].total)
    assert_grads_restored(model, grads)


def nan_gradient(x):
    """0 with a NaN gradient: d sqrt(u)/du at u = 0 is inf, times the 0 of the chain rule."""
    return torch.sqrt(x - x.detach()).sum() * 0.0


def test_non_finite_objective_gradient_is_named(trained):
    # NaN in p.grad (finite risk values) gave NaN G-effects without an error
    model, batch, grads = trained
    engine = GEffect(model)
    name = engine.grouping.members("deep")[0]
    p = dict(model.named_parameters())[name]
    saved = p.grad.clone()
    p.grad.view(-1)[0] = float("nan")
    risks = {"unlearn": lambda: L.nll(logits_of(model, batch), batch["labels"]),
             "retain": lambda: L.nll(logits_of(model, batch), batch["labels"]) * 2}
    msg = r"risk 'unlearn' in group\(s\) deep; risk 'retain' in group\(s\) deep: the objective gradient \(p.grad\) " \
          r"is non-finite in group\(s\) deep"
    with pytest.raises(FloatingPointError, match=msg):
        engine.measure(risks)
    p.grad.copy_(saved)
    assert_grads_restored(model, grads)


def test_non_finite_risk_gradient_is_named(trained):
    # a risk with a finite value and a NaN gradient in one group
    model, batch, grads = trained
    engine = GEffect(model)
    name = engine.grouping.members("middle")[0]
    p = dict(model.named_parameters())[name]
    risks = {"ok": lambda: L.nll(logits_of(model, batch), batch["labels"]),
             "bad": lambda: L.nll(logits_of(model, batch), batch["labels"]) + nan_gradient(p)}
    msg = (r"for risk 'bad' in group\(s\) middle: the objective gradient \(p.grad\) is finite there, "
           r"so the risk's gradient \(its value is finite\) is non-finite")
    with pytest.raises(FloatingPointError, match=msg):
        engine.measure(risks)
    assert_grads_restored(model, grads)
    assert math.isfinite(engine.measure({"ok": risks["ok"]})["ok"].total)


def test_bad_risks_argument(trained):
    model, _, grads = trained
    engine = GEffect(model)
    with pytest.raises(ValueError, match="non-empty dict"):
        engine.measure({})
    with pytest.raises(ValueError, match="non-empty dict"):
        engine.measure([lambda: 0])
    with pytest.raises(TypeError, match="callable"):
        engine.measure({"r": 1.0})
    assert_grads_restored(model, grads)


def test_trainable_set_changed(trained):
    model, batch, _ = trained
    engine = GEffect(model)
    model.lm_head.requires_grad_(False)
    with pytest.raises(RuntimeError, match="changed"):
        engine.measure({"r": lambda: L.nll(logits_of(model, batch), batch["labels"])})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp32 accumulation on device)")
def test_cuda_matches_cpu_float64():
    from fastgeffect.geffect import per_sample_geffects

    cpu = tiny_model("llama", layers=3, dtype=torch.float64)
    gpu = copy.deepcopy(cpu).float().cuda()
    batch = qa_batch(13)
    gbatch = {k: v.cuda() for k, v in batch.items()}
    results = []
    for model, b in ((cpu, batch), (gpu, gbatch)):
        model.zero_grad(set_to_none=True)
        L.wga(logits_of(model, b), b["labels"]).backward()
        results.append(GEffect(model).measure({"r": lambda: L.nll(logits_of(model, b), b["labels"])})["r"])
    for g in results[0].groups:
        assert abs(results[1].groups[g] - results[0].groups[g]) <= 1e-4 * abs_sum(results[0].groups), g

    def terms(model, b):
        lp = L.token_logprobs(logits_of(model, b), b["labels"])
        m = L.valid_mask(b["labels"])
        return (lp * m).sum(1) / m.sum()

    v_cpu = per_sample_geffects(cpu, lambda: L.nll(logits_of(cpu, batch), batch["labels"]), lambda: terms(cpu, batch))
    v_gpu = per_sample_geffects(gpu, lambda: L.nll(logits_of(gpu, gbatch), gbatch["labels"]),
                                lambda: terms(gpu, gbatch))
    torch.testing.assert_close(v_gpu.double(), v_cpu, rtol=0, atol=1e-4 * float(v_cpu.abs().sum()))
