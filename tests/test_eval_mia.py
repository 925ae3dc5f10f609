"""Membership inference and PrivLeak on tiny Llamas: every attack's per-row score against a plain
one-row-at-a-time reference written out here (float64), the AUC against a hand rank-sum, ghost
GradNorm against the per-sample backward loop (tied embeddings too), a memorised model, bad input."""
import math
import zlib

import pytest
import torch
from helpers.toy_qa import memorise, tiny_llama, toy_qa_records, toy_tokenizer_for
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fastgeffect.data.templates import get_template
from fastgeffect.eval import mia_auc, privleak
from fastgeffect.eval.answer_losses import encode_pairs
from fastgeffect.eval.gradnorm import per_sample_grad_norms
from fastgeffect.eval.mia import ATTACKS, mia_report, roc_auc
from fastgeffect.eval.mia_scores import Encoded
from fastgeffect.eval.privleak import privleak_report

TPL = get_template("phi")
K = 0.4


@pytest.fixture(scope="module")
def toy():
    recs = toy_qa_records(6)
    tok = toy_tokenizer_for(recs, TPL)
    model = tiny_llama(len(tok), hidden_size=16, layers=2, heads=2, seed=3, tokenizer=tok).double()
    ref = tiny_llama(len(tok), hidden_size=16, layers=1, heads=2, seed=5, tokenizer=tok).double()
    # answers cut to different lengths, so batches hold padding; odd-sized sets
    recs = [dict(r, answer=" ".join(r["answer"].split()[: 3 + (5 * i) % 9])) for i, r in enumerate(recs)]
    return model, ref, tok, recs[:7], recs[7:]


def _row(model, tok, rec):
    """One unbatched, unpadded forward: (log-probs (L-1, V) float64, input ids, label positions)."""
    ids, labels, _, _ = encode_pairs(tok, TPL, [rec["question"]], [rec["answer"]], 200)
    x = torch.tensor(ids[0])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
    pos = [t for t, v in enumerate(labels[0]) if v != -100]
    return lp, x, pos


def _min_k(vals, k):
    vals = sorted(vals)
    n = max(1, int(len(vals) * k))
    return -sum(vals[:n]) / n


def ref_scores(attack, model, tok, rec, reference=None):
    lp, x, pos = _row(model, tok, rec)
    avg = -sum(float(lp[t - 1, x[t]]) for t in pos) / len(pos)  # every label (answer + EOS)
    kept = pos[:-1]  # Min-K%'s tokens: the EOS label dropped
    if attack == "mia_loss":
        return avg
    if attack == "mia_zlib":
        _, labels, _, _ = encode_pairs(tok, TPL, [rec["question"]], [rec["answer"]], 200)
        text = tok.decode([v for v in labels[0] if v != -100], skip_special_tokens=True)  # the labelled text
        return avg / len(zlib.compress(text.encode("utf-8")))
    if attack == "mia_min_k":
        return _min_k([float(lp[t - 1, x[t]]) for t in kept], K)
    if attack == "mia_min_k_plus_plus":
        z = []
        for t in kept:
            row = lp[t - 1]
            mu = float((row.exp() * row).sum())
            var = max(float((row.exp() * row ** 2).sum()) - mu ** 2, 1e-6)
            z.append((float(row[x[t]]) - mu) / math.sqrt(var))
        return _min_k(z, K)
    if attack == "mia_reference":
        return avg - ref_scores("mia_loss", reference, tok, rec)
    raise AssertionError(attack)


def ref_gradnorm(model, tok, rec, p):
    """open-unlearning's loop: one forward and backward for this row alone."""
    ids, labels, _, _ = encode_pairs(tok, TPL, [rec["question"]], [rec["answer"]], 200)
    x = torch.tensor(ids[0])
    kept = [t for t, v in enumerate(labels[0]) if v != -100][:-1]
    model.zero_grad(set_to_none=True)
    lp = torch.log_softmax(model(input_ids=x[None]).logits[0], -1)
    loss = -torch.stack([lp[t - 1, x[t]] for t in kept]).mean()
    loss.backward()
    norms = [float(q.grad.norm(p=p)) for q in model.parameters() if q.grad is not None]
    model.zero_grad(set_to_none=True)
    return sum(norms) / len(norms)


def hand_auc(forget, holdout):
    """Mann–Whitney by counting pairs: holdout above forget counts 1, a tie ½."""
    wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
    return wins / (len(forget) * len(holdout))


def _close(a, b, rtol=1e-9):
    scale = max(1.0, max(map(abs, a)), max(map(abs, b)))
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert abs(u - v) <= rtol * scale, (u, v)


@pytest.mark.parametrize("attack", ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference"])
def test_scores_match_plain_reference(toy, attack):
    model, ref, tok, forget, holdout = toy
    out = mia_auc(model, tok, TPL, forget, holdout, attack=attack, k=K, reference_model=ref, batch_size=3)
    _close(out["forget_scores"], [ref_scores(attack, model, tok, r, ref) for r in forget])
    _close(out["holdout_scores"], [ref_scores(attack, model, tok, r, ref) for r in holdout])
    assert out["auc"] == pytest.approx(hand_auc(out["forget_scores"], out["holdout_scores"]), abs=1e-12)


def test_zlib_text_is_the_labelled_answer(toy):
    _, _, tok, forget, _ = toy  # the labels cover the template's answer start, the answer and EOS
    texts = Encoded(tok, TPL, forget, 200, "t").texts
    assert texts == [f"Answer : {r['answer']}" for r in forget]


@pytest.mark.parametrize("p", [2, 1, math.inf])
def test_gradnorm_matches_per_row_backward(toy, p):
    model, _, tok, forget, holdout = toy
    out = mia_auc(model, tok, TPL, forget, holdout, attack="gradnorm", p=p, batch_size=4)
    _close(out["forget_scores"], [ref_gradnorm(model, tok, r, p) for r in forget], 1e-8)
    _close(out["holdout_scores"], [ref_gradnorm(model, tok, r, p) for r in holdout], 1e-8)
    if p == 2:
        assert out["gradnorm_fallback"] == []  # every Llama tensor had a ghost form
    assert all(q.grad is None for q in model.parameters())


def _other_model(kind, vocab, tok):
    torch.manual_seed(7)
    if kind == "gpt2":  # HF Conv1D layers, tied head, position embeddings broadcast over the batch
        cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return GPT2LMHeadModel(cfg).double().eval()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      attention_bias=True, mlp_bias=True, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("kind", ["llama", "llama_tied_biases", "gpt2"])
@pytest.mark.parametrize("ghost_linear", [True, False])
def test_ghost_norms_equal_the_loop(toy, kind, ghost_linear):
    model, _, tok, forget, _ = toy
    if kind != "llama":
        model = _other_model(kind, len(tok), tok)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    enc = Encoded(tok, TPL, forget, 200, "t")
    (chunk, x, att, y), = list(enc.batches(len(forget)))[:1]
    assert bool((x == tok.pad_token_id).any())  # padding holds the pad id, Llama's embedding padding_idx
    mask = (y[:, 1:] != -100)

    def losses():
        lp = torch.log_softmax(model(input_ids=x, attention_mask=att).logits[:, :-1], -1)
        return -(lp.gather(-1, y[:, 1:].clamp(min=0)[..., None])[..., 0] * mask).sum(-1)

    ghost = per_sample_grad_norms(model, losses, p=2, ghost_linear=ghost_linear)
    loop = per_sample_grad_norms(model, losses, p=2, force_loop=True)
    assert ghost["fallback"] == [] and len(loop["fallback"]) == len(loop["names"])
    assert ghost["names"] == loop["names"]
    scale = float(loop["norms"].abs().max())
    assert float((ghost["norms"] - loop["norms"]).abs().max()) <= 1e-9 * scale


def test_ghost_falls_back_for_a_parameter_used_outside_its_module(toy):
    model, _, tok, forget, _ = toy
    enc = Encoded(tok, TPL, forget[:3], 200, "t")
    (_, x, att, y), = list(enc.batches(3))
    w = model.model.norm.weight

    def losses():  # the final norm's weight also acts directly on the logits: no closed form covers it
        logits = model(input_ids=x, attention_mask=att).logits * w.sum()
        lp = torch.log_softmax(logits[:, :-1], -1)
        return -(lp.gather(-1, y[:, 1:].clamp(min=0)[..., None])[..., 0] * (y[:, 1:] != -100)).sum(-1)

    ghost = per_sample_grad_norms(model, losses, p=2)
    loop = per_sample_grad_norms(model, losses, p=2, force_loop=True)
    assert ghost["fallback"] == ["model.norm.weight"]
    assert float((ghost["norms"] - loop["norms"]).abs().max()) <= 1e-9 * float(loop["norms"].abs().max())


def test_roc_auc_is_the_rank_sum_with_ties():
    forget, holdout = [0.1, 0.5, 0.5, 0.9], [0.5, 0.7, 0.2]
    got = roc_auc([0] * 4 + [1] * 3, forget + holdout)
    assert got == pytest.approx(hand_auc(forget, holdout), abs=1e-15)
    assert got == pytest.approx((2 + 3 + 1) / 12, abs=1e-15)  # per holdout row: 0.5 beats 0.1 and ties twice, ...


def test_memorised_rows_are_detected_and_report_matches(toy):
    _, _, tok, forget, holdout = toy
    model = tiny_llama(len(tok), hidden_size=16, layers=2, heads=2, seed=11, tokenizer=tok)
    twin = tiny_llama(len(tok), hidden_size=16, layers=2, heads=2, seed=11, tokenizer=tok)
    memorise(model, tok, TPL, forget, steps=60)
    rep = mia_report(model, tok, TPL, forget, holdout, reference_model=twin, batch_size=5)
    assert set(rep) == set(ATTACKS) | {"per_sample"}
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_reference"):
        assert rep[name] > 0.9, (name, rep[name])
    for name in ATTACKS:
        one = mia_auc(model, tok, TPL, forget, holdout, attack=name, reference_model=twin, batch_size=2)
        assert rep[name] == pytest.approx(one["auc"], abs=1e-9)
        assert len(rep["per_sample"][name]["forget_scores"]) == len(forget)
    pl = privleak_report(model, twin, tok, TPL, forget, holdout)
    assert pl["reference"] == "retain twin" and pl["mia_min_k"] == pytest.approx(rep["mia_min_k"], abs=1e-6)
    assert pl["privleak"] == pytest.approx(privleak(pl["mia_min_k"], pl["reference_auc"])) and pl["privleak"] < 0
    none = privleak_report(model, None, tok, TPL, forget, holdout)
    assert none["reference"] == "0.5 (no twin)" and none["reference_auc"] == 0.5


def test_privleak_formula_and_twin_against_itself(toy):
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.9, 0.5) == pytest.approx((0.1 - 0.5) / 0.5 * 100)  # still a member: negative
    assert privleak(0.3, 0.6) == pytest.approx((0.7 - 0.4) / 0.4 * 100)
    _, twin, tok, forget, holdout = toy
    out = privleak_report(twin, twin, tok, TPL, forget, holdout, batch_size=3)
    assert out["privleak"] == 0.0 and out["reference"] == "retain twin"
    with pytest.raises(ValueError, match="reference_auc must be an AUC"):
        privleak(0.5, float("nan"))


def test_bad_input(toy):
    model, ref, tok, forget, holdout = toy
    call = lambda **kw: mia_auc(model, tok, TPL, kw.pop("f", forget), kw.pop("h", holdout),
                                **{"attack": "mia_loss", **kw})
    with pytest.raises(ValueError, match="unknown membership-inference attack 'recall'"):
        call(attack="recall")
    for k in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"k \(the Min-K% fraction of tokens\) must be in \(0, 1\]"):
            call(attack="min_k", k=k)
    for p in (3, 0, "2", True, -math.inf):
        with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
            call(attack="gradnorm", p=p)
    with pytest.raises(ValueError, match="forget rows: the set is empty"):
        call(f=[])
    with pytest.raises(ValueError, match="holdout rows: the set is empty"):
        call(h=[])
    with pytest.raises(ValueError, match="mia_reference needs a reference model"):
        call(attack="mia_reference")
    other = tiny_llama(len(tok) + 3, hidden_size=16, layers=1, heads=2, seed=1).double()
    with pytest.raises(ValueError, match="reference model's vocabulary has"):
        call(attack="reference", reference_model=other)
    small = tiny_llama(len(tok) - 2, hidden_size=16, layers=1, heads=2, seed=1).double()
    with pytest.raises(ValueError, match="the tokenizer has .* tokens but the model's vocabulary has"):
        mia_auc(small, tok, TPL, forget, holdout, attack="loss")
    with pytest.raises(ValueError, match="reference model's vocabulary has"):
        privleak_report(model, other, tok, TPL, forget, holdout)
    frozen = tiny_llama(len(tok), hidden_size=16, layers=1, heads=2, seed=1).double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        mia_auc(frozen, tok, TPL, forget, holdout, attack="gradnorm")


def test_bench_gradnorm_quick(capsys):
    """``benchmarks/bench_gradnorm.py --quick``: both paths on the same batch agree (times printed, never checked)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gradnorm

    row = bench_gradnorm.main(["--quick", "--tied"])
    assert row["max rel diff"] < 1e-4 and row["ghost fallback"] == []  # fp32 model
    assert "loop/ghost" in capsys.readouterr().out
