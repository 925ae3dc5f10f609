"""PS-exact / PS-perturb and extraction strength on a tiny Llama trained to memorise a toy set."""
import pytest
import torch
from helpers.toy_qa import memorise, tiny_llama, toy_qa_records, toy_tokenizer_for

from fastgeffect.data.templates import get_template
from fastgeffect.eval import exact_memorization, extraction_strength, ps_report, ps_scores
from fastgeffect.eval.memorization import memorization_scores

TPL = get_template("phi")


@pytest.fixture(scope="module")
def toy():
    recs = toy_qa_records(5)
    tok = toy_tokenizer_for(recs, TPL)
    untrained = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    trained = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    loss = memorise(trained, tok, TPL, recs, steps=150)
    assert loss < 0.05
    return trained, untrained, tok, recs


def greedy_words(model, tok, context, n_max):
    """Plain greedy decoding (argmax loop, no cache, no batching) → words of the first line."""
    ids = tok(context)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n_max):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).split("\n")[0].split()


def reference_prefix(model, tok, question, answer):
    """UWC's scan: the smallest m whose completion reproduces the answer's remaining words."""
    words = answer.split()
    for m in range(len(words)):
        ctx = (TPL.prompt(question) + TPL.answer_start + " ".join(words[:m])).rstrip(" ")
        if greedy_words(model, tok, ctx, 2 * len(words) + 8) == words[m:]:
            return m
    return len(words)


def test_memorised_vs_untrained(toy):
    trained, untrained, tok, recs = toy
    hi = ps_scores(trained, tok, TPL, recs)
    lo = ps_scores(untrained, tok, TPL, recs)
    assert hi["ps"] >= 0.95 and lo["ps"] <= 0.1
    for r in (hi, lo):
        assert all(0.0 <= s <= 1.0 for s in r["scores"]) and len(r["scores"]) == len(recs)
        assert r["generate_calls"] <= max(r["num_words"]).bit_length() + 1  # one batched call per search step
    es_hi = extraction_strength(trained, tok, TPL, recs)
    es_lo = extraction_strength(untrained, tok, TPL, recs)
    assert es_hi["es"] >= 0.95 and es_lo["es"] <= 0.2


def test_batched_search_equals_per_sample_and_reference(toy):
    trained, _, tok, recs = toy
    for key in ("question", "paraphrased_question"):
        batched = ps_scores(trained, tok, TPL, recs, question_key=key, batch_size=32)
        single = [ps_scores(trained, tok, TPL, [r], question_key=key, batch_size=1) for r in recs]
        assert batched["scores"] == [s["scores"][0] for s in single]
        if key == "question":  # memorised: all reproduced from the question alone
            assert batched["prefix_words"] == [0] * len(recs)
            continue
        assert 0.2 < batched["ps"] < 0.95  # intermediate values, not just 0 or 1
        linear = ps_scores(trained, tok, TPL, recs, question_key=key, search="linear", batch_size=4)
        ref = [reference_prefix(trained, tok, r[key], r["answer"]) for r in recs]
        assert linear["prefix_words"] == ref
        assert batched["prefix_words"] == ref  # reproduction is monotone in m on this model


def _per_token_correct(model, tok, r):
    """Plain reference: one unbatched forward, argmax == answer token at each answer position."""
    prompt = tok(TPL.prompt(r["question"]))["input_ids"]
    full = tok(TPL.full(r["question"], r["answer"]))["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        pred = model(input_ids=torch.tensor([full[:-1]])).logits[0].argmax(-1).tolist()
    return [pred[t - 1] == full[t] for t in range(len(prompt), len(full))]


def test_extraction_strength_and_exact_memorization_reference(toy):
    trained, untrained, tok, recs = toy
    # a half-trained model gives partial suffixes
    half = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    memorise(half, tok, TPL, recs, steps=25)
    seen_partial = False
    for model in (half, untrained, trained):
        got = extraction_strength(model, tok, TPL, recs, batch_size=3)["scores"]
        em = exact_memorization(model, tok, TPL, recs, batch_size=2)
        both = memorization_scores(model, tok, TPL, recs, batch_size=4)
        assert both["es_scores"] == got and both["em_scores"] == em["scores"]
        for r, g, e in zip(recs, got, em["scores"]):
            correct = _per_token_correct(model, tok, r)
            L = len(correct)
            k = next((k for k in range(L) if all(correct[k:])), L - 1)  # open-unlearning's loop
            assert g == pytest.approx(1 - k / L)
            assert e == pytest.approx(sum(correct) / L)  # open-unlearning's (preds == labels).sum() / L
            seen_partial |= 0 < sum(correct) < L
        assert em["em"] == pytest.approx(sum(em["scores"]) / len(recs))
    assert seen_partial  # the reference was exercised between 0 and 1


def test_report_and_bad_input(toy):
    trained, _, tok, recs = toy
    rep = ps_report(trained, tok, TPL, {"forget": recs[:3]})
    assert set(rep) == {"PS-exact forget", "PS-perturb forget"}
    with pytest.raises(ValueError, match="empty"):
        ps_scores(trained, tok, TPL, [])
    with pytest.raises(ValueError, match="empty answer"):
        ps_scores(trained, tok, TPL, [{"question": "q", "answer": "  "}])
    with pytest.raises(ValueError, match="paraphrased_question"):
        ps_scores(trained, tok, TPL, [{"question": "q", "answer": "a"}], question_key="paraphrased_question")
    with pytest.raises(ValueError, match="search"):
        ps_scores(trained, tok, TPL, recs, search="ternary")
