"""Registry, objective objects, reference caching and the exactness of accumulation."""
import copy

import pytest
import torch
from helpers.tiny_models import paired_batches, qa_batch, tiny_llama

import fastgeffect.losses as L
from fastgeffect.objectives import HPARAMS, OBJECTIVES, REGULARIZER_NAMES, REGULARIZERS, get_objective
from fastgeffect.objectives.base import count_items
from fastgeffect.reference import ReferenceModel, RefLogprobCache

EXPECTED = {"ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu", "graddiff", "simnpo", "dpo", "idkdpo",
            "satimp", "undial", "ceu"}


def test_registry_names_and_defaults():
    assert set(OBJECTIVES) == EXPECTED
    assert set(REGULARIZER_NAMES) == {"none", "gd", "kl", "rr"}
    assert get_objective("wga").hparams["alpha"] == 5.0
    assert get_objective("npo").hparams["beta"] == 0.5
    assert get_objective("tnpo").hparams["beta"] == 4.0
    w = get_objective("wtnpo").hparams
    assert (w["alpha"], w["beta"], w["wtnpo_form"]) == (1.5, 4.0, "eq16")
    assert get_objective("graddiff").regularizer == "gd"
    assert get_objective("ga").regularizer == "none"
    assert get_objective("TNPO", regularizer="kl").hparams["kl_positions"] == "all"
    # open-unlearning's configured values and pairings (configs/trainer/SatImp.yaml, UNDIAL.yaml, CEU.yaml)
    s = get_objective("satimp")
    assert (s.hparams["beta1"], s.hparams["beta2"], s.regularizer) == (5.0, 1.0, "gd")
    assert (get_objective("undial").hparams["beta"], get_objective("undial").regularizer) == (10.0, "none")
    c = get_objective("ceu")
    assert (c.hparams["ignore_first_n_answer_tokens"], c.regularizer) == (1, "none")


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="unknown objective 'bogus'; valid: ga, wga"):
        get_objective("bogus")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['gamma'\].*valid: \['alpha'\]"):
        get_objective("wga", gamma=1.0)
    with pytest.raises(ValueError, match="unknown regularizer 'l2'"):
        get_objective("ga", regularizer="l2")


def test_missing_batches_are_named():
    model = tiny_llama()
    with pytest.raises(KeyError, match=r"needs batches \['forget_idk'\]"):
        get_objective("po")(model, {"forget": qa_batch(0)})
    with pytest.raises(ValueError, match="reference log-probabilities"):
        get_objective("tnpo")(model, {"forget": {k: v for k, v in qa_batch(0).items() if k != "index"}})


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("reg", ["none", "gd", "kl", "rr"])
def test_every_objective_and_regularizer_backpropagates(name, reg):
    model = tiny_llama()
    ref = ReferenceModel(copy.deepcopy(model))
    out = get_objective(name, regularizer=reg, reference=ref)(model, paired_batches())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert (out.reg_loss is None) == (reg == "none")


def test_objective_matches_functional_loss():
    model = tiny_llama()
    ref = ReferenceModel(copy.deepcopy(model))
    b = paired_batches(1)
    with torch.no_grad():
        logits = model(input_ids=b["forget"]["input_ids"]).logits
        ref_lp = L.token_logprobs(ref.logits(b["forget"]), b["forget"]["labels"])
        r_logits = model(input_ids=b["retain"]["input_ids"]).logits
    out = get_objective("tnpo", regularizer="gd", lam=0.5, beta=2.0, reference=ref)(model, b)
    expect = L.tnpo(logits, b["forget"]["labels"], ref_lp, beta=2.0) + 0.5 * L.gd(r_logits, b["retain"]["labels"])
    torch.testing.assert_close(out.loss.detach(), expect)


def test_tnpo_with_reference_equal_to_model_is_ga():
    model = tiny_llama()
    b = paired_batches(2)
    tnpo = get_objective("tnpo", reference=ReferenceModel(copy.deepcopy(model)))(model, b).loss
    ga = get_objective("ga")(model, b).loss
    torch.testing.assert_close(tnpo, ga)


def test_ref_cache_matches_reference_model_under_other_padding():
    model = tiny_llama()
    ref = ReferenceModel(copy.deepcopy(model))
    b = qa_batch(3, b=4, t=12)
    cache = RefLogprobCache.compute(ref, [b])
    assert len(cache) == 4
    # the same samples in another order and with extra right padding
    perm = torch.tensor([2, 0, 3, 1])
    pad = 3
    b2 = {k: v[perm] for k, v in b.items()}
    b2["input_ids"] = torch.cat([b2["input_ids"], torch.zeros(4, pad, dtype=torch.long)], 1)
    b2["attention_mask"] = torch.cat([b2["attention_mask"], torch.zeros(4, pad, dtype=torch.long)], 1)
    b2["labels"] = torch.cat([b2["labels"], torch.full((4, pad), -100)], 1)
    gathered = cache.gather(b2["index"], b2["labels"])
    direct = ref.token_logprobs(b)[perm]
    torch.testing.assert_close(gathered[:, :12], direct.float())
    assert (gathered[:, 12:] == 0).all()
    with pytest.raises(KeyError, match="no cached reference"):
        cache.gather(torch.tensor([99]), b["labels"][:1])


def test_ref_cache_roundtrip_and_objective_use(tmp_path):
    model = tiny_llama()
    ref = ReferenceModel(copy.deepcopy(model))
    b = paired_batches(4)
    cache = RefLogprobCache.compute(ref, [b["forget"]])
    cache.save(tmp_path / "ref.pt")
    loaded = RefLogprobCache.load(tmp_path / "ref.pt")
    with_cache = get_objective("npo", ref_cache=loaded)(model, b).loss
    with_model = get_objective("npo", reference=ref)(model, b).loss
    torch.testing.assert_close(with_cache, with_model)


def test_peft_reference_is_base_model():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    base_copy = copy.deepcopy(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    b = qa_batch(5)
    ref = ReferenceModel.from_peft(lora)
    with torch.no_grad():
        inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        expect = L.token_logprobs(base_copy(**inputs).logits, b["labels"])
        adapted = L.token_logprobs(lora(**inputs).logits, b["labels"])
    torch.testing.assert_close(ref.token_logprobs(b), expect)
    assert not torch.allclose(adapted, expect)  # the adapters do change the model
    out = get_objective("tnpo", reference=ref)(lora, {"forget": b})
    out.loss.backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora" not in n)


@pytest.mark.parametrize("name,reg", [("ga", "gd"), ("npo", "kl"), ("rmu", "rr"), ("tnpo", "none"),
                                      ("po", "none"), ("idkdpo", "gd"), ("simnpo", "gd"), ("satimp", "gd"),
                                      ("undial", "none"), ("ceu", "kl")])
def test_objective_accumulation_is_exact(name, reg):
    model = tiny_llama()
    ref = ReferenceModel(copy.deepcopy(model))
    obj = get_objective(name, regularizer=reg, reference=ref)
    full = paired_batches(6, b=4)
    halves = [{k: {f: v[s] for f, v in sub.items()} for k, sub in full.items()} for s in (slice(0, 2), slice(2, 4))]
    obj(model, full).loss.backward()
    g_full = [p.grad for p in model.parameters()]  # RMU leaves blocks after its layer without a grad
    model.zero_grad(set_to_none=True)
    counts = count_items(full)
    for h in halves:
        obj(model, h, num_items=counts).loss.backward()
    assert any(a is not None for a in g_full)
    for a, p in zip(g_full, model.parameters()):
        assert (a is None) == (p.grad is None)
        if a is not None:
            torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ga", "wga", "npo", "tnpo", "wtnpo", "po", "rmu", "simnpo", "idkdpo",
                                  "satimp", "undial", "ceu"])
def test_per_sample_forget_terms_sum_to_batch(name):
    model = tiny_llama()
    obj = get_objective(name, reference=ReferenceModel(copy.deepcopy(model)))
    b = paired_batches(7)
    parts, _ = obj.forget_loss(model, b, per_sample=True)
    whole, _ = obj.forget_loss(model, b)
    assert parts.shape == (3,)
    torch.testing.assert_close(parts.sum(), whole)


@pytest.mark.parametrize("name,reg", [("ga", "gd"), ("wga", "none"), ("tnpo", "gd"), ("wtnpo", "none"), ("po", "none"),
                                      ("satimp", "gd")])
def test_fused_path_matches_materialised_logits(name, reg):
    model = tiny_llama()
    ref = ReferenceModel(copy.deepcopy(model))
    b = paired_batches(8)
    grads = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        hp = {"wtnpo_form": "product"} if name == "wtnpo" else {}
        out = get_objective(name, regularizer=reg, reference=ref, fused=fused, **hp)(model, b)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()], out.details))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for key in ("weights", "logprobs", "mask", "nll"):  # the same logging details on both paths
        torch.testing.assert_close(grads[1][2][key], grads[0][2][key], rtol=1e-5, atol=1e-6)
    for a, c in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_every_hyper_parameter_has_one_name_in_the_table():
    used = {k for t in OBJECTIVES.values() for k in t.defaults} | {k for r in REGULARIZERS.values() for k in r.defaults}
    assert used == set(HPARAMS)
    for t in [*OBJECTIVES.values(), *REGULARIZERS.values()]:
        for k, v in t.defaults.items():
            h = HPARAMS[k]
            assert isinstance(v, h.type) and (h.choices is None or v in h.choices), (t.name, k)
    with pytest.raises(ValueError, match="wtnpo: wtnpo_form must be one of eq16, product, got 'x'"):
        get_objective("wtnpo", wtnpo_form="x")


def test_registry_flags():
    assert {n for n, t in OBJECTIVES.items() if t.needs_reference} == {"npo", "tnpo", "wtnpo", "dpo", "idkdpo"}
    assert OBJECTIVES["dpo"].ref_batches == ("forget", "forget_win")
    assert OBJECTIVES["idkdpo"].ref_batches == ("forget", "forget_idk")
    assert {n for n, t in OBJECTIVES.items() if t.needs_refusals} == {"po", "dpo", "idkdpo"}
    assert {n for n, r in REGULARIZERS.items() if r.needs_reference_model} == {"kl", "rr"}
    assert get_objective("npo", regularizer="kl").needs_reference_model
    # UNDIAL reads θ_o's full logits: the model itself, never the per-token cache
    assert {n for n, t in OBJECTIVES.items() if t.needs_reference_model} == {"undial"}
    assert get_objective("undial").needs_reference_model and not OBJECTIVES["undial"].needs_reference


def _split(batches, s):
    return {k: {f: v[s] for f, v in sub.items()} for k, sub in batches.items()}


@pytest.mark.parametrize("positions", ["all", "answer"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_kl_regularizer_matches_unfused_in_float64(positions, direction):
    model = tiny_llama().double()
    ref = ReferenceModel(tiny_llama(seed=1).double())  # another θ_o, so that the KL is far from 0
    b = paired_batches(9, b=4)
    hp = {"kl_positions": positions, "kl_direction": direction}
    runs = []
    for fused in (False, True):
        obj = get_objective("ga", regularizer="kl", reference=ref, fused=fused, **hp)
        model.zero_grad(set_to_none=True)
        head_calls = []
        hook = model.get_output_embeddings().register_forward_hook(lambda *a, calls=head_calls: calls.append(1))
        out = obj(model, b)
        hook.remove()
        assert bool(head_calls) != fused  # the fused path never materialises the logits
        out.reg_loss.backward()
        runs.append((out.reg_loss.detach(), [p.grad.clone() for p in model.parameters()]))
        # accumulation: two halves with the whole batch's counts give the same loss
        halves = [obj(model, _split(b, s), num_items=count_items(b)).reg_loss.detach()
                  for s in (slice(0, 2), slice(2, 4))]
        torch.testing.assert_close(sum(halves), out.reg_loss.detach(), rtol=1e-12, atol=1e-14)
    (loss, grads), (fused_loss, fused_grads) = runs
    assert float(loss) > 1e-3
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-14)
    for a, c in zip(grads, fused_grads):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-13)


def test_fused_kl_regularizer_with_a_peft_reference_takes_the_unfused_path():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    ref = ReferenceModel.from_peft(lora)
    b = paired_batches(10)
    losses = [get_objective("ga", regularizer="kl", reference=ref, fused=fused)(lora, b).reg_loss.detach()
              for fused in (False, True)]
    torch.testing.assert_close(losses[1], losses[0])


def test_undial_objective_uses_the_reference_models_full_logits():
    model = tiny_llama()
    ref = ReferenceModel(tiny_llama(seed=1))  # another θ_o: the teacher is not the student
    b = paired_batches(11)
    f = b["forget"]
    with torch.no_grad():
        want = L.undial(model(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits, f["labels"],
                        ref.logits(f), 3.0)
    torch.testing.assert_close(get_objective("undial", reference=ref, beta=3.0)(model, b).loss.detach(), want)
    with pytest.raises(ValueError, match="undial needs the original model's full logits"):
        get_objective("undial")(model, b)


def test_ceu_objective_under_accumulation_refuses_short_answers():
    model = tiny_llama()
    b = paired_batches(12)
    short = {**b["forget"], "labels": b["forget"]["labels"].clone()}
    short["labels"][0, :] = -100
    short["labels"][0, -1] = 5  # one answer token, fewer than n = 2
    with pytest.raises(ValueError, match=r"sequences \[0\] of the batch have fewer than 2 answer token"):
        get_objective("ceu", ignore_first_n_answer_tokens=2)(model, {"forget": short}, num_items=count_items(b))


def test_pdu_dual_update_follows_a_hand_computed_sequence():
    """λ ← max(0, λ + η·(reg_loss − ε)) with λ₀ = 1, η = 0.5, ε = 1: worked out by hand."""
    from fastgeffect.objectives.regularizers import dual_ascent

    obj = get_objective("ga", regularizer="gd", lam=1.0, constraint_eps=1.0, dual_step=0.5)
    assert obj.primal_dual and not get_objective("ga", regularizer="gd").primal_dual
    reg_losses = [3.0, 0.2, 0.0, 0.0, 0.0, 0.0, 3.0]
    expect = [2.0, 1.6, 1.1, 0.6, 0.1, 0.0, 1.0]  # 1 + .5·2, 2 − .5·.8, ..., max(0, 0.1 − 0.5), 0 + .5·2
    got = [obj.dual_update(r) for r in reg_losses]
    assert got == pytest.approx(expect, abs=1e-12)
    assert obj.lam == pytest.approx(1.0)
    assert dual_ascent(0.3, 0.5, 1.0, 2.0) == 0.0
    # the loss weighs the regulariser by the current λ
    model = tiny_llama()
    b = paired_batches(13)
    out = obj(model, b)
    torch.testing.assert_close(out.loss, out.forget_loss + 1.0 * out.reg_loss)
    obj.dual_update(float(out.reg_loss.detach()) + 2.0)  # λ = 1 + .5·(reg + 2 − 1)
    assert obj.lam == pytest.approx(1.5 + 0.5 * float(out.reg_loss))
    out2 = obj(model, b)
    torch.testing.assert_close(out2.loss, out2.forget_loss + obj.lam * out2.reg_loss)


def test_pdu_needs_both_its_settings():
    with pytest.raises(ValueError, match="give a dual step dual_step > 0 too"):
        get_objective("ga", regularizer="gd", constraint_eps=0.5)
    with pytest.raises(ValueError, match="give its retain bound constraint_eps too"):
        get_objective("ga", regularizer="kl", dual_step=1.0)
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['constraint_eps', 'dual_step'\].*"
                                         "PDU.*choose gd, kl or rr"):
        get_objective("ga", regularizer="none", constraint_eps=0.5, dual_step=1.0)
    with pytest.raises(ValueError, match="dual_step must be a finite number >= 0, got -1.0"):
        get_objective("ga", regularizer="gd", constraint_eps=0.5, dual_step=-1.0)
    with pytest.raises(ValueError, match="dual_step must be a finite number >= 0"):
        get_objective("ga", regularizer="gd", constraint_eps=0.5, dual_step=float("inf"))
    with pytest.raises(ValueError, match="constraint_eps must be a finite number"):
        get_objective("ga", regularizer="gd", constraint_eps=float("inf"), dual_step=1.0)
    with pytest.raises(ValueError, match="dual_update is PDU's"):
        get_objective("ga", regularizer="gd").dual_update(1.0)


def test_hyper_parameters_below_their_minimum_are_refused_when_built():
    with pytest.raises(ValueError, match="ignore_first_n_answer_tokens must be an integer >= 0, got -1"):
        get_objective("ceu", ignore_first_n_answer_tokens=-1)
    with pytest.raises(ValueError, match="beta2 must be a finite number >= 0, got -0.5"):
        get_objective("satimp", beta2=-0.5)
    with pytest.raises(ValueError, match="beta1 must be a finite number >= 0, got nan"):
        get_objective("satimp", beta1=float("nan"))
    assert get_objective("ceu", ignore_first_n_answer_tokens=0).hparams["ignore_first_n_answer_tokens"] == 0


@pytest.mark.parametrize("name,hp,msg", [
    ("tnpo", {"beta": -1.0}, "tnpo: beta must be a finite number > 0"),
    ("npo", {"beta": 0.0}, "npo: beta must be a finite number > 0"),
    ("wga", {"alpha": float("inf")}, "wga: alpha must be a finite number >= 0"),
    ("rmu", {"control_seed": 2 ** 32}, r"rmu: control_seed must be an integer in \[0, 4.29497e\+09\)"),
    ("rmu", {"rmu_layer": -2}, "rmu: rmu_layer must be an integer >= -1"),
])
def test_get_objective_enforces_the_tables_bounds(name, hp, msg):
    # the one table of bounds (fastgeffect/losses/hparams.py): the Python API refuses what the CLI refuses
    with pytest.raises(ValueError, match=msg):
        get_objective(name, **hp)


def test_the_losses_check_the_same_bounds_as_the_objectives():
    import fastgeffect.losses as L
    from fastgeffect.losses.hparams import HPARAMS
    logits, labels = torch.randn(2, 5, 7, dtype=torch.float64), torch.randint(0, 7, (2, 5))
    ref = torch.zeros(2, 5, dtype=torch.float64)
    for fn in (lambda: L.tnpo(logits, labels, ref, beta=-1.0), lambda: L.npo(logits, labels, ref, beta=-1.0),
               lambda: L.wtnpo(logits, labels, ref, beta=-1.0)):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            fn()
    # UNDIAL's β may be 0 (no lowering), its own bound in the table
    assert HPARAMS["beta"].for_user("undial").valid(0.0) and not HPARAMS["beta"].valid(0.0)
    L.undial(logits, labels, logits, 0.0)
