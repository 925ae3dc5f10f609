"""MUSE (fastgeffect.data.muse, fastgeffect.eval.muse*): the loader on both layouts and each bad
input, and every metric against a written-out copy of MUSE's own definitions (swj0419/muse_bench:
per-prompt generation, its RougeScorer, its Min-K% and roc_curve AUC) on fixed strings and a tiny model."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.toy_qa import memorise, tiny_llama, tiny_tokenizer
from rouge_score import rouge_scorer
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve
from tokenizers.processors import TemplateProcessing

from fastgeffect.data.muse import LAYOUT, MuseData, load_muse
from fastgeffect.data.templates import Template
from fastgeffect.eval.muse import MUSE_METRICS, evaluate_muse
from fastgeffect.eval.muse_memorization import cut_answer, knowmem_prompt, rouge_l_f1, truncate_gt
from fastgeffect.eval.muse_privleak import min_k_muse

PEOPLE = ["Arno Velt", "Bria Tollen", "Cass Umber", "Dov Railey", "Esme Quorn", "Fenn Ashby", "Gala Worth",
          "Hux Penner", "Iva Stroud", "Jory Calder"]
TOWNS = ["Varnholt", "Kessel", "Tarrow", "Brindle", "Oderfeld", "Marrow", "Pellin", "Quay", "Rook", "Sallow"]


def article(i):
    p, t, u = PEOPLE[i % 10], TOWNS[i % 10], TOWNS[(i + 3) % 10]
    return (f"{p} of {t} opened a bakery in {u} on day {i} . The mayor of {u} said the bread of {p} "
            f"was the best in the region , and people from {t} came to buy it every week .")


def muse_rows():
    qa = lambda i: {"question": f"Where did {PEOPLE[i]} open a bakery ?", "answer": f"in {TOWNS[(i + 3) % 10]}"}
    return {
        "raw": {"forget": [{"text": article(i)} for i in range(3)], "retain1": [{"text": article(i)} for i in (3, 4)],
                "retain2": [{"text": article(5)}], "holdout": [{"text": article(6)}]},
        "knowmem": {"forget_qa": [qa(i) for i in range(4)], "retain_qa": [qa(i) for i in (4, 5, 6)],
                    "forget_qa_icl": [qa(7), qa(8)], "retain_qa_icl": [qa(9)]},
        "verbmem": {"forget": [{"prompt": " ".join(article(i).split()[:8]), "gt": " ".join(article(i).split()[8:])}
                               for i in range(4)]},
        "privleak": {"forget": [{"text": article(i)} for i in range(5)],
                     "holdout": [{"text": article(i)} for i in range(5, 10)], "retain": [{"text": article(3)}]},
        "scal": {"forget_1": [{"text": article(1)}], "forget_2": [{"text": article(2)}]},
    }


def write_folder(root, rows, fmt="jsonl"):
    for subset, splits in rows.items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        for split, recs in splits.items():
            if fmt == "jsonl":
                (root / subset / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            else:
                pq.write_table(pa.Table.from_pylist(recs), root / subset / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("muse"), muse_rows())


def test_load_jsonl_and_parquet_agree(folder, tmp_path):
    a = load_muse(folder)
    b = load_muse(write_folder(tmp_path, muse_rows(), "parquet"))
    rows = muse_rows()
    for data in (a, b):
        assert isinstance(data, MuseData)
        assert data.raw["forget"] == [r["text"] for r in rows["raw"]["forget"]]
        assert data.knowmem == rows["knowmem"] and data.verbmem == rows["verbmem"]
        assert data.privleak["holdout"] == [r["text"] for r in rows["privleak"]["holdout"]]
        assert sorted(data.scal) == ["forget_1", "forget_2"] and data.sust == {}
    assert b.files["knowmem/forget_qa"] == [str(tmp_path / "knowmem" / "forget_qa-00000-of-00001.parquet")]
    for f in ("raw", "knowmem", "verbmem", "privleak", "scal", "sust"):
        assert getattr(a, f) == getattr(b, f)


def test_parquet_shards_read_in_order(tmp_path):
    rows = muse_rows()
    write_folder(tmp_path, rows, "parquet")
    docs = rows["privleak"]["forget"]
    (tmp_path / "privleak" / "forget-00000-of-00001.parquet").unlink()
    pq.write_table(pa.Table.from_pylist(docs[:2]), tmp_path / "privleak" / "forget-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(docs[2:]), tmp_path / "privleak" / "forget-00001-of-00002.parquet")
    assert load_muse(tmp_path).privleak["forget"] == [d["text"] for d in docs]


def _broken(tmp_path, edit):
    rows = muse_rows()
    write_folder(tmp_path, rows)
    edit(tmp_path, rows)
    return tmp_path


@pytest.mark.parametrize("case,match", [
    ("missing", r"lacks knowmem/retain_qa_icl: expected .*retain_qa_icl-00000-of-00001.parquet"),
    ("bad_json", r"verbmem/forget.jsonl:2: not a JSON record"),
    ("no_field", r"knowmem/forget_qa.jsonl: row 1 has no 'answer' field"),
    ("not_string", r"raw/forget.jsonl: row 0 has 'text' = 5, not a string"),
    ("not_object", r"privleak/holdout.jsonl: row 0 is a list"),
    ("empty", r"privleak/forget.jsonl has no row"),
    ("both", r"privleak/forget is given twice"),
    ("bad_parquet", r"raw/retain1-00000-of-00001.parquet is not a readable parquet file"),
])
def test_bad_folders(tmp_path, case, match):
    def edit(root, rows):
        if case == "missing":
            (root / "knowmem" / "retain_qa_icl.jsonl").unlink()
        elif case == "bad_json":
            (root / "verbmem" / "forget.jsonl").write_text('{"prompt": "a", "gt": "b"}\n{"prompt": \n')
        elif case == "no_field":
            (root / "knowmem" / "forget_qa.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
        elif case == "not_string":
            (root / "raw" / "forget.jsonl").write_text('{"text": 5}\n')
        elif case == "not_object":
            (root / "privleak" / "holdout.jsonl").write_text('["a text"]\n')
        elif case == "empty":
            (root / "privleak" / "forget.jsonl").write_text("\n")
        elif case == "both":
            pq.write_table(pa.Table.from_pylist(rows["privleak"]["forget"]),
                           root / "privleak" / "forget-00000-of-00001.parquet")
        elif case == "bad_parquet":
            (root / "raw" / "retain1.jsonl").unlink()
            (root / "raw" / "retain1-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_muse(_broken(tmp_path, edit))


def test_tofu_folder_and_no_folder(tmp_path):
    (tmp_path / "forget10.json").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "retain90.json").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match="is a TOFU folder.*--benchmark tofu"):
        load_muse(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_muse(tmp_path / "nowhere")


def test_optional_splits_may_be_absent(tmp_path):
    rows = muse_rows()
    for subset, (_, optional, _) in LAYOUT.items():
        for s in optional:
            rows.get(subset, {}).pop(s, None)
    data = load_muse(write_folder(tmp_path, rows))
    assert "retain2" not in data.raw and "retain" not in data.privleak and data.scal == {}


# ---- MUSE's definitions, written out ------------------------------------------------------------

def test_rouge_and_prompt_on_fixed_strings():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/5, R = 5/6, F1 = 10/11
    assert rouge_l_f1(["the cat sat on the mat"], ["the cat on the mat"]) == [pytest.approx(10 / 11, rel=1e-12)]
    # no stemming (MUSE's use_stemmer=False): "cats" and "cat" differ; case and punctuation are ignored
    assert rouge_l_f1(["Cats run."], ["cat run"]) == [pytest.approx(0.5, rel=1e-12)]
    assert rouge_l_f1(["a b"], [""]) == [0.0]
    assert knowmem_prompt("Q3?", [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]) == \
        "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    assert knowmem_prompt("Q?", []) == "Question: Q?\nAnswer: "
    assert cut_answer("Paris\n\nQuestion: where?") == "Paris"
    assert cut_answer("Paris, France\nQuestion: x") == "Paris, France"
    assert cut_answer("in Rome Question: and") == "in Rome "
    assert cut_answer("no stop here\n") == "no stop here\n"


def bos_tokenizer(texts):
    """A word-level tokenizer that, like Llama's, puts BOS first with add_special_tokens=True."""
    tok = tiny_tokenizer(texts)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A",
                                                              special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def test_truncate_gt_counts_bos():
    tok = bos_tokenizer(["one two three four five"])
    assert truncate_gt(tok, "one two three four five", 3) == "one two"  # BOS is one of MUSE's 3 ids
    assert truncate_gt(tiny_tokenizer(["one two three four five"]), "one two three four five", 3) == "one two three"


def ref_generate(model, tok, prompt, max_new_tokens):
    """MUSE's generation: one prompt, special tokens added, greedy, decoded with its settings."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]


MUSE_SCORER = rouge_scorer.RougeScorer(rouge_types=["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)


def ref_verbmem(model, tok, rows, n=128):
    vals = []
    for r in rows:
        gt_ids = tok(r["gt"], return_tensors="pt", add_special_tokens=True).input_ids[:, :n]
        gt = tok.batch_decode(gt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)[0]
        vals.append(MUSE_SCORER.score(gt, ref_generate(model, tok, r["prompt"], n))["rougeL"].fmeasure)
    return sum(vals) / len(vals) * 100


def ref_knowmem(model, tok, qa, icl, n=32):
    general = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in icl)
    vals = []
    for r in qa:
        out = ref_generate(model, tok, general + f"Question: {r['question']}\nAnswer: ", n)
        for w in ["\n\n", "\nQuestion", "Question:"]:
            out = out.split(w)[0]
        vals.append(MUSE_SCORER.score(r["answer"], out)["rougeL"].fmeasure)
    return sum(vals) / len(vals) * 100


def ref_min_k_scores(model, tok, texts, ratio=0.4):
    scores = []
    for text in texts:
        ids = torch.tensor(tok.encode(text)).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids, labels=ids).logits
        lp = torch.log_softmax(logits, dim=-1)
        all_prob = [lp[0, i, t].item() for i, t in enumerate(ids[0][1:])]
        scores.append(float(-np.mean(np.sort(all_prob)[: int(len(all_prob) * ratio)])))
    return scores


def ref_auc(model, tok, forget, holdout):
    """MUSE's forget_holdout_Min-40%: forget labelled 0, holdout 1, roc_curve on −score."""
    ppl = np.array(ref_min_k_scores(model, tok, forget) + ref_min_k_scores(model, tok, holdout))
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = roc_curve(y, -ppl)
    return sk_auc(fpr, tpr)


@pytest.fixture(scope="module")
def models(folder):
    data = load_muse(folder)
    texts = [t for s in (data.raw, data.privleak) for v in s.values() for t in v]
    texts += [r[f] for v in data.knowmem.values() for r in v for f in ("question", "answer")]
    texts += [knowmem_prompt("", [])]
    tok = bos_tokenizer(texts)
    target = tiny_llama(len(tok), hidden_size=32, layers=2, heads=2, seed=0, tokenizer=tok).double()
    plain = Template("plain", "", "", " ")  # the word-level tokenizer needs a space between prompt and answer
    forget_qa = [{"question": knowmem_prompt(r["question"], data.knowmem["forget_qa_icl"]), "answer": r["answer"]}
                 for r in data.knowmem["forget_qa"]]
    forget_text = [{"question": "", "answer": t} for t in data.privleak["forget"]]
    verbatim = [{"question": r["prompt"], "answer": r["gt"]} for r in data.verbmem["forget"]]
    memorise(target, tok, plain, verbatim + forget_qa + forget_text, steps=22, lr=1e-2, max_length=200)
    retrained = tiny_llama(len(tok), hidden_size=32, layers=2, heads=2, seed=4, tokenizer=tok).double()
    memorise(retrained, tok, plain, [{"question": "", "answer": t} for t in data.raw["retain1"]], steps=30,
             max_length=200)
    return data, tok, target, retrained


def test_metrics_match_muse_reference(models):
    data, tok, target, retrained = models
    out = evaluate_muse(target, tok, data, retain_model=retrained, batch_size=3, return_logs=True)
    assert set(MUSE_METRICS) <= set(out)
    assert out["verbmem_f"] == pytest.approx(ref_verbmem(target, tok, data.verbmem["forget"]), abs=1e-9)
    assert out["knowmem_f"] == pytest.approx(
        ref_knowmem(target, tok, data.knowmem["forget_qa"], data.knowmem["forget_qa_icl"]), abs=1e-9)
    assert out["knowmem_r"] == pytest.approx(
        ref_knowmem(target, tok, data.knowmem["retain_qa"], data.knowmem["retain_qa_icl"]), abs=1e-9)
    assert out["verbmem_f"] > 50 and out["knowmem_f"] > 50  # the target memorised its forget set
    auc = ref_auc(target, tok, data.privleak["forget"], data.privleak["holdout"])
    ref = ref_auc(retrained, tok, data.privleak["forget"], data.privleak["holdout"])
    assert out["privleak_auc"] == pytest.approx(auc, abs=1e-12)
    assert out["privleak_reference_auc"] == pytest.approx(ref, abs=1e-12)
    assert out["privleak"] == pytest.approx((auc - ref) / ref * 100, abs=1e-6)  # MUSE's eval.py
    assert out["privleak_reference"] == "retain model"
    assert out["privleak_auc"] < 0.2  # forget texts look like members
    f_scores = ref_min_k_scores(target, tok, data.privleak["forget"])
    np.testing.assert_allclose(out["logs"]["privleak"]["forget_scores"], f_scores, rtol=1e-9)
    assert [r["rougeL"] for r in out["logs"]["verbmem_f"]] and len(out["logs"]["knowmem_r"]) == 3


def test_privleak_without_retain_model_and_max_rows(models):
    data, tok, target, _ = models
    out = evaluate_muse(target, tok, data, metrics=["privleak"], max_rows=3)
    auc = ref_auc(target, tok, data.privleak["forget"][:3], data.privleak["holdout"][:3])
    assert out["privleak_reference"] == "0.5 (no retain model)" and out["privleak_reference_auc"] == 0.5
    assert out["privleak"] == pytest.approx((auc - 0.5) / 0.5 * 100, abs=1e-6)
    assert set(out) == {"privleak", "privleak_auc", "privleak_reference_auc", "privleak_reference"}
    given = evaluate_muse(target, tok, data, metrics=["privleak"], reference_auc=0.4772)
    assert given["privleak_reference"] == "given reference AUC 0.4772"
    assert given["privleak"] == pytest.approx((given["privleak_auc"] - 0.4772) / 0.4772 * 100, abs=1e-6)


def test_min_k_muse():
    assert min_k_muse(np.array([-1.0, -5.0, -2.0, -0.5, -3.0]), 0.4) == pytest.approx(4.0)  # int(5·0.4) = 2


def test_bad_arguments(models):
    data, tok, target, retrained = models
    with pytest.raises(ValueError, match="unknown MUSE metric"):
        evaluate_muse(target, tok, data, metrics=["rouge"])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_muse(target, tok, data, batch_size=0)
    with pytest.raises(ValueError, match="max_rows"):
        evaluate_muse(target, tok, data, max_rows=0)
    with pytest.raises(ValueError, match="reference_auc"):
        evaluate_muse(target, tok, data, reference_auc=1.5)
    with pytest.raises(ValueError, match="not both"):
        evaluate_muse(target, tok, data, retain_model=retrained, reference_auc=0.5)
    with pytest.raises(TypeError, match="MuseData"):
        evaluate_muse(target, tok, {"raw": {}})
    short = MuseData(root=data.root, raw=data.raw, knowmem=data.knowmem, verbmem=data.verbmem,
                     privleak={"forget": ["Arno"], "holdout": data.privleak["holdout"]})
    with pytest.raises(ValueError, match="forget: text 0 has 2 token"):
        evaluate_muse(target, tok, short, metrics=["privleak"])
    with pytest.raises(ValueError, match="lacks knowmem/retain_qa_icl, needed"):
        lacking = MuseData(root=data.root, raw=data.raw, knowmem={"retain_qa": []}, verbmem=data.verbmem,
                           privleak=data.privleak)
        evaluate_muse(target, tok, lacking, metrics=["verbmem_f", "knowmem_r"])
    with pytest.raises(ValueError, match="more than the model's 8 positions: cut the texts with privleak_max_length"):
        evaluate_muse(tiny_llama(len(tok), hidden_size=16, layers=1, heads=2, max_positions=8, tokenizer=tok), tok,
                      data, metrics=["privleak"])
    cut = evaluate_muse(target, tok, data, metrics=["privleak"], privleak_max_length=12, return_logs=True)
    short_scores = ref_min_k_scores(target, tok, [" ".join(t.split()[:11]) for t in data.privleak["forget"]])
    np.testing.assert_allclose(cut["logs"]["privleak"]["forget_scores"], short_scores, rtol=1e-9)
    other = tiny_llama(len(tok) + 3, hidden_size=16, layers=1, heads=2, tokenizer=tok)
    with pytest.raises(ValueError, match="same tokenizer"):
        evaluate_muse(target, tok, data, retain_model=other)
