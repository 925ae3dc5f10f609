"""Optimiser parity of the update effect (issue 28, item 6): AdamW's decoupled decay decided from
the optimiser's class where the param group lacks ``decoupled_weight_decay`` (torch before the
AdamW/Adam merge), and ``update_change`` = ⟨∇R, Δθ⟩ with each param group at its own learning
rate, against the real step, in float64."""
import math

import pytest
import torch
from helpers.model_families import flat_grads, logits_of, qa_batch, tiny_model

import fastgeffect.losses as L
from fastgeffect.geffect import GEffect

FORGET, RETAIN = qa_batch(0), qa_batch(1)


def risks(model):
    return {"unlearn": lambda: L.nll(logits_of(model, FORGET), FORGET["labels"]),
            "retain": lambda: L.nll(logits_of(model, RETAIN), RETAIN["labels"])}


def warmed(make_opt, arch="llama", lrs=(1e-2, 5e-3), warm_steps=2):
    """A float64 tiny model, its optimiser over two interleaved param groups at ``lrs``, ``warm_steps``
    steps of GA in, and the next objective gradient in p.grad."""
    model = tiny_model(arch, layers=2, seed=4, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt([{"params": params[::2], "lr": lrs[0]}, {"params": params[1::2], "lr": lrs[1]}])
    for s in range(warm_steps + 1):
        opt.zero_grad(set_to_none=True)
        batch = qa_batch(10 + s)
        L.ga(logits_of(model, batch), batch["labels"]).backward()
        if s < warm_steps:
            opt.step()
    return model, params, opt


def real_change(model, params, opt):
    """Per risk, Σ_p ⟨∇_p R, Δθ_p⟩ of the step ``opt`` takes now, with its scale Σ_p |⟨∇_p R, Δθ_p⟩|."""
    grads = {r: flat_grads(fn(), params) for r, fn in risks(model).items()}
    before = [p.detach().clone() for p in params]
    opt.step()
    out = {}
    for r, gs in grads.items():
        terms = [float((g * (p.detach() - b)).sum()) for p, b, g in zip(params, before, gs)]
        out[r] = (math.fsum(terms), sum(abs(t) for t in terms))
    return out


def predicted(model, opt):
    res = GEffect(model, chunk_numel=61).measure(risks(model), optimizer=opt)
    return {r: (x.update_total, x.update_change, x.update_change_groups) for r, x in res.items()}


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_missing_decoupled_key_is_decided_by_the_optimisers_class(cls):
    model, params, opt = warmed(lambda groups: cls(groups, weight_decay=0.5, foreach=False))
    with_key = predicted(model, opt)
    keys = [g.pop("decoupled_weight_decay") for g in opt.param_groups]  # as torch < the AdamW/Adam merge
    assert keys == [cls is torch.optim.AdamW] * 2
    without_key = predicted(model, opt)
    for r in with_key:  # the very same numbers: AdamW decoupled, Adam L2
        assert without_key[r][:2] == with_key[r][:2], r
    # and the opposite mode gives another step (weight decay 0.5 is far from negligible)
    for g in opt.param_groups:
        g["decoupled_weight_decay"] = cls is not torch.optim.AdamW
    other = predicted(model, opt)
    for g, k in zip(opt.param_groups, keys):
        g["decoupled_weight_decay"] = k  # the real step needs the key on this torch
    real = real_change(model, params, opt)
    for r, (change, scale) in real.items():
        assert abs(without_key[r][1] - change) <= 1e-10 * scale, r
        assert abs(other[r][1] - change) > 1e-3 * scale, r


@pytest.mark.parametrize("name, make_opt", [
    ("adamw", lambda groups: torch.optim.AdamW(groups, weight_decay=0.1)),
    ("sgd_momentum", lambda groups: torch.optim.SGD(groups, momentum=0.9, weight_decay=0.1)),
])
def test_update_change_uses_each_param_groups_lr(name, make_opt):
    """⟨∇R, Δθ⟩ per layer group against the real step, groups at lrs 1e-2 and 2.5e-3; with one
    shared lr it is -lr·u."""
    model, params, opt = warmed(make_opt)
    pred = predicted(model, opt)
    engine = GEffect(model)
    real = real_change(model, params, opt)
    for r, (change, scale) in real.items():
        u, dtheta, groups = pred[r]
        assert set(groups) == set(engine.group_names)
        assert abs(dtheta - change) <= 1e-10 * scale, (r, dtheta, change)
        assert dtheta == pytest.approx(math.fsum(groups.values()), rel=1e-12, abs=1e-15 * scale)
        for lr in (1e-2, 2.5e-3):  # one lr for every group (the old -lr·u) misses the real step
            assert abs(-lr * u - change) > 1e-3 * scale, (r, lr)
    model, params, opt = warmed(make_opt, lrs=(3e-3, 3e-3))
    for u, dtheta, groups in predicted(model, opt).values():
        scale = sum(abs(v) for v in groups.values())
        assert abs(dtheta - (-3e-3 * u)) <= 1e-12 * scale


def test_update_change_predicts_the_realised_change_of_a_tiny_step():
    """The first-order change of R under a real AdamW step with two param groups at different lrs:
    R(θ + Δθ) - R(θ) = ⟨∇R, Δθ⟩ + O(|Δθ|²), on GPT-2 (fp64 throughout)."""
    model, params, opt = warmed(lambda groups: torch.optim.AdamW(groups, weight_decay=0.1), arch="gpt2",
                                lrs=(1e-7, 4e-7))
    pred = predicted(model, opt)
    with torch.no_grad():
        before = {r: float(fn()) for r, fn in risks(model).items()}
    real = real_change(model, params, opt)
    with torch.no_grad():
        after = {r: float(fn()) for r, fn in risks(model).items()}
    for r in before:
        realised, (u, dtheta, _), (_, scale) = after[r] - before[r], pred[r], real[r]
        assert abs(realised - dtheta) <= 1e-3 * scale, (r, realised, dtheta)  # second order: ~lr·scale
        assert abs(realised - (-1e-7 * u)) > 1e-2 * scale  # one lr for every group does not
