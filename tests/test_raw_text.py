"""Raw-text windows (fastgeffect.data.raw_text): every token labelled exactly once, stride respected,
QADataset's item format, and the objectives / G-effects on raw-text batches."""
import copy
import math

import pytest
import torch
from helpers.toy_qa import tiny_llama, tiny_tokenizer
from torch.utils.data import DataLoader

import fastgeffect.losses as L
from fastgeffect.data.collate import collate_pairs, collate_qa
from fastgeffect.data.pairs import ForgetRetainDataset
from fastgeffect.data.qa import QADataset
from fastgeffect.data.raw_text import TextWindowDataset, chunk_windows
from fastgeffect.data.templates import get_template
from fastgeffect.geffect import GEffect
from fastgeffect.geffect.risk import fixed_forget_items, nll_risk, nll_risk_on
from fastgeffect.objectives import get_objective
from fastgeffect.reference import ReferenceModel, RefLogprobCache

DOCS = [
    "the mayor of Varnholt opened the new bridge on Monday , and the river council cheered .",
    "Ilse Brandt won the Oderfeld chess open .",
    "a storm hit Kessel harbour ; three boats sank , no one was hurt , and the port reopened on Friday "
    "after divers cleared the channel of the wrecks .",
    "short note .",
]
RETAIN = ["the museum of Tarrow shows old maps of the coast .", "Pell Ostrova teaches music in Brindle ."]


def _tok():
    return tiny_tokenizer(DOCS + RETAIN + ["Question : Answer :"])


def check_windows(n, max_length, stride):
    ids = list(range(100, 100 + n))
    wins = chunk_windows(ids, max_length, stride)
    labelled = []
    for k, w in enumerate(wins):
        start = k * stride
        assert 1 <= len(w["input_ids"]) <= max_length
        assert w["input_ids"] == ids[start:start + len(w["input_ids"])]  # windows start `stride` apart
        assert len(w["labels"]) == len(w["input_ids"])
        lab = [(start + j, t) for j, t in enumerate(w["labels"]) if t != -100]
        assert lab, "a window without a new token"
        first = lab[0][0] - start
        assert all(t == -100 for t in w["labels"][:first])  # the overlap is context, then labels to the end
        assert [t for _, t in lab] == w["input_ids"][first:]
        labelled += lab
        if k < len(wins) - 1:
            assert len(w["input_ids"]) == max_length  # only the tail window may be short
    assert [p for p, _ in labelled] == list(range(n))  # no token lost, none labelled twice, in order
    assert [t for _, t in labelled] == ids
    if n:
        assert len(w["input_ids"]) == n - (len(wins) - 1) * stride and start + len(w["input_ids"]) == n
    return wins


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 8])
def test_chunk_windows_every_token_once(max_length):
    for stride in range(1, max_length + 1):
        for n in range(0, 3 * max_length + 4):
            check_windows(n, max_length, stride)


def test_chunk_windows_cases():
    assert chunk_windows([], 4, 2) == []
    assert chunk_windows([7, 8], 4, 2) == [{"input_ids": [7, 8], "labels": [7, 8]}]  # shorter than a window
    # stride == max_length: disjoint windows, all labelled; the tail kept
    assert chunk_windows(list(range(7)), 3, 3) == [
        {"input_ids": [0, 1, 2], "labels": [0, 1, 2]}, {"input_ids": [3, 4, 5], "labels": [3, 4, 5]},
        {"input_ids": [6], "labels": [6]}]
    # overlap: the first max_length - stride tokens of a later window are context
    assert chunk_windows(list(range(6)), 4, 2) == [
        {"input_ids": [0, 1, 2, 3], "labels": [0, 1, 2, 3]}, {"input_ids": [2, 3, 4, 5], "labels": [-100, -100, 4, 5]}]
    # the tail window starts `stride` after the previous one, not at n - max_length
    assert chunk_windows(list(range(7)), 4, 3)[-1] == {"input_ids": [3, 4, 5, 6], "labels": [-100, 4, 5, 6]}


@pytest.mark.parametrize("args", [(0, 1), (3, 0), (3, 4), (2.0, 1), (True, 1)])
def test_chunk_windows_bad_args(args):
    with pytest.raises(ValueError, match="max_length|stride"):
        chunk_windows([1, 2, 3], *args)


def _labelled_per_doc(ds):
    """Per document, the (input position, label) pairs a shifted loss scores, in window order."""
    out = {}
    for i in range(len(ds)):
        it = ds[i]
        y = it["labels"]
        pos = (y != -100).nonzero(as_tuple=True)[0].tolist()
        assert 0 not in pos  # position 0 is never scored by a causal LM: never labelled
        out.setdefault(ds.doc_of[i], []).extend(int(y[p]) for p in pos)
    return out


@pytest.mark.parametrize("max_length,stride", [(6, 5), (6, 2), (6, None), (9, 3), (40, None)])
def test_dataset_with_bos_labels_every_token_once(max_length, stride):
    tok = _tok()
    ds = TextWindowDataset(DOCS, tok, max_length, stride)
    assert ds.add_bos
    per_doc = _labelled_per_doc(ds)
    assert sorted(per_doc) == list(range(len(DOCS)))
    for d, text in enumerate(DOCS):
        assert per_doc[d] == tok(text, add_special_tokens=False)["input_ids"]  # each token once, in order
    for i in range(len(ds)):
        it = ds[i]
        assert int(it["input_ids"][0]) == tok.bos_token_id and int(it["labels"][0]) == -100
        n = int(it["attention_mask"].sum())
        assert bool((it["attention_mask"][:n] == 1).all()) and bool((it["labels"][n:] == -100).all())
        # the window's text tokens come from its own document only (documents never merged)
        doc_ids = tok(DOCS[ds.doc_of[i]], add_special_tokens=False)["input_ids"]
        window = it["input_ids"][1:n].tolist()
        assert any(doc_ids[s:s + len(window)] == window for s in range(len(doc_ids)))
    if stride is None:  # default: no overlap, every window but a document's last full
        assert ds.stride == max_length - 1


def test_dataset_without_bos():
    tok = _tok()
    ds = TextWindowDataset(DOCS, tok, 6, 4, add_bos=False)
    per_doc = _labelled_per_doc(ds)
    for d, text in enumerate(DOCS):
        assert per_doc[d] == tok(text, add_special_tokens=False)["input_ids"][1:]  # the first has no context
    with pytest.raises(ValueError, match="without a BOS token, stride"):
        TextWindowDataset(DOCS, tok, 6, 6, add_bos=False)


def test_items_are_qa_items():
    tok = _tok()
    ds = TextWindowDataset(DOCS, tok, 12, 8)
    qa = QADataset([{"question": "Question", "answer": "Answer"}], tok, get_template("phi"), 12)
    a, b = ds[1], qa[0]
    assert set(a) == set(b)
    for k in ("input_ids", "attention_mask", "labels"):
        assert a[k].dtype == b[k].dtype == torch.long and a[k].shape == b[k].shape == (12,)
    assert a["index"] == 1 and isinstance(a["index"], int)
    batch = collate_qa([ds[i] for i in range(len(ds))])
    assert batch["index"].tolist() == list(range(len(ds)))


@pytest.mark.parametrize("texts,match", [([], "no document"), ("a text", "one string"), (["ok .", None], "not strings"),
                                         (["ok .", ""], "document 1 has 0 token")])
def test_bad_texts(texts, match):
    with pytest.raises(ValueError, match=match):
        TextWindowDataset(texts, _tok(), 8)


def test_bad_window_args():
    tok = _tok()
    with pytest.raises(ValueError, match="no room"):
        TextWindowDataset(DOCS, tok, 1)
    with pytest.raises(ValueError, match="stride 9 is larger"):
        TextWindowDataset(DOCS, tok, 8, 9)
    with pytest.raises(ValueError, match="1 token"):
        TextWindowDataset(["word"], tok, 8, 4, add_bos=False)


# ---- objectives and G-effects on raw-text batches ------------------------------------------------

def _setup():
    tok = _tok()
    model = tiny_llama(len(tok), hidden_size=16, layers=2, heads=2, seed=1, tokenizer=tok).double()
    forget = TextWindowDataset(DOCS, tok, 10, 6)
    retain = TextWindowDataset(RETAIN, tok, 10, 6)
    batch = collate_pairs([ForgetRetainDataset(forget, retain, seed=0)[i] for i in range(4)])
    return tok, model, forget, batch


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _seq_logp(model, b):
    """Per row: the sum of the labelled tokens' log-probs, written out (labels shifted by hand)."""
    lp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1], -1)
    y = b["labels"][:, 1:]
    tok = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -100)
    return tok.sum(-1)


def test_hf_loss_matches_nll_on_windows():
    _, model, _, batch = _setup()
    f = batch["forget"]
    with torch.no_grad():  # Hugging Face's own shift of the labels; it computes its loss in fp32
        out = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"], labels=f["labels"])
        assert float(L.nll(out.logits, f["labels"])) == pytest.approx(float(out.loss), rel=1e-6)
        assert float(nll_risk(model, f)) == pytest.approx(float(L.nll(out.logits, f["labels"])), rel=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_ga_geffect_identity_on_raw_text(fused):
    _, model, _, batch = _setup()
    params = [p for p in model.parameters() if p.requires_grad]
    obj = get_objective("ga", regularizer="none", fused=fused)
    model.zero_grad(set_to_none=True)
    out = obj(model, batch)
    risk = float(nll_risk(model, batch["forget"]).detach())
    assert float(out.loss.detach()) == pytest.approx(-risk, rel=1e-10)  # GA = −R on the same windows
    out.loss.backward()
    res = GEffect(model).measure({"unlearn": lambda: nll_risk(model, batch["forget"])})["unlearn"]
    g = _flat_grad(nll_risk(model, batch["forget"]), params)
    norm2 = float((g * g).sum())
    assert res.total < 0
    assert res.total == pytest.approx(-norm2, rel=1e-9)  # GA's unlearning G-effect = −‖∇R‖²


@pytest.mark.parametrize("fused", [False, True])
def test_npo_gd_step_on_raw_text(fused):
    tok, model, forget, batch = _setup()
    params = [p for p in model.parameters() if p.requires_grad]
    beta, lam = 0.5, 0.7
    f, r = batch["forget"], batch["retain"]
    # the reference cache of the forget windows (by their index), θ_ref = θ: NPO's weights are all 1
    cache = RefLogprobCache.compute(copy.deepcopy(model), DataLoader(forget, batch_size=3, collate_fn=collate_qa))
    cached = get_objective("npo", regularizer="gd", lam=lam, beta=beta, ref_cache=cache, fused=fused)(model, batch)
    with torch.no_grad():  # the same reference in float64 (the cache keeps fp32), for exact comparisons
        f = {**f, "ref_logprobs": L.token_logprobs(model(input_ids=f["input_ids"],
                                                         attention_mask=f["attention_mask"]).logits, f["labels"])}
    obj = get_objective("npo", regularizer="gd", lam=lam, beta=beta, fused=fused)
    model.zero_grad(set_to_none=True)
    out = obj(model, {"forget": f, "retain": r})
    expected = 2.0 / beta * math.log(2.0) + lam * float(nll_risk(model, r).detach())
    assert float(out.loss) == pytest.approx(expected, rel=1e-10)
    assert float(cached.loss) == pytest.approx(expected, rel=1e-6)  # fp32 cache
    out.loss.backward()
    risks = {"unlearn": lambda: nll_risk(model, f), "retain": lambda: nll_risk(model, r)}
    res = GEffect(model).measure(risks)
    # at θ = θ_ref, ∇NPO = mean over rows of ∇ Σ_t log p(token t); ∇GD = ∇ token-mean retain NLL
    grad_obj = _flat_grad(_seq_logp(model, f).mean(), params) + lam * _flat_grad(nll_risk(model, r), params)
    for name, fn in risks.items():
        g = _flat_grad(fn(), params)
        expect = float((g * grad_obj).sum())
        scale = float(g.norm() * grad_obj.norm())  # the largest the dot product could be
        assert abs(res[name].total - expect) <= 1e-9 * scale, (name, res[name].total, expect)
    assert res["unlearn"].total < 0
    before = float(nll_risk(model, f).detach())
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert float(nll_risk(model, f).detach()) > before  # the step raised the forget risk, as its G-effect says


def test_ga_kl_on_retain_text_and_fixed_risk_rows():
    """KL on retain windows against θ_ref = θ is 0 with a zero gradient, so GA+KL's G-effect on
    raw-text risk rows (drawn by the loop's own fixed_forget_items) is −<∇R_rows, ∇R_batch>."""
    tok, model, forget, batch = _setup()
    params = [p for p in model.parameters() if p.requires_grad]
    obj = get_objective("ga", regularizer="kl", lam=2.0, reference=ReferenceModel(copy.deepcopy(model)))
    model.zero_grad(set_to_none=True)
    out = obj(model, batch)
    assert abs(float(out.reg_loss.detach())) <= 1e-12
    out.loss.backward()
    rows = fixed_forget_items(forget, seed=0, n=3)
    risk = nll_risk_on(model, rows, torch.device("cpu"))
    res = GEffect(model).measure({"unlearn": risk})["unlearn"]
    g_rows = _flat_grad(risk(), params)
    g_batch = _flat_grad(nll_risk(model, batch["forget"]), params)
    expect = -float((g_rows * g_batch).sum())
    assert abs(res.total - expect) <= 1e-9 * float(g_rows.norm() * g_batch.norm())


def test_rmu_on_raw_text_steers_each_labelled_position():
    """RMU (WMDP's objective) on raw-text windows: the mean over the windows' labelled positions
    (each text token once, BOS and overlap excluded) of mean_d (h_k − c·u)², written out."""
    _, model, _, batch = _setup()
    f = batch["forget"]
    out = get_objective("rmu", regularizer="none", rmu_layer=1, steering_coeff=4.0)(model, batch)
    with torch.no_grad():
        h = model(input_ids=f["input_ids"], attention_mask=f["attention_mask"],
                  output_hidden_states=True).hidden_states[2]
        c = 4.0 * torch.rand(h.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        per_pos = (h - c).pow(2).mean(-1)
        mask = f["labels"] != -100
        expect = float(per_pos[mask].sum() / mask.sum())
    assert float(out.loss.detach()) == pytest.approx(expect, rel=1e-12)
