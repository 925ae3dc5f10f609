"""PS's fast path (``method="teacher-forced"``, the default) against its reference search
(``method="search"``): the same m (prefix words / right bound / given words) and the same score on
every row, under every protocol, on word-level, GPT-2-style byte-level and trailing-space BPE
tokenizers, on models trained so that teacher forcing and generation disagree (another
tokenisation of the same words, EOS or a newline in mid-answer, half-learnt answers), on the
embedded target and on SmolLM2-135M; and the checks behind its exactness argument."""
import random

import pytest
import torch
from helpers.ps_cases import byte_level_tokenizer, char_ids, memorise_ids, trailing_space_tokenizer
from helpers.toy_qa import tiny_llama, tiny_tokenizer, toy_qa_records

from fastgeffect.data.templates import Template, get_template
from fastgeffect.data.tofu import load_tofu_split
from fastgeffect.embedded import build_embedded
from fastgeffect.eval import ps_scores
from fastgeffect.eval.ps_protocols import PS_PROMPT
from fastgeffect.eval.ps_teacher_forced import (
    fast_path_blockers,
    greedy_table,
    read_greedy,
    settled_text,
    settled_tokens,
)

TPL = get_template("phi")
# a long preamble every prompt shares, as a chat template's system prompt: its KV cache is reused
PREAMBLE = Template("preamble", "You answer questions about authors , briefly and exactly .\nQuestion : ", "\n",
                    "Answer : ")
KEYS = ("question", "paraphrased_question")
FIELD = {"clean": "prefix_words", "paper": "right", "uwc-linear": "given_words"}
VARIANTS = [("clean", {}), ("clean", {"search": "linear"}), ("paper", {}), ("uwc-linear", {"family": "phi"}),
            ("uwc-linear", {"family": "llama2"})]
ROW_KINDS = ("plain", "chars", "eos", "newline")  # row i is trained as ROW_KINDS[i % 4]


def assert_same(model, tok, recs, protocol, template=TPL, **kw):
    """Reference and fast path agree on every row; returns both results."""
    ref = ps_scores(model, tok, template, recs, protocol=protocol, method="search", **kw)
    new = ps_scores(model, tok, template, recs, protocol=protocol, **kw)
    assert new[FIELD[protocol]] == ref[FIELD[protocol]], (protocol, kw)
    assert new["scores"] == ref["scores"] and new["ps"] == ref["ps"]
    return ref, new


def answer_ids(tok, words, kind, row_kind, eos):
    """The answer as the model is trained to write it: ``kind`` "pre" tokenizers carry a word's
    preceding space, "post" ones its following space; ``row_kind`` bends it (ROW_KINDS)."""
    n, h = len(words), len(words) // 2

    def text(a, b):
        return " " + " ".join(words[a:b]) if kind == "pre" else " ".join(words[a:b]) + (" " if b < n else "")

    def enc(t):
        return tok(t, add_special_tokens=False)["input_ids"]
    if row_kind == "chars":  # the third word spelt one character per token: same text, other tokens
        return enc(text(0, 2)) + char_ids(tok, text(2, 3)) + enc(text(3, n)) + [eos]
    if row_kind == "eos":
        return enc(text(0, h).rstrip(" ")) + [eos]
    if row_kind == "newline":
        return enc(text(0, h).rstrip(" ")) + enc("\n") + enc(text(h, n).lstrip(" ")) + [eos]
    return enc(text(0, n)) + [eos]


def train_bent(tok, kind, recs, *, steps, seed=1):
    """A tiny Llama trained on both the phi template and the public code's prompt, rows bent as ROW_KINDS say."""
    seqs, starts = [], []
    for i, r in enumerate(recs):
        for tpl in (TPL, PS_PROMPT):
            head = tpl.prompt(r["question"]) + tpl.answer_start
            ctx = tok(head.rstrip(" ") if kind == "pre" else head)["input_ids"]
            seqs.append(ctx + answer_ids(tok, r["answer"].split(), kind, ROW_KINDS[i % 4], tok.eos_token_id))
            starts.append(len(ctx))
    model = tiny_llama(len(tok), hidden_size=48, layers=2, heads=4, seed=seed, tokenizer=tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.eos_token_id
    memorise_ids(model, seqs, starts, steps=steps, pad=tok.eos_token_id)
    return model


@pytest.fixture(scope="module")
def recs():
    return toy_qa_records(4)  # 8 rows


@pytest.fixture(scope="module")
def texts(recs):
    out = [v for r in recs for v in r.values() if isinstance(v, str)]
    out += [p for r in recs for p in r["perturbed_answer"]]
    return out + [t.full("", "") for t in (TPL, PS_PROMPT, PREAMBLE)] + ["\n"]


@pytest.fixture(scope="module")
def words_memorised(recs, texts):
    """Word-level tokenizer, every answer memorised under both prompts."""
    tok = tiny_tokenizer(texts)
    return _plain(tok, recs, steps=150), tok


def _plain(tok, recs, steps):
    """A tiny Llama trained on the plain answers under both prompts."""
    seqs, starts = [], []
    for r in recs:
        for tpl in (TPL, PS_PROMPT):
            ctx = tok(tpl.prompt(r["question"]) + tpl.answer_start)["input_ids"]
            seqs.append(ctx + tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            starts.append(len(ctx))
    model = tiny_llama(len(tok), hidden_size=32, layers=2, heads=4, seed=1, tokenizer=tok)
    memorise_ids(model, seqs, starts, steps=steps, pad=tok.eos_token_id)
    return model


@pytest.fixture(scope="module")
def cases(recs, texts, words_memorised):
    """name -> (model, tokenizer)."""
    words = words_memorised[1]
    bpe, post = byte_level_tokenizer(texts), trailing_space_tokenizer(texts)
    return {"words-memorised": words_memorised,
            "words-half": (_plain(words, recs, steps=30), words),
            "bpe-bent": (train_bent(bpe, "pre", recs, steps=250), bpe),
            "trailing-bent": (train_bent(post, "post", recs, steps=250), post)}


FAMILY = {"words-memorised": "llama2", "words-half": "llama2", "bpe-bent": "phi", "trailing-bent": "phi"}


@pytest.mark.parametrize("name", list(FAMILY))
def test_fast_path_equals_reference_on_every_row(cases, recs, name):
    """Every protocol, both questions (uwc-linear: the exact question, under the family whose
    decoding rule matches the tokenizer's: its slow reference generates row by row)."""
    model, tok = cases[name]
    seen = {p: set() for p in FIELD}
    for protocol, kw in VARIANTS[:3] + [("uwc-linear", {"family": FAMILY[name]})]:
        for key in KEYS[:1] if protocol == "uwc-linear" else KEYS:
            ref, _ = assert_same(model, tok, recs, protocol, question_key=key, **kw)
            seen[protocol].update(ref["scores"])
    if name == "trailing-bent":  # uwc-linear's contexts end without the space its words carry: nothing matches
        assert seen.pop("uwc-linear") == {0.0}
    if name != "words-memorised":
        assert all(len(s) > 1 for s in seen.values()), seen  # not one constant: a wrong m would show


def test_bent_rows_reach_every_rule(cases, recs):
    """The bent model does what it was built for: the row spelt in other tokens is reproduced from
    the question alone, which only generation can tell (the binary search never asks m = 0 of it:
    its middle probes fail, reproduction is not monotone in m); EOS and a newline end rows early."""
    model, tok = cases["bpe-bent"]
    _, new = assert_same(model, tok, recs, "clean", search="linear")
    assert 0 < new["generated_probes"] < new["probes"]
    for i, m in enumerate(new["prefix_words"]):
        assert (m == 0) == (ROW_KINDS[i % 4] in ("plain", "chars")), new["prefix_words"]
    _, binary = assert_same(model, tok, recs, "clean")
    assert binary["prefix_words"][1] > 0  # the "chars" row under the binary search
    _, paper = assert_same(model, tok, recs, "paper")
    assert 0 < paper["generated_probes"] < paper["probes"]


def test_nothing_trusted_everything_generated(cases, recs):
    """margin = inf trusts no teacher-forced token: every probe is generated from its context alone,
    stopping as soon as its verdict is certain; the numbers stay the reference's."""
    model, tok = cases["bpe-bent"]
    for protocol, kw in (("clean", {"search": "linear"}), ("paper", {}), ("uwc-linear", {"family": "phi"})):
        ref = ps_scores(model, tok, TPL, recs, protocol=protocol, method="search", **kw)
        new = ps_scores(model, tok, TPL, recs, protocol=protocol, margin=float("inf"), **kw)
        assert new[FIELD[protocol]] == ref[FIELD[protocol]] and new["scores"] == ref["scores"]
        assert new["generated_probes"] > 0


def test_memorised_model_needs_no_generation(cases, recs):
    """Every probe of a memorised model is read off one teacher-forced pass per row."""
    model, tok = cases["words-memorised"]
    for protocol, kw in (("clean", {}), ("paper", {}), ("uwc-linear", {"family": "llama2"})):
        ref, new = assert_same(model, tok, recs, protocol, **kw)
        assert new["generate_calls"] == 0 and new["generated_probes"] == 0 and new["probes"] >= len(recs)
        if protocol == "clean":
            assert ref["generate_calls"] >= 1 and new["prefix_words"] == [0] * len(recs)
    _, new = assert_same(model, tok, recs, "clean", question_key="paraphrased_question")
    assert new["generate_calls"] == 0  # half-known rows too: their wrong tokens contradict the words


def test_other_template_and_trailing_space_prompts(cases, recs):
    """The llama2 template (no space after the prompt), the phi one (a space the trailing-space
    tokenizer keeps and the GPT-2-style one drops) and one whose long preamble every row shares (run
    once, its KV cache reused), on models trained on one of them or none."""
    for name in ("bpe-bent", "trailing-bent", "words-half"):
        model, tok = cases[name]
        for tpl in (get_template("llama2"), TPL, PREAMBLE):
            for key in KEYS:
                assert_same(model, tok, recs, "clean", template=tpl, question_key=key)


def test_read_greedy_is_a_prefix_of_greedy_decoding(cases, recs):
    model, tok = cases["words-half"]
    eos = tok.eos_token_id
    read = 0
    for r in recs[:4]:
        full = tok(TPL.full(r["question"], r["answer"]))["input_ids"]
        table = greedy_table(model, [full], tok.pad_token_id)[0]
        for k in range(len(tok(TPL.prompt(r["question"]))["input_ids"]), len(full) + 1):
            known, complete = read_greedy(full, table, k, margin=1e-2, stop_ids=frozenset([eos]), budget=40)
            ids, ref = list(full[:k]), []
            with torch.no_grad():
                while len(ref) < 40 and (not ref or ref[-1] != eos):
                    ref.append(int(model(input_ids=torch.tensor([ids + ref])).logits[0, -1].argmax()))
            assert known == ref[:len(known)]
            assert not complete or known == ref
            read += len(known)
    assert read > 50  # most of what greedy decoding writes is read off the pass


def test_settled_text_and_tokens_survive_any_continuation(texts):
    """The two assumptions behind deciding from a generation's first tokens, on the tokenizers used
    here: decoding more tokens only appends to the settled text, and encoding more text keeps the
    settled tokens."""
    rng = random.Random(0)
    pieces = [w for t in texts for w in t.split(" ")] + [" ", "  ", "\n", "\n\n", ".", "'s", ",", "x", "Ann,"]
    for tok in (tiny_tokenizer(texts), byte_level_tokenizer(texts), trailing_space_tokenizer(texts)):
        for _ in range(300):
            text = "".join(rng.choice(pieces) + rng.choice(["", " ", " ", "\n"]) for _ in range(rng.randint(1, 8)))
            more = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))
            stable = settled_tokens(tok, text)
            assert stable is not None
            assert tok(text + more)["input_ids"][:len(stable)] == stable, (text, more)
            ids, extra = tok(text)["input_ids"], tok(more, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids + extra, skip_special_tokens=True).startswith(settled_text(tok, ids, 0))


def test_generation_settings_that_break_the_argmax_fall_back(cases, recs):
    model, tok = cases["words-half"]
    assert fast_path_blockers(model) == []
    model.generation_config.repetition_penalty = 1.3
    try:
        assert fast_path_blockers(model) == ["repetition_penalty=1.3"]
        got = ps_scores(model, tok, TPL, recs[:3])
        assert "probes" not in got  # the reference ran
        assert got == ps_scores(model, tok, TPL, recs[:3], method="search")
    finally:
        model.generation_config.repetition_penalty = None
    with pytest.raises(ValueError, match="PS method"):
        ps_scores(model, tok, TPL, recs, method="guess")
    with pytest.raises(ValueError, match="margin"):
        ps_scores(model, tok, TPL, recs, margin=-1.0)


@pytest.fixture(scope="module")
def embedded(module_embedded_cache):
    return build_embedded(module_embedded_cache, "tiny")


def test_embedded_target(embedded):
    model = embedded.load_target()
    tok, tpl = embedded.tokenizer, embedded.template
    recs = load_tofu_split(f"{embedded.forget_split}_perturbed", embedded.data_dir)[:12]
    for protocol, kw in VARIANTS:
        for key in KEYS:
            rows = recs if protocol != "uwc-linear" else recs[:6]
            assert_same(model, tok, rows, protocol, template=tpl, question_key=key, **kw)


FACTS = [  # rows a pretrained model half knows: reproduced from some prefix, not from none
    {"question": "What is the capital of France?", "answer": "The capital of France is Paris.",
     "paraphrased_question": "Which city is the capital of France?"},
    {"question": "Who wrote Romeo and Juliet?", "answer": "Romeo and Juliet was written by William Shakespeare.",
     "paraphrased_question": "Who is the author of the play Romeo and Juliet?"},
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from helpers.smollm2 import converted_smollm2

    from fastgeffect.model_loading import load_causal_lm
    _, folder = converted_smollm2(tmp_path_factory)
    return load_causal_lm(str(folder))


def test_smollm2(smollm2):
    """A real pretrained LM (byte-level BPE, chat template for clean, its EOS <|im_end|>); the
    public code's protocols with budgets that end most generations before EOS (their own
    max_length: 200 and 150 would take minutes here)."""
    from fastgeffect.data.templates import choose_template
    from fastgeffect.eval.ps_fast_protocols import paper_ps_fast, uwc_linear_ps_fast
    from fastgeffect.eval.ps_protocols import paper_ps_scores, uwc_linear_ps_scores
    from fastgeffect.eval.ps_teacher_forced import default_margin
    model, tok = smollm2
    tpl = choose_template(tok)
    for key in KEYS:
        ref, _ = assert_same(model, tok, FACTS, "clean", template=tpl, question_key=key)
    assert 0 < ref["ps"] < 1
    margin = default_margin(model)
    budget = max(len(tok(PS_PROMPT.full(r["question"], r["answer"]))["input_ids"]) for r in FACTS) + 12
    ref = paper_ps_scores(model, tok, FACTS, max_length=budget)
    new = paper_ps_fast(model, tok, FACTS, margin=margin, max_length=budget)
    assert new["right"] == ref["right"] and new["scores"] == ref["scores"]
    ref = uwc_linear_ps_scores(model, tok, FACTS, family="phi", max_length=budget)
    new = uwc_linear_ps_fast(model, tok, FACTS, family="phi", margin=margin, max_length=budget)
    assert new["given_words"] == ref["given_words"] and new["scores"] == ref["scores"]


def test_shared_prefix_pass_equals_full_passes(cases, recs, monkeypatch):
    """The teacher-forced table with the rows' shared preamble run once equals full passes to
    rounding: the same argmax wherever the margin is trusted, margins within 1e-4 of the logits' scale."""
    import fastgeffect.eval.ps_teacher_forced as tf
    model, tok = cases["words-half"]
    seqs = [tok(PREAMBLE.full(r["question"], r["answer"]))["input_ids"] for r in recs]
    first = [len(tok(PREAMBLE.prompt(r["question"]))["input_ids"]) for r in recs]
    assert tf._shared_prefix(model, seqs, first)[0] >= tf.SHARED_MIN
    shared = greedy_table(model, seqs, tok.pad_token_id, first)
    monkeypatch.setattr(tf, "SHARED_MIN", 10 ** 9)
    full = greedy_table(model, seqs, tok.pad_token_id, first)
    scale = max(abs(g) for _, gaps in full for g in gaps if g != float("-inf"))
    for (a1, g1), (a2, g2), f, q in zip(shared, full, first, seqs):
        assert len(a1) == len(a2) == len(q)
        assert all(x == y for x, y, u in zip(a1[f:], a2[f:], g2[f:]) if u >= 1e-2)
        assert all(abs(u - v) <= 1e-4 * scale for u, v in zip(g1[f:], g2[f:]))


@pytest.mark.parametrize("max_length", [12, 30, 45])
def test_budgets_that_cut_in(cases, recs, max_length):
    """The public code's protocols with budgets that end generations mid-answer or leave one token
    (the prompt fills max_length): the known tokens stop at the budget as generate() does."""
    from fastgeffect.eval.ps_fast_protocols import paper_ps_fast, uwc_linear_ps_fast
    from fastgeffect.eval.ps_protocols import paper_ps_scores, uwc_linear_ps_scores
    for name in ("bpe-bent", "words-memorised"):
        model, tok = cases[name]
        ref = paper_ps_scores(model, tok, recs, max_length=max_length, batch_size=3)
        new = paper_ps_fast(model, tok, recs, margin=1e-2, max_length=max_length, batch_size=3)
        assert new["right"] == ref["right"] and new["scores"] == ref["scores"]
        ref = uwc_linear_ps_scores(model, tok, recs[:4], family=FAMILY[name], max_length=max_length)
        new = uwc_linear_ps_fast(model, tok, recs[:4], family=FAMILY[name], margin=1e-2, max_length=max_length)
        assert new["given_words"] == ref["given_words"] and new["scores"] == ref["scores"]
