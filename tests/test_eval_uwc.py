"""UWC calibration: weight mixing without a third model copy, and the α search."""
import argparse
import copy
import math

import pytest
import torch
from helpers.toy_qa import memorise, tiny_llama, toy_qa_records, toy_tokenizer_for

from fastgeffect.data.templates import get_template
from fastgeffect.driver.evaluation import uwc_metrics
from fastgeffect.driver.presets import PRESETS
from fastgeffect.driver.targets import Target
from fastgeffect.eval import calibrate_alpha, evaluate_tofu, mixed_weights, ps_scores, uwc_calibrate
from fastgeffect.report import metrics_table

TPL = get_template("phi")


@pytest.mark.parametrize("alpha_star", [0.0, 0.137, 0.5, 0.731, 0.999])
@pytest.mark.parametrize("alpha_tol", [1 / 64, 1e-3])
def test_search_recovers_threshold(alpha_star, alpha_tol):
    # a monotone family: score(α) = 1 − α², the bar (1 − tol)·1 is crossed at α* = sqrt(tol)
    tol = alpha_star ** 2
    res = calibrate_alpha(lambda a: 1 - a * a, 1.0, tol, alpha_tol=alpha_tol)
    assert res["alpha"] <= alpha_star + 1e-12 and alpha_star - res["alpha"] <= alpha_tol
    assert 1 - res["alpha"] ** 2 >= res["threshold"]
    assert len(res["history"]) <= 2 + math.ceil(math.log2(1 / alpha_tol))
    # a step function: exactly the known jump
    res = calibrate_alpha(lambda a: 1.0 if a <= alpha_star else 0.0, 1.0, 0.05, alpha_tol=alpha_tol)
    assert 0 <= alpha_star - res["alpha"] <= alpha_tol


def test_search_edges():
    assert calibrate_alpha(lambda a: 1.0, 1.0, 0.1)["alpha"] == 1.0  # never degrades: full unlearning
    res = calibrate_alpha(lambda a: 0.5 + 0.5 * (a == 0), 1.0, 0.1, alpha_tol=0.01)
    assert res["alpha"] == 0.0 and len(res["history"]) == 1 + 7
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_alpha(lambda a: 1.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="alpha_tol must be positive, got nan"):
        calibrate_alpha(lambda a: 0.5 + 0.5 * (a == 0), 1.0, 0.1, alpha_tol=float("nan"))
    with pytest.raises(ValueError, match="reference score must be a finite number, got nan"):
        calibrate_alpha(lambda a: 1.0, float("nan"), 0.1)
    with pytest.raises(ValueError, match="alpha=1.0 is nan"):
        calibrate_alpha(lambda a: float("nan"), 1.0, 0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_mixing_is_exact_at_the_ends(tied):
    torch.manual_seed(0)
    orig = tiny_llama(41, hidden_size=16, layers=3, heads=2, seed=0)
    orig.config.tie_word_embeddings = tied
    if tied:
        orig.lm_head.weight = orig.model.embed_tokens.weight
    unl = copy.deepcopy(orig)
    with torch.no_grad():
        for p in unl.parameters():
            p.add_(0.3 * torch.randn_like(p))
    saved = {n: p.detach().clone() for n, p in unl.named_parameters()}
    x = torch.randint(0, 41, (3, 9))
    with torch.no_grad():
        out_o, out_u = orig(input_ids=x).logits, unl(input_ids=x).logits
        with mixed_weights(unl, orig, 0.0) as m:
            assert torch.equal(m(input_ids=x).logits, out_o)
        with mixed_weights(unl, orig, 1.0) as m:
            assert torch.equal(m(input_ids=x).logits, out_u)
        # an explicit third copy, only in the test
        third = copy.deepcopy(orig)
        for (_name, p), q in zip(third.named_parameters(), unl.parameters()):
            p.copy_(0.7 * p + 0.3 * q)
        with mixed_weights(unl, orig, 0.3) as m:
            torch.testing.assert_close(m(input_ids=x).logits, third(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    for n, p in unl.named_parameters():  # θ_u restored bit for bit, hooks gone
        assert torch.equal(p, saved[n]), n
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unl.modules())
    with pytest.raises(ValueError, match="alpha"):
        with mixed_weights(unl, orig, 1.5):
            pass
    other = tiny_llama(41, hidden_size=16, layers=2, heads=2)
    with pytest.raises(ValueError, match="differ in structure"):
        with mixed_weights(unl, other, 0.5):
            pass


def test_uwc_calibrate_end_to_end():
    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, TPL)
    orig = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    memorise(orig, tok, TPL, recs, steps=150)
    unl = copy.deepcopy(orig)
    with torch.no_grad():  # a crude "unlearning": heavy noise destroys everything
        for p in unl.parameters():
            p.add_(0.5 * torch.randn_like(p))
    retain, forget = recs[:4], recs[4:]
    res = uwc_calibrate(orig, unl, tok, TPL, retain, forget, preset="phi", alpha_tol=1 / 16)
    assert res["tolerance"] == 0.10 and res["reference_ps"] >= 0.95
    assert 0.0 <= res["alpha"] < 1.0
    with mixed_weights(unl, orig, res["alpha"]) as m:
        assert ps_scores(m, tok, TPL, retain)["ps"] >= res["threshold"]
    with mixed_weights(unl, orig, min(1.0, res["alpha"] + 1 / 16)) as m:
        assert ps_scores(m, tok, TPL, retain)["ps"] < res["threshold"] or res["alpha"] + 1 / 16 > 1
    assert {"PS-exact retain", "PS-perturb retain", "PS-exact forget", "PS-perturb forget"} == set(res["metrics"])
    assert len(res["history"]) <= 1 + 4
    with pytest.raises(ValueError, match="preset"):
        uwc_calibrate(orig, unl, tok, TPL, retain, forget, preset="gpt")


def test_driver_evaluates_the_calibrated_model_fully(tmp_path):
    """The run's UWC column: Model Utility, Forget Quality and the TOFU metrics of θ_mix at the
    chosen α (equal to an evaluation of that mixture), PS, and the logs in their own folder."""
    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, TPL)
    orig = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    memorise(orig, tok, TPL, recs, steps=150)
    unl = copy.deepcopy(orig)
    with torch.no_grad():
        for p in unl.parameters():
            p.add_(0.5 * torch.randn_like(p))
    sets = {"retain": recs[:4], "forget": recs[4:], "real_authors": recs[:3], "world_facts": recs[5:]}
    retain_log = evaluate_tofu(unl, tok, TPL, {"forget": sets["forget"]}, out_dir=tmp_path / "retain",
                               progress=False)
    target = Target(orig, tok, TPL, None, 64, lambda: copy.deepcopy(orig))
    args = argparse.Namespace(preset="embedded", eval_size=300, eval_batch_size=4, no_progress=True,
                              eval_max_length=None, gen_mode=None, truth_ratio_agg="geometric",
                              ps_protocol="clean", split="forget10")
    res = uwc_metrics(unl, target, sets, tmp_path / "eval_uwc", args, PRESETS["embedded"], torch.device("cpu"),
                      None, tmp_path / "retain" / "eval_log_forget.json")
    assert 0.0 <= res["alpha"] < 1.0
    with mixed_weights(unl, orig, res["alpha"]) as m:
        direct = evaluate_tofu(m, tok, TPL, sets, retain_log=retain_log["logs"]["eval_log_forget.json"],
                               max_length=64, batch_size=4, gen_mode="independent", progress=False)["metrics"]
    for k in ("Model Utility", "Forget Quality", "ROUGE Forget", "Prob. Forget", "Truth Ratio Forget"):
        assert res[k] == pytest.approx(direct[k], rel=1e-9, abs=1e-12), k
    assert {"PS-exact retain", "PS-exact forget"} <= set(res)
    assert (tmp_path / "eval_uwc" / "eval_log_forget.json").exists()
    table = metrics_table({"UWC-calibrated": res})
    assert "| Model Utility |" in table and "| Forget Quality |" in table
