"""The TOFU metrics' fast paths against their references, row by row (issue 25, item 2): the
shared-prefix answer losses (eval/prefix_losses.py) against a full forward per pair, the KV-cache
generation loop (eval/cached_generate.py) against Hugging Face ``generate``, and whole
``evaluate_set`` / ``evaluate_tofu`` logs key by key, on a word-level and a byte-level BPE
tokenizer, the embedded target and SmolLM2-135M (skipped when absent)."""
import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for

from fastgeffect.data.templates import Template, get_template
from fastgeffect.embedded import TokenizerConfig, train_tokenizer
from fastgeffect.eval import TASKS, answer_losses, evaluate_set, evaluate_tofu, greedy_generate
from fastgeffect.eval.answer_losses import encode_pairs
from fastgeffect.eval.batch_encode import batch_encode_pairs
from fastgeffect.eval.cached_generate import cached_greedy_generate, plain_greedy
from fastgeffect.eval.generate import batches
from fastgeffect.eval.kv_cache import cache_keyword, keep_rows, returned_cache
from fastgeffect.eval.prefix_losses import shared_prefix_losses

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"
TPL = get_template("phi")
LOSS_KEYS = ("avg_gt_loss", "gt_loss", "avg_paraphrased_loss", "paraphrased_loss", "average_perturb_loss",
             "perturb_loss", "normalized_gt_loss", "truth_ratio")


def bpe_tokenizer_for(records, template):
    """A byte-level BPE (the embedded target's kind) trained on the records' text."""
    texts = [v for r in records for f in r.values() for v in (f if isinstance(f, list) else [f])]
    return train_tokenizer(texts + [template.full("", "")], TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module", params=["word", "bpe"])
def toy(request):
    recs = toy_qa_records(6)
    tok = (toy_tokenizer_for if request.param == "word" else bpe_tokenizer_for)(recs, TPL)
    model = tiny_llama(len(tok), hidden_size=24, layers=2, heads=2, seed=3, tokenizer=tok)
    return model, tok, recs


def pairs_of(recs):
    qs, ans = [], []
    for r in recs:
        for a in [r["answer"], r["paraphrased_answer"]] + r["perturbed_answer"]:
            qs.append(r["question"])
            ans.append(a)
    return qs, ans


def assert_losses_close(ref, new, rel):
    """Equal counts; each pair's loss within ``rel`` of its own size (a sum of positive NLLs)."""
    (rl, rn), (nl, nn) = ref, new
    assert torch.equal(rn, nn)
    assert rl.dtype == nl.dtype == torch.float64
    bad = [(i, float(a), float(b)) for i, (a, b) in enumerate(zip(rl, nl)) if abs(a - b) > rel * abs(a)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("fit", ["whole", "truncated"])
def test_shared_prefix_losses_equal_full_forwards(toy, dtype, rel, fit):
    model, tok, recs = toy
    model = copy.deepcopy(model).to(dtype)
    qs, ans = pairs_of(recs)
    # truncated: one token past the longest prompt, so its answers keep a single token and no EOS
    max_length = 200 if fit == "whole" else max(len(tok(TPL.prompt(q))["input_ids"]) for q in qs) + 1
    assert min(batch_encode_pairs(tok, TPL, qs, ans, max_length)[4]) >= 2  # every pair goes through the cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning, both ways
        for bs in (1, 5, 64):
            ref = answer_losses(model, tok, TPL, qs, ans, max_length=max_length, batch_size=bs)
            assert_losses_close(ref, shared_prefix_losses(model, tok, TPL, qs, ans, max_length=max_length,
                                                          batch_size=bs), rel)
    assert (int(ref[1].min()) == 1) == (fit == "truncated")


@pytest.mark.parametrize("template", ["phi", "llama2"])
def test_batched_encoding_is_encode_pairs(toy, template):
    """Two batched tokenizer calls give encode_pairs' ids, labels, lengths and truncation count
    (answers whole and cut, to one token and at the EOS slot), and encode_qa's refusals."""
    _, tok, recs = toy
    tpl = get_template(template)
    qs, ans = pairs_of(recs)
    longest = max(len(tok(tpl.prompt(q))["input_ids"]) for q in qs)
    full = sorted(len(tok(tpl.full(q, a))["input_ids"]) for q, a in zip(qs, ans))
    for max_length in (200, longest + 1, full[len(full) // 2], full[len(full) // 2] + 1):
        got = batch_encode_pairs(tok, tpl, qs, ans, max_length)
        assert got[:4] == encode_pairs(tok, tpl, qs, ans, max_length), max_length
        assert got[4] == [len(tok(tpl.prompt(q))["input_ids"]) for q in qs]
    assert batch_encode_pairs(tok, tpl, [], [], 200) == ([], [], [], 0, [])
    with pytest.raises(ValueError, match="leaves no answer token: question"):
        batch_encode_pairs(tok, tpl, qs, ans, longest)
    glued = Template("glued", "", "", "")  # question and answer run together: the tokenizer merges them
    merged = [(q, a) for q, a in (("Ann", "x Lee"), ("Le", "e Ann"), ("boo", "ks set"), ("Ki", "m Lee"))
              if len(tok(q + a)["input_ids"]) > len(tok(q)["input_ids"])
              and tok(q + a)["input_ids"][: len(tok(q)["input_ids"])] != tok(q)["input_ids"]]
    assert merged
    for encode in (encode_pairs, batch_encode_pairs):
        with pytest.raises(ValueError, match="not a prefix of the prompt\\+answer tokens"):
            encode(tok, glued, [merged[0][0]], [merged[0][1]], 200)


def test_shared_prefix_falls_back_where_nothing_is_shared(toy):
    """A one-token prompt leaves nothing to cache: those pairs take the full forward, the others
    the cache, and every loss is the reference's; a forward without a cache keyword (a wrapper
    taking **kwargs) takes the reference path."""
    model, tok, recs = toy
    bare = Template("bare", "", "", " ")
    ans = [r["answer"] for r in recs]
    # one-token questions that stay a prefix of question + answer
    words = sorted({w for r in recs for w in r["answer"].split() if len(tok(w)["input_ids"]) == 1
                    and all(tok(bare.full(w, a))["input_ids"][:1] == tok(w)["input_ids"] for a in ans)})
    assert words
    qs = [r["question"] for r in recs] + [words[i % len(words)] for i in range(len(recs))]
    ans = ans * 2
    prompt_lengths = batch_encode_pairs(tok, bare, qs, ans, 200)[4]
    assert min(prompt_lengths[: len(recs)]) >= 2 and max(prompt_lengths[len(recs):]) == 1
    ref = answer_losses(model, tok, bare, qs, ans, batch_size=4)
    assert_losses_close(ref, shared_prefix_losses(model, tok, bare, qs, ans, batch_size=4), 1e-6)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)
    assert_losses_close(ref, shared_prefix_losses(Wrapped(model), tok, bare, qs, ans, batch_size=4), 1e-6)


def test_kv_cache_helpers(toy):
    """The cache keyword of this transformers version, the cache a forward returns, and a batch
    selection that leaves the rows it keeps as they were (a Cache object and the legacy tuples)."""
    model, tok, _ = toy
    assert cache_keyword(model) in ("cache", "past_key_values") and cache_keyword(torch.nn.Identity()) is None
    x = torch.randint(3, len(tok), (4, 6))
    with torch.no_grad():
        cache = returned_cache(model(input_ids=x, use_cache=True))
        legacy = tuple((layer.keys, layer.values) for layer in cache.layers) if hasattr(cache, "layers") else None
        keep = torch.tensor([3, 1])
        kept = keep_rows(copy.deepcopy(cache), keep)
        nxt = torch.randint(3, len(tok), (2, 1))
        got = model(input_ids=nxt, position_ids=torch.full((2, 1), 6), use_cache=True, **{cache_keyword(model): kept})
        want = model(input_ids=torch.cat([x[keep], nxt], dim=1)).logits[:, -1]
    torch.testing.assert_close(got.logits[:, -1], want, rtol=1e-5, atol=1e-5)
    if legacy is not None:
        assert all(torch.equal(a, b[keep]) for la, lb in zip(keep_rows(legacy, keep), legacy) for a, b in zip(la, lb))


def eos_early(model, tok, token_id, scale=1.5):
    """``model`` whose EOS logit is ``scale`` × that of ``token_id``: rows end where that token
    would be competitive, at different steps."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight[tok.eos_token_id] = scale * m.lm_head.weight[token_id]
    return m


def eos_positions(ids, eos):
    return [x.index(eos) if eos in x else -1 for x in ids]


@pytest.fixture(scope="module")
def eos_model(toy):
    """Of a few candidates, the EOS-early model whose rows end at the most different steps."""
    model, tok, recs = toy
    prompts = [TPL.prompt(r["question"]) for r in recs] + [TPL.prompt(r["paraphrased_question"]) for r in recs]
    best = (0, None)
    for t in sorted({t for r in recs for t in tok(r["answer"])["input_ids"]})[:40]:
        for scale in (1.2, 1.5):
            m = eos_early(model, tok, t, scale)
            ids = greedy_generate(m, tok, prompts, max_new_tokens=12, batch_size=32, return_ids=True)
            best = max(best, (len(set(eos_positions(ids, tok.eos_token_id))), m), key=lambda b: b[0])
    return best[1], prompts


@pytest.mark.parametrize("mode", ["independent", "tofu"])
def test_cached_generation_equals_generate(toy, eos_model, mode):
    """Rows that end by EOS at several steps, rows cut by their budget (TOFU's per batch or each
    its own), rows with no budget left, batches of one."""
    model, tok, recs = toy
    eos_m, prompts = eos_model
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    ends, texts = set(), []
    for m in (model, eos_m):
        for kw in (dict(max_length=max(lengths) + 9), dict(max_length=max(lengths)), dict(max_new_tokens=7)):
            for bs in ((1, 7) if m is eos_m else (7,)):
                ref = greedy_generate(m, tok, prompts, mode=mode, batch_size=bs, return_ids=True, **kw)
                want = tok.batch_decode(ref, skip_special_tokens=True)
                assert cached_greedy_generate(m, tok, prompts, mode=mode, batch_size=bs, **kw) == want
                ends |= set(eos_positions(ref, tok.eos_token_id))
                texts += want
    assert -1 in ends and len(ends) >= 5, ends  # rows that hit EOS at several steps, and rows that never do
    assert "" in texts  # max(lengths) leaves no budget to the longest prompts


def test_generation_config_beyond_plain_greedy_takes_generate(toy):
    model, tok, recs = toy
    prompts = [TPL.prompt(r["question"]) for r in recs]
    m = copy.deepcopy(model)
    m.generation_config.repetition_penalty = 3.0
    assert plain_greedy(model) and not plain_greedy(m)
    want = greedy_generate(m, tok, prompts, max_new_tokens=8)
    assert want != greedy_generate(model, tok, prompts, max_new_tokens=8)  # the penalty changes something
    assert cached_greedy_generate(m, tok, prompts, max_new_tokens=8) == want
    # several stop ids in the generation config: a row ends at any of them
    m = eos_early(model, tok, tok(recs[0]["answer"])["input_ids"][1])
    m.generation_config.eos_token_id = [tok.eos_token_id, tok(recs[0]["answer"])["input_ids"][2]]
    assert cached_greedy_generate(m, tok, prompts, max_new_tokens=8) == greedy_generate(m, tok, prompts,
                                                                                        max_new_tokens=8)


def derived_scale(log: dict, key: str, i: str) -> float:
    """The size of the terms a derived number is computed from, for its tolerance: the truth
    ratio exp(avg paraphrased − mean avg perturbed) errs by itself × the error of its exponent,
    the normalised loss avg_gt + logsumexp(−avg losses) by that of its terms."""
    pert = [abs(x) for x in log["average_perturb_loss"][i]]
    if key == "truth_ratio":
        return (log[key][i] or 0.0) * (abs(log["avg_paraphrased_loss"][i]) + sum(pert) / len(pert))
    gt = abs(log["avg_gt_loss"][i])
    return gt + max([gt] + pert) + math.log(1 + len(pert))


def assert_same_logs(ref: dict, new: dict, rel: float):
    """Key by key and row by row: the same keys and samples; the losses within ``rel`` of their
    scale (the largest |value| of the key in the set), the truth ratio and the normalised loss
    within ``rel`` of the terms they are computed from (:func:`derived_scale`); token counts,
    ROUGE and generations identical."""
    assert list(ref) == list(new)  # the same keys in the same order (the files' layout)
    for key in ref:
        assert list(ref[key]) == list(new[key]), key
        if key not in LOSS_KEYS:
            assert ref[key] == new[key], key
            continue
        values = [abs(x) for v in ref[key].values() for x in (v if isinstance(v, list) else [v]) if x is not None]
        for i in ref[key]:
            tol = rel * (derived_scale(ref, key, i) if key in ("truth_ratio", "normalized_gt_loss") else max(values))
            a, b = ref[key][i], new[key][i]
            if isinstance(a, list):
                assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), (key, i, a, b)
            else:
                assert (a is None) == (b is None) and (a is None or abs(a - b) <= tol), (key, i, a, b)


@pytest.mark.parametrize("gen_mode", ["independent", "tofu"])
def test_evaluate_set_new_equals_reference(toy, gen_mode):
    model, tok, recs = toy
    for m, rel in ((copy.deepcopy(model).double(), 1e-12), (eos_early(model, tok, tok("books")["input_ids"][0]), 1e-6)):
        for task in ("forget", "real_authors"):
            kw = dict(max_length=40, batch_size=3, gen_mode=gen_mode)
            assert_same_logs(evaluate_set(m, tok, TPL, recs, task, reference=True, **kw),
                             evaluate_set(m, tok, TPL, recs, task, **kw), rel)


def odd_sets(recs):
    """Four sets of 3, 5, 2 and 4 rows (TOFU's order), some rows in two sets."""
    return {"retain": recs[0:3], "real_authors": recs[3:8], "world_facts": recs[8:10],
            "forget": recs[10:12] + recs[0:2]}


def test_evaluate_tofu_independent_generates_across_sets(toy):
    """The fast path in independent mode generates every set's prompts in one call, in
    length-sorted batches that span sets: each set gets the reference's generations (Hugging Face
    generate, set by set) and numbers, on odd-sized sets."""
    model, tok, recs = toy
    sets = odd_sets(recs)
    prompts = [TPL.prompt(r["question"]) for rows in sets.values() for r in rows]
    owner = [name for name, rows in sets.items() for _ in rows]
    spans = [b for b in batches([len(tok(p)["input_ids"]) for p in prompts], "independent", 3)
             if len({owner[i] for i in b}) > 1]
    assert spans  # a batch holds prompts of two sets
    for m, rel in ((copy.deepcopy(model).double(), 1e-12), (eos_early(model, tok, tok("books")["input_ids"][0]), 1e-6)):
        kw = dict(max_length=40, batch_size=3, gen_mode="independent", ds_size=None, progress=False)
        ref = evaluate_tofu(m, tok, TPL, sets, reference=True, **kw)
        new = evaluate_tofu(m, tok, TPL, sets, **kw)
        assert list(ref["logs"]) == list(new["logs"]) and len(ref["logs"]) == 4
        for name, rows in sets.items():
            log = TASKS[name][0]
            assert len(new["logs"][log]["generated_text"]) == len(rows)
            assert_same_logs(ref["logs"][log], new["logs"][log], rel)
        for k, v in ref["metrics"].items():
            scale = max(abs(x) for x in ref["metrics"].values() if isinstance(x, float) and math.isfinite(x))
            assert abs(v - new["metrics"][k]) <= rel * scale, k


@pytest.mark.parametrize("gen_mode, reference, calls", [("independent", False, 1), ("tofu", False, 4),
                                                        ("independent", True, 4), ("tofu", True, 4)])
def test_generation_calls_per_evaluation(toy, monkeypatch, gen_mode, reference, calls):
    """One generation call for all sets on the fast independent path; one per set in tofu mode
    (TOFU's batches within a set) and on the reference path, whose generator is Hugging Face's."""
    import fastgeffect.eval.tofu as tofu

    model, tok, recs = toy
    seen = {"cached": [], "generate": []}

    def counting(kind, fn):
        def wrapped(model, tokenizer, prompts, **kw):
            seen[kind].append((len(prompts), kw["batch_size"]))
            return fn(model, tokenizer, prompts, **kw)
        return wrapped
    monkeypatch.setattr(tofu, "cached_greedy_generate", counting("cached", cached_greedy_generate))
    monkeypatch.setattr(tofu, "greedy_generate", counting("generate", greedy_generate))
    evaluate_tofu(model, tok, TPL, odd_sets(recs), max_length=40, batch_size=3, gen_mode=gen_mode, ds_size=None,
                  progress=False, reference=reference)
    used = seen["generate" if reference else "cached"]
    assert not seen["cached" if reference else "generate"]
    assert len(used) == calls
    assert sorted(n for n, _ in used) == ([14] if calls == 1 else [2, 3, 4, 5])
    assert {b for _, b in used} == {30 if gen_mode == "tofu" else 3}


def test_evaluate_set_takes_given_generations(toy):
    """evaluate_set(generations=...) logs and scores the texts it is given, and refuses a wrong count."""
    model, tok, recs = toy
    kw = dict(max_length=40, batch_size=3, gen_mode="independent")
    want = evaluate_set(model, tok, TPL, recs[:3], "forget", **kw)
    gens = [g for _, g, _ in want["generated_text"].values()]
    assert evaluate_set(model, tok, TPL, recs[:3], "forget", generations=gens, **kw) == want
    given = evaluate_set(model, tok, TPL, recs[:3], "forget", generations=[r["answer"] for r in recs[:3]], **kw)
    assert [g for _, g, _ in given["generated_text"].values()] == [r["answer"] for r in recs[:3]]
    assert all(v == 1.0 for v in given["rougeL_recall"].values())
    with pytest.raises(ValueError, match="one text per record: got 2 for 3 records"):
        evaluate_set(model, tok, TPL, recs[:3], "forget", generations=gens[:2], **kw)


@pytest.fixture(scope="module")
def embedded(module_embedded_cache):
    from fastgeffect.embedded import build_embedded
    from fastgeffect.eval import load_tofu_sets

    emb = build_embedded(size="tiny")
    return emb, emb.load_target(), load_tofu_sets(emb.forget_split, emb.data_dir)


@pytest.mark.parametrize("gen_mode", ["independent", "tofu"])
def test_evaluate_tofu_on_the_embedded_target(embedded, gen_mode):
    """The memorised target: answers end in EOS, the forget set's are reproduced; every log file
    and the aggregated metrics agree (Model Utility within 1e-6 of its scale)."""
    emb, model, sets = embedded
    kw = dict(ds_size=12, max_length=emb.max_length, gen_mode=gen_mode, batch_size=8, progress=False)
    ref = evaluate_tofu(model, emb.tokenizer, emb.template, sets, reference=True, **kw)
    new = evaluate_tofu(model, emb.tokenizer, emb.template, sets, **kw)
    assert list(ref["logs"]) == list(new["logs"])
    for name in ref["logs"]:
        assert_same_logs(ref["logs"][name], new["logs"][name], 1e-6)
    assert set(ref["metrics"]) == set(new["metrics"])
    for k, v in ref["metrics"].items():
        assert math.isclose(v, new["metrics"][k], rel_tol=1e-6, abs_tol=1e-9), k
    forget = new["logs"]["eval_log_forget.json"]
    # generations that reproduce the answer and end there, by EOS, well before their budget
    assert sum(g == emb.template.answer_start + t for _, g, t in forget["generated_text"].values()) >= 3


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/tofu (the TOFU data) is not present")
def test_smollm2_chat_template_on_real_rows(tmp_path_factory, monkeypatch):
    """A real pretrained LM (tied embeddings, 30 blocks, BPE with a chat template whose prompt
    holds the system turn): two real forget rows, both generation modes."""
    from helpers.smollm2 import ALIAS, converted_smollm2

    from fastgeffect.data.templates import choose_template
    from fastgeffect.data.tofu import load_tofu_split
    from fastgeffect.model_loading import load_causal_lm

    cache, _ = converted_smollm2(tmp_path_factory)
    monkeypatch.setenv("FASTGEFFECT_CACHE", str(cache))
    model, tok = load_causal_lm(ALIAS)
    tpl = choose_template(tok)
    assert tpl.chat
    rows = load_tofu_split("forget10_perturbed", SHARED)[:2]
    for gen_mode in ("tofu", "independent"):
        kw = dict(max_length=200, max_new_tokens=8, batch_size=8, gen_mode=gen_mode)
        assert_same_logs(evaluate_set(model, tok, tpl, rows, "forget", reference=True, **kw),
                         evaluate_set(model, tok, tpl, rows, "forget", **kw), 1e-6)


def test_benchmark_quick_mode(embedded, capsys):
    """benchmarks/bench_eval_tofu.py --quick on the tiny embedded target: every row compares
    the two paths on the same inputs and finds the same numbers (times are not checked)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_eval_tofu

    assert bench_eval_tofu.main(["--quick", "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    what = [r[0] for r in rows]
    assert sum("TOFU metrics" in w for w in what) == 2 and sum("loss passes" in w for w in what) == 2
    assert sum("generation" in w for w in what) == 2 and sum("UWC calibration" in w for w in what) == 1
    for r in rows:
        assert len(r) == 7 and float(r[1]) > 0 and float(r[2]) > 0 and r[3].endswith("×"), r
        assert "NO" not in r[4] + r[5] and "other α" not in r[4], r
        if "TOFU metrics" in r[0] or "generation" in r[0]:
            assert r[5] == "yes"
    uwc = rows[what.index(next(w for w in what if "UWC" in w))]
    a, b = uwc[6].strip(" |").split(" / ")
    assert a == b and "θ_u restored bitwise: yes" in uwc[4] and "PS at each α 0.0e+00" in uwc[4]
    assert int(uwc[0].split(", ")[1].split()[0]) >= 4  # the search bisected (several α tried)
