"""PS under the public code's protocols (``paper``, ``uwc-linear``) against straightforward
one-sample-at-a-time re-implementations on tiny memorised Llamas, and their row selection."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.toy_qa import memorise, tiny_llama, tiny_tokenizer, toy_qa_records
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fastgeffect.data.templates import Template, get_template
from fastgeffect.data.tofu import load_tofu_split
from fastgeffect.driver.cli import build_parser
from fastgeffect.driver.evaluation import ps_metrics
from fastgeffect.driver.presets import PRESETS
from fastgeffect.eval import ps_report, ps_scores
from fastgeffect.eval.ps_protocols import PS_PROTOCOLS, paper_ps_scores
from fastgeffect.eval.ps_samples import paper_samples, protocol_samples, uwc_linear_samples

TPL = get_template("phi")
HEAD = "### Question: {q}\n ### Answer:"  # the public code's prompt, written out again
KEYS = ("question", "paraphrased_question")


def byte_level_tokenizer(texts):
    """A byte-level BPE tokenizer trained on ``texts``: it decodes a continuation's leading space,
    as Phi-1.5's does (the word-level toy tokenizer decodes as Llama-2's, without it)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def toy():
    """Records and memorised (model, tokenizer) pairs: ``tofu`` fine-tuned with TOFU's Phi template
    (as fastgeffect's targets are), ``paper`` with the public code's own prompt (both word-level,
    Llama-like decoding), ``bpe`` with TOFU's Phi template and a byte-level BPE (Phi-like decoding)."""
    recs = toy_qa_records(5)
    texts = [v for r in recs for v in r.values() if isinstance(v, str)]
    texts += [p for r in recs for p in r["perturbed_answer"]] + [TPL.full("", ""), HEAD.format(q="")]
    words, bpe = tiny_tokenizer(texts), byte_level_tokenizer(texts)
    own = Template("public-code", "### Question: ", "\n ### Answer:", " ")  # full = HEAD + " " + answer
    cases = {}
    for name, tpl, tok in (("tofu", TPL, words), ("paper", own, words), ("bpe", TPL, bpe)):
        m = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
        assert memorise(m, tok, tpl, recs, steps=150) < 0.05
        cases[name] = (m, tok)
    return recs, cases


def greedy(model, tok, ids, budget):
    """Plain greedy decoding: argmax loop, no cache, no batching; new ids up to EOS (excluded)."""
    new = []
    with torch.no_grad():
        while len(new) < budget:
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return new


def reference_paper(model, tok, q, a, max_length=200):
    """Table 1's search for one sample: token bounds [len(question), len(full)], decode/re-encode,
    generate to 200 tokens in all (at least one), match = the re-encoded output's tokens up to
    len(full) are a prefix of the full text's; returns (right bound, PS)."""
    enc = lambda s: tok(s)["input_ids"]  # noqa: E731
    full = enc(HEAD.format(q=q) + " " + a)
    lq, lf = len(enc(q)), len(full)
    lo, hi, old = lq, lf, None
    while (lo + hi) // 2 != old:
        mid = old = (lo + hi) // 2
        ctx = enc(tok.decode(full[:mid], skip_special_tokens=True))
        out = enc(tok.decode(ctx + greedy(model, tok, ctx, max(1, max_length - len(ctx))), skip_special_tokens=True))
        got = out[mid:lf]
        if got == full[mid:mid + len(got)]:
            hi = mid
        else:
            lo = mid
    return hi, 1 - (hi - lq) / (lf - lq)


def reference_uwc_linear(model, tok, q, a, family):
    """UWC's phi_exact.py / llama_exact.py for one sample: words given (0: the prompt suffices)."""
    def cont(text):
        ids = tok(text)["input_ids"]
        return tok.decode(greedy(model, tok, ids, 150 - len(ids)), skip_special_tokens=True)

    first = cont(HEAD.format(q=q))
    if (first[1:] if family == "phi" else first).split("\n")[0] == a:
        return 0
    words = a.split(" ")
    for k in range(1, len(words) + 1):
        given = " ".join(words[:k])
        ans = cont(HEAD.format(q=q) + " " + given).split("\n")[0]
        if (given + ans if family == "phi" else given + " " + ans) == a:
            return k
    return len(words)


@pytest.mark.parametrize("case", ["tofu", "paper", "bpe"])
def test_paper_protocol_matches_reference(toy, case):
    recs, cases = toy
    model, tok = cases[case]
    for key in KEYS:
        got = ps_scores(model, tok, TPL, recs, protocol="paper", question_key=key)
        ref = [reference_paper(model, tok, r[key], r["answer"]) for r in recs]
        assert got["right"] == [r for r, _ in ref]
        assert got["scores"] == pytest.approx([s for _, s in ref], abs=1e-12)
        assert got["ps"] == pytest.approx(sum(s for _, s in ref) / len(ref), abs=1e-12)
        assert len(set(got["scores"])) > 1  # not a constant: the test can see a wrong bound


def test_paper_protocol_when_the_prompt_fills_max_length(toy):
    """Contexts at or past max_length get one new token (as the public code's transformers did)."""
    recs, cases = toy
    model, tok = cases["paper"]
    got = paper_ps_scores(model, tok, recs[:3], max_length=12, batch_size=1)
    assert got["right"] == [reference_paper(model, tok, r["question"], r["answer"], max_length=12)[0] for r in recs[:3]]
    assert max(got["full_tokens"]) > 12


@pytest.mark.parametrize("family", ["llama2", "phi"])
def test_uwc_linear_protocol_matches_reference(toy, family):
    recs, cases = toy
    seen = set()
    for model, tok in cases.values():
        for key in KEYS:
            got = ps_scores(model, tok, TPL, recs, protocol="uwc-linear", family=family, question_key=key)
            ref = [reference_uwc_linear(model, tok, r[key], r["answer"], family) for r in recs]
            assert got["given_words"] == ref
            seen.update(ref)
            n = [len(r["answer"].split(" ")) for r in recs]
            assert got["scores"] == pytest.approx([1 - k / m for k, m in zip(ref, n)], abs=1e-12)
    assert len(seen) > 2  # 0, n and values between (the phi rules on the byte-level BPE, llama2 on the others)


def test_perfectly_memorised_sample_scores_below_one_under_paper(toy):
    """The paper's search starts at the bare question's token count, so the template's own tokens
    count against a sample that the prompt alone reproduces: PS < 1 where the others give 1."""
    recs, cases = toy
    model, tok = cases["paper"]  # fine-tuned with the public code's prompt
    paper = ps_scores(model, tok, TPL, recs, protocol="paper")
    linear = ps_scores(model, tok, TPL, recs, protocol="uwc-linear", family="llama2")
    assert linear["given_words"] == [0] * len(recs)  # the bare prompt reproduces every answer
    prompt_end = [len(tok(HEAD.format(q=r["question"]))["input_ids"]) for r in recs]
    for s, right, lq, lf, end in zip(paper["scores"], paper["right"], paper["question_tokens"],
                                     paper["full_tokens"], prompt_end):
        assert lq < right <= end  # never needs an answer word, yet the template tokens count
        assert s == pytest.approx(1 - (right - lq) / (lf - lq), abs=1e-12) and s < 1
    # the upper bound for a perfect sample whose template tokens are all needed: 1 - template/(template + answer)
    assert 0.4 < paper["ps"] < 0.9


def test_clean_protocol_unchanged_and_report(toy):
    recs, cases = toy
    model, tok = cases["tofu"]
    assert ps_scores(model, tok, TPL, recs, protocol="clean") == ps_scores(model, tok, TPL, recs)
    exact, perturb = recs[:3], recs[3:6]
    rep = ps_report(model, tok, TPL, {"forget": exact}, perturb_sets={"forget": perturb}, protocol="paper")
    assert rep["PS-exact forget"] == pytest.approx(ps_scores(model, tok, TPL, exact, protocol="paper")["ps"])
    assert rep["PS-perturb forget"] == pytest.approx(
        ps_scores(model, tok, TPL, perturb, protocol="paper", question_key="paraphrased_question")["ps"])
    model.train()
    ps_scores(model, tok, TPL, recs[:1], protocol="uwc-linear", family="phi")
    assert model.training  # the mode is restored
    model.eval()
    with pytest.raises(ValueError, match="PS protocol"):
        ps_scores(model, tok, TPL, recs, protocol="table1")
    with pytest.raises(ValueError, match="family"):
        ps_scores(model, tok, TPL, recs, protocol="uwc-linear", family="gpt")
    with pytest.raises(ValueError, match="empty"):
        ps_scores(model, tok, TPL, [], protocol="paper")
    with pytest.raises(ValueError, match="paraphrased_question"):
        ps_scores(model, tok, TPL, [{"question": "q", "answer": "a"}], protocol="paper",
                  question_key="paraphrased_question")


def fake_tofu(name):
    """Rows tagged with their split and index, in the sizes of TOFU's splits."""
    sizes = {"retain_perturbed": 400, "retain90": 3600, "retain95": 3800, "retain99": 3960, "forget01": 40,
             "forget05": 200, "forget10": 400}
    size = sizes[name.replace("_perturbed", "")] if name.startswith("forget") else sizes[name]
    return [{"split": name, "i": i} for i in range(size)]


@pytest.mark.parametrize("split", ["forget01", "forget05", "forget10"])
def test_samples_as_the_public_code_draws_them(split):
    """The public code's draws, redone with numpy's global generator and datasets' train_test_split."""
    datasets = pytest.importorskip("datasets")
    state = np.random.get_state()
    try:
        np.random.seed(42)  # evaluation_everything.py at import

        def sample(rows):  # its sample_data
            return rows if len(rows) <= 50 else [rows[i] for i in np.random.choice(len(rows), 50, replace=False)]
        want = {"perturb": {"retain": sample(fake_tofu("retain_perturbed")),
                            "forget": sample(fake_tofu(f"{split}_perturbed"))}}
        retain = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}[split]
        want["exact"] = {"retain": sample(fake_tofu(retain)[:400]), "forget": sample(fake_tofu(split))}
        assert paper_samples(fake_tofu, split) == want

        linear = {}
        for kind, suffix, pool in (("exact", "", retain), ("perturb", "_perturbed", "retain_perturbed")):
            np.random.seed(42)  # a fresh phi_exact.py / phi_perturb.py process
            rows = datasets.Dataset.from_list(fake_tofu(split + suffix))
            forget = rows.to_list() if split == "forget01" else rows.train_test_split(train_size=40)["train"].to_list()
            linear[kind] = {"retain": fake_tofu(pool)[:40], "forget": forget}
        assert uwc_linear_samples(fake_tofu, split) == linear
    finally:
        np.random.set_state(state)
    for kind in ("exact", "perturb"):
        assert len(want[kind]["retain"]) == 50 and len(linear[kind]["forget"]) == 40
    sets = {"retain": fake_tofu("retain_perturbed"), "forget": fake_tofu(f"{split}_perturbed")}
    clean = protocol_samples("clean", fake_tofu, split, sets, 7)
    assert clean["exact"] == clean["perturb"] == {"retain": sets["retain"][:7], "forget": sets["forget"][:7]}
    with pytest.raises(ValueError, match="PS protocol"):
        protocol_samples("table1", fake_tofu, split, sets, 7)
    with pytest.raises(ValueError, match="forget split"):
        paper_samples(fake_tofu, "forget20")


def test_samples_from_real_tofu():
    data = "../shared/tofu"
    try:
        load_tofu_split("forget05", data)
    except (OSError, FileNotFoundError):
        pytest.skip("real TOFU data absent")
    samples = paper_samples(lambda name: load_tofu_split(name, data), "forget05")
    questions = {r["question"] for r in load_tofu_split("forget05", data)}
    assert all(r["question"] in questions for r in samples["exact"]["forget"])
    assert all("paraphrased_question" in r for r in samples["perturb"]["retain"])
    assert len({json.dumps(r, sort_keys=True) for r in samples["exact"]["retain"]}) == 50


def test_cli_flag_and_preset_defaults():
    action = next(a for a in build_parser()._actions if a.dest == "ps_protocol")
    assert tuple(action.choices) == PS_PROTOCOLS and action.default is None  # None: the preset's
    assert {name: p.ps_protocol for name, p in PRESETS.items()} == {"embedded": "clean", "phi": "paper",
                                                                     "llama": "paper"}


@pytest.mark.parametrize("protocol", PS_PROTOCOLS)
def test_driver_scores_the_protocols_rows(toy, tmp_path, protocol):
    """The driver's PS metrics: the protocol's rows, read from --data-dir, scored under it."""
    recs, cases = toy
    model, tok = cases["tofu"]
    recs = recs[:4]
    for name in ("retain90", "retain_perturbed", "forget10", "forget10_perturbed"):
        rows = recs if name.endswith("perturbed") else [{k: r[k] for k in ("question", "answer")} for r in recs]
        (tmp_path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = SimpleNamespace(tokenizer=tok, template=TPL, data_dir=str(tmp_path))
    args = SimpleNamespace(ps_protocol=protocol, split="forget10", eval_size=3, preset="llama", eval_batch_size=2)
    sets = {"retain": recs[::-1], "forget": recs}
    got = ps_metrics(model, target, sets, args)
    kw = dict(protocol=protocol, family="llama2")
    for name in ("retain", "forget"):
        rows = sets[name][:3] if protocol == "clean" else recs  # the others take all of these few rows
        assert got[f"PS-exact {name}"] == pytest.approx(ps_scores(model, tok, TPL, rows, **kw)["ps"],
                                                        abs=1e-12)
        assert got[f"PS-perturb {name}"] == pytest.approx(
            ps_scores(model, tok, TPL, rows, question_key="paraphrased_question", **kw)["ps"], abs=1e-12)
