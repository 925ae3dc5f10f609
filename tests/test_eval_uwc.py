"""UWC calibration: weight mixing without a third model copy, and the α search."""
import argparse
import copy
import json
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
                              ps_protocol="clean", split="forget10", uwc_rows="reported")
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
    rows = json.loads((tmp_path / "eval_uwc" / "ps_rows.json").read_text())
    for k in ("PS-exact retain", "PS-exact forget"):  # the rows the calibrated PS averages
        assert len(rows[k]["scores"]) == len(sets[k.split()[1]]) and rows[k]["ps"] == res[k]
        assert abs(math.fsum(rows[k]["scores"]) / len(rows[k]["scores"]) - res[k]) <= 1e-12
    assert res["calibration_rows"] == "reported" and res["calibration"]["count"] == len(sets["retain"])
    table = metrics_table({"UWC-calibrated": res})
    assert "| Model Utility |" in table and "| Forget Quality |" in table


def _pair(tied: bool, seed: int = 0):
    """A tiny Llama (tied or not) and a noised copy playing the unlearned model."""
    orig = tiny_llama(41, hidden_size=16, layers=3, heads=2, seed=seed)
    if tied:
        orig.config.tie_word_embeddings = True
        orig.lm_head.weight = orig.model.embed_tokens.weight
    unl = copy.deepcopy(orig)
    with torch.no_grad():
        for p in unl.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return orig, unl


@pytest.mark.parametrize("tied", [False, True])
def test_materialised_mixture_equals_the_hooks(tied):
    """The default mode computes the same ``torch.lerp`` once per α instead of around every
    module's forward: identical logits (bit for bit) at every α, tied weights mixed once and still
    one tensor inside the block, θ_u's own tensors back afterwards."""
    orig, unl = _pair(tied)
    saved = {n: p.detach().clone() for n, p in unl.named_parameters()}
    own = {n: p.data_ptr() for n, p in unl.named_parameters()}
    x = torch.randint(0, 41, (3, 9))
    with torch.no_grad():
        for alpha in (0.0, 0.2, 0.5, 0.77, 1.0):
            with mixed_weights(unl, orig, alpha, mode="hooks") as m:
                want = m(input_ids=x).logits
            with mixed_weights(unl, orig, alpha) as m:
                assert torch.equal(m(input_ids=x).logits, want), alpha
                if tied:
                    assert m.lm_head.weight is m.model.embed_tokens.weight
                if 0 < alpha < 1:
                    p, o = m.model.layers[1].mlp.up_proj.weight, orig.model.layers[1].mlp.up_proj.weight
                    assert torch.equal(p, torch.lerp(o, saved["model.layers.1.mlp.up_proj.weight"], alpha))
                if alpha == 0.0:  # θ_o's values in a tensor of its own, never θ_o's storage
                    assert all(torch.equal(p, q) and p.data_ptr() != q.data_ptr()
                               for p, q in zip(m.parameters(), orig.parameters()))
    for n, p in unl.named_parameters():
        assert torch.equal(p, saved[n]) and p.data_ptr() == own[n], n  # θ_u's own storage, unchanged
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unl.modules())


@pytest.mark.parametrize("mode", ["materialise", "hooks"])
def test_weights_are_restored_when_the_block_raises(mode):
    orig, unl = _pair(tied=True)
    saved = {n: p.detach().clone() for n, p in unl.named_parameters()}
    x = torch.randint(0, 41, (2, 5))
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), mixed_weights(unl, orig, 0.4, mode=mode) as m:
            m(input_ids=x)
            raise RuntimeError("boom")
    # a forward that raises half way (a bad input inside the model)
    with pytest.raises(IndexError):
        with torch.no_grad(), mixed_weights(unl, orig, 0.4, mode=mode) as m:
            m(input_ids=torch.full((1, 3), 41))
    for n, p in unl.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert unl.lm_head.weight is unl.model.embed_tokens.weight
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unl.modules())
    with pytest.raises(ValueError, match="unknown mixing mode 'copy'; valid: materialise, hooks"):
        with mixed_weights(unl, orig, 0.4, mode="copy"):
            pass


def test_tied_in_one_model_but_not_the_other_is_refused():
    orig, _ = _pair(tied=False)
    _, unl = _pair(tied=True)
    with pytest.raises(ValueError, match="tie their weights differently"):
        with mixed_weights(unl, orig, 0.5):
            pass


def test_calibration_is_the_same_with_either_mixing_and_scores_only_retain_ps(monkeypatch):
    """Same α, same PS at each α tried, same report; the search scores the retain rows only and the
    report runs once, at the chosen α."""
    import fastgeffect.eval.uwc as uwc

    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, TPL)
    orig = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    memorise(orig, tok, TPL, recs, steps=150)
    unl = copy.deepcopy(orig)
    with torch.no_grad():
        for p in unl.parameters():
            p.add_(0.5 * torch.randn_like(p))
    retain, forget = recs[:4], recs[4:]
    calls, reports = [], []
    real = uwc.ps_scores

    def spy(m, t, tpl, rows, **kw):
        calls.append(rows)
        return real(m, t, tpl, rows, **kw)
    monkeypatch.setattr(uwc, "ps_scores", spy)
    res = {}
    for mixing in ("hooks", "materialise"):
        calls.clear()
        res[mixing] = uwc_calibrate(orig, unl, tok, TPL, retain, forget, alpha_tol=1 / 16, reference_ps=1.0,
                                    mixing=mixing, report_fn=lambda m: reports.append(1) or {"n": len(reports)})
        assert calls and all(rows is retain for rows in calls) and len(calls) == len(res[mixing]["history"])
    assert res["hooks"]["history"] == res["materialise"]["history"] and 0 < res["hooks"]["alpha"] < 1
    assert res["hooks"]["alpha"] == res["materialise"]["alpha"] and reports == [1, 1]
    with pytest.raises(ValueError, match="unknown mixing mode"):
        uwc_calibrate(orig, unl, tok, TPL, retain, forget, mixing="copy")


def test_default_report_reuses_the_searched_retain_ps(monkeypatch):
    """The default report takes the retain PS-exact the search computed at the chosen α: the same
    α, history and metrics (keys, order and values) as computing ps_report afresh at that α, with
    one PS call fewer; at α = 0 (never scored by the search) and α = 1 (scored first) too."""
    import fastgeffect.eval.ps as ps
    import fastgeffect.eval.uwc as uwc
    from fastgeffect.eval import ps_report

    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, TPL)
    orig = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    memorise(orig, tok, TPL, recs, steps=150)
    retain, forget = recs[:4], recs[4:]
    calls = []
    real = ps.ps_scores

    def spy(*args, **kw):
        calls.append(kw.get("question_key", "question"))
        return real(*args, **kw)
    monkeypatch.setattr(uwc, "ps_scores", spy)
    monkeypatch.setattr(ps, "ps_scores", spy)
    ps_kw = dict(protocol="clean", family="phi", batch_size=32, method="teacher-forced")
    alphas = set()
    for noise in (0.0, 0.5, 30.0):
        unl = copy.deepcopy(orig)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in unl.parameters():
                p.add_(noise * torch.randn_like(p))
        runs = {}
        for old in (True, False):
            calls.clear()
            fresh = (lambda m: ps_report(m, tok, TPL, {"retain": retain, "forget": forget}, **ps_kw)) if old else None
            runs[old] = uwc_calibrate(orig, unl, tok, TPL, retain, forget, alpha_tol=1 / 16, reference_ps=1.0,
                                      report_fn=fresh)
            runs[old]["calls"] = len(calls)
        new, old = runs[False], runs[True]
        assert new["alpha"] == old["alpha"] and new["history"] == old["history"]
        assert list(new["metrics"].items()) == list(old["metrics"].items()) and len(new["metrics"]) == 4
        assert new["calls"] == old["calls"] - (new["alpha"] > 0) == len(old["history"]) + 3 + (new["alpha"] == 0)
        alphas.add(new["alpha"] if new["alpha"] in (0.0, 1.0) else "between")
    assert alphas == {0.0, 1.0, "between"}
