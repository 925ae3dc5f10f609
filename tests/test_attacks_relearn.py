"""The relearning attack (seeded split, deterministic curves, the caller's model untouched), the
forget metrics it measures, ``run_attacks``' files and every bad input refused before writing."""
import copy
import json

import pytest
import torch

from fastgeffect.attacks import forget_metrics, relearn_curve, run_attacks, split_forget
from fastgeffect.data.templates import get_template
from fastgeffect.eval.answer_losses import answer_losses
from fastgeffect.eval.memorization import memorization_scores
from fastgeffect.losses import nll
from tests.helpers.toy_qa import memorise, tiny_llama, toy_qa_records, toy_tokenizer_for

TPL = get_template("phi")
LR = 1e-2  # a tiny model relearns in a few steps at this rate (the default, 1e-5, is for real models)


def damage(model, tok, recs, steps=5, lr=1e-2):
    """A few gradient-ascent (Adam) steps on all rows: the rows look forgotten (high NLL), the
    knowledge is still near in weight space."""
    from fastgeffect.data.collate import collate_qa
    from fastgeffect.data.qa import QADataset

    b = collate_qa([it for it in QADataset(recs, tok, TPL, 64)])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = -nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def toy():
    recs = toy_qa_records(6)
    tok = toy_tokenizer_for(recs, TPL)
    target = tiny_llama(len(tok), tokenizer=tok, seed=0)
    assert memorise(target, tok, TPL, recs, steps=150) < 0.05
    memorised = copy.deepcopy(target)
    damage(target, tok, recs)
    twin = tiny_llama(len(tok), tokenizer=tok, seed=1)  # never saw the rows: the control
    return recs, tok, memorised, target, twin


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_split_is_seeded_and_disjoint():
    a, b = split_forget(11, 3)
    assert sorted(a + b) == list(range(11)) and len(a) == 5
    assert split_forget(11, 3) == (a, b)
    assert split_forget(11, 4) != (a, b)
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_forget(1, 0)


def test_forget_metrics_are_the_evaluators(toy):
    recs, tok, memorised, target, _ = toy
    got = forget_metrics(memorised, tok, TPL, recs, rouge=True, max_length=64)
    loss, n = answer_losses(memorised, tok, TPL, [r["question"] for r in recs], [r["answer"] for r in recs],
                            max_length=64)
    mem = memorization_scores(memorised, tok, TPL, recs, max_length=64)
    assert got["nll"] == pytest.approx(float((loss / n).mean()), abs=1e-9)
    assert (got["exact_memorization"], got["extraction_strength"]) == (mem["em"], mem["es"])
    assert got["exact_memorization"] == 1.0 and got["rougeL_recall"] == pytest.approx(1.0)  # memorised: verbatim
    damaged = forget_metrics(target, tok, TPL, recs, max_length=64)
    assert "rougeL_recall" not in damaged
    assert damaged["nll"] > got["nll"] + 1.0 and damaged["exact_memorization"] < 0.5  # the damage "forgot" them


def test_relearning_brings_the_rows_back_faster_than_the_control(toy, tmp_path):
    recs, tok, _, target, twin = toy
    before_t, before_w = _state(target), _state(twin)
    out = run_attacks(target, tok, TPL, recs, out_dir=tmp_path, attacks=["relearn"], twin=twin,
                      steps=[0, 1, 2, 4, 8], lr=LR, batch_size=3, seed=0, max_length=64)
    assert _same(target, before_t) and _same(twin, before_w)  # the attacks work on copies
    r = out["relearn"]
    assert [p["step"] for p in r["target"]] == [0, 1, 2, 4, 8]
    assert sorted(r["train_rows"] + r["eval_rows"]) == list(range(len(recs)))
    nll_t = [p["nll"] for p in r["target"]]
    assert nll_t[-1] < nll_t[0] - 1.0  # the measured half comes back from training on the other half
    assert r["target"][0]["train_loss"] is None and r["target"][1]["train_loss"] is not None
    # the gap per k is target − twin, and the target relearns the unseen half faster than the control
    for g, t, c in zip(r["gap"], r["target"], r["twin"]):
        assert g["nll"] == pytest.approx(t["nll"] - c["nll"], abs=1e-12)
    assert r["gap"][-1]["nll"] < r["gap"][0]["nll"] - 1.0  # drop(target) > drop(twin) + 1 nat
    # the k = 0 point is the model itself on the measured rows
    measured = [recs[i] for i in r["eval_rows"]]
    assert r["target"][0]["nll"] == pytest.approx(forget_metrics(target, tok, TPL, measured, max_length=64)["nll"],
                                                  abs=1e-9)
    on_disk = json.loads((tmp_path / "attacks.json").read_text())
    assert on_disk == json.loads(json.dumps(out)) and "quantize" not in on_disk
    assert (tmp_path / "attacks_relearn.png").stat().st_size > 0


def test_deterministic_by_seed(toy):
    recs, tok, _, target, _ = toy
    train = recs[:6]

    def measure(m):
        return forget_metrics(m, tok, TPL, recs[6:], max_length=64)

    kw = dict(steps=[0, 2, 5], lr=LR, batch_size=4, max_length=64)
    a = relearn_curve(target, tok, TPL, train, measure, seed=7, **kw)
    torch.manual_seed(123)  # the global RNG state does not matter
    b = relearn_curve(target, tok, TPL, train, measure, seed=7, **kw)
    c = relearn_curve(target, tok, TPL, train, measure, seed=8, **kw)
    assert a == b
    assert a[0] == c[0] and a[-1] != c[-1]  # another seed: other batches


def test_quantize_section(toy, tmp_path):
    recs, tok, memorised, _, _ = toy
    before = _state(memorised)
    out = run_attacks(memorised, tok, TPL, recs, out_dir=tmp_path, attacks="quantize", bits=(8, 4),
                      max_length=64)
    assert _same(memorised, before)
    rows = out["quantize"]["rows"]
    assert [(q["bits"], q["granularity"]) for q in rows] == [(None, "none"), (8, "per_channel"), (8, "group128"),
                                                             (4, "per_channel"), (4, "group128")]
    assert rows[0]["nll"] == pytest.approx(forget_metrics(memorised, tok, TPL, recs, max_length=64)["nll"], abs=1e-9)
    # every input dimension of the tiny model is <= 128: a group of 128 is the whole row
    for a, b in ((rows[1], rows[2]), (rows[3], rows[4])):
        assert {m: a[m] for m in out["metrics"]} == {m: b[m] for m in out["metrics"]}
    assert rows[3]["nll"] != rows[0]["nll"]  # 4 bits does change the model
    assert out["quantize"]["layers"] == 2 * 7 + 1 and out["quantize"]["include_lm_head"] is True
    assert not (tmp_path / "attacks_relearn.png").exists()


@pytest.mark.parametrize("kw, msg", [
    (dict(attacks=["relearn", "prune"]), "unknown attack 'prune'"),
    (dict(attacks=[]), "no attack"),
    (dict(bits=(8, 3)), "bits must be one of"),
    (dict(group_sizes=(None, 0)), "group_size"),
    (dict(steps=[0, 2, 1]), "strictly increasing"),
    (dict(steps=[-1, 2]), "non-negative integers"),
    (dict(steps=[0, 1.5]), "non-negative integers"),
    (dict(steps=[]), "non-empty"),
    (dict(lr=0.0), "learning rate"),
    (dict(batch_size=0), "batch size"),
    (dict(records=1), "at least 2 rows"),
    (dict(records=0), "empty"),
    (dict(twin="other vocabulary"), "vocabulary"),
])
def test_bad_input_refused_before_writing(toy, tmp_path, kw, msg):
    recs, tok, _, target, _ = toy
    kw = dict(kw)
    rows = recs[: kw.pop("records")] if "records" in kw else recs
    if kw.get("twin") == "other vocabulary":
        kw["twin"] = tiny_llama(len(tok) + 3, seed=0)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=msg):
        run_attacks(target, tok, TPL, rows, out_dir=out, **kw)
    assert not out.exists()
