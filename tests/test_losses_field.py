"""The field's newer objectives (open-unlearning's SatImp, UNDIAL, CE-U) against independent float64
loop references of their published formulas: values and logits gradients, masked tokens, odd shapes,
accumulation and per-sample parts; SatImp's fused path (torch and Triton) against the unfused one."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.devices import device_for, to_device
from transformers import LlamaConfig, LlamaForCausalLM

from fastgeffect import losses as L
from fastgeffect.kernels import fused_causal_lm_loss, fused_linear_token_weighted

SHAPES = [(3, 7, 13), (1, 2, 5), (4, 9, 31)]


def make(B, T, V, seed=0, masked=0.3, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < masked] = -100
    labels[:, 0] = -100
    labels[0, 1] = 2  # at least one predicted label
    ref_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * scale
    return logits, labels, ref_logits


def value_and_grad(fn, logits):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


# ---- independent loop references (one position at a time, float64) ---------------------------------


def satimp_loop(logits, labels, beta1, beta2):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            logp = torch.log_softmax(logits[b, t - 1], -1)[y]
            p = float(logp.detach().exp())
            total = total + p ** beta1 * (1.0 - p) ** beta2 * logp  # weight: a detached number
            n += 1
    return total / n


def undial_loop(logits, labels, ref_logits, beta):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            teacher = ref_logits[b, t - 1].detach().clone()
            teacher[y] -= beta
            q = torch.softmax(teacher, -1)
            total = total - (q * torch.log_softmax(logits[b, t - 1], -1)).sum()
            n += 1
    return total / n


def ceu_loop(logits, labels, n_first):
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        seen = 0  # answer labels met so far in this sequence, column 0 included
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            seen += 1
            if seen <= n_first or t == 0:
                continue
            target = logits[b, t - 1].detach().clone()
            target[y] = -math.inf
            q = torch.softmax(target, -1)
            logp = torch.log_softmax(logits[b, t - 1], -1)
            total = total - sum(q[v] * logp[v] for v in range(q.shape[0]) if v != y)
            n += 1
    return total / n


# ---- values and gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (0.7, 1.3), (2.0, 0.0)])
def test_satimp_matches_loop(B, T, V, beta1, beta2):
    logits, labels, _ = make(B, T, V, seed=B + T + V, scale=0.5)  # p^β1 not negligible
    got = value_and_grad(lambda x: L.satimp(x, labels, beta1, beta2), logits)
    want = value_and_grad(lambda x: satimp_loop(x, labels, beta1, beta2), logits)
    scale = max(abs(float(want[0])), 1e-12)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12 * scale)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12 * float(want[1].abs().max()))


def test_satimp_defaults_and_weights():
    logits, labels, _ = make(3, 7, 13, scale=0.5)
    torch.testing.assert_close(L.satimp(logits, labels), L.satimp(logits, labels, 5.0, 1.0))
    _, d = L.satimp(logits, labels, return_details=True)
    lp = L.token_logprobs(logits, labels)
    want = torch.where(d["mask"], lp.exp() ** 5 * (1 - lp.exp()), torch.zeros_like(lp))
    torch.testing.assert_close(d["weights"], want)
    torch.testing.assert_close(L.satimp_weights(lp, 5.0, 1.0)[d["mask"]], want[d["mask"]])
    # β2 = 0 is WGA with α = β1; a saturated token (p = 1) weighs 0 when β2 > 0
    torch.testing.assert_close(L.satimp(logits, labels, 3.0, 0.0), L.wga(logits, labels, 3.0))
    assert float(L.satimp_weights(torch.zeros(2), 5.0, 1.0).abs().max()) == 0.0
    with pytest.raises(ValueError, match="beta2 must be a finite number >= 0"):
        L.satimp(logits, labels, 5.0, -1.0)
    with pytest.raises(ValueError, match="beta1 must be a finite number >= 0"):
        L.satimp(logits, labels, float("nan"), 1.0)


@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("beta", [10.0, 1.0, 0.0])
def test_undial_matches_loop(B, T, V, beta):
    logits, labels, ref_logits = make(B, T, V, seed=B * T + V)
    got = value_and_grad(lambda x: L.undial(x, labels, ref_logits, beta), logits)
    want = value_and_grad(lambda x: undial_loop(x, labels, ref_logits, beta), logits)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)


def test_undial_equals_open_unlearning_where_every_label_is_valid():
    """open-unlearning's computation as it is written (an unmasked scatter, the mean over every
    position): the same value when every shifted label is valid."""
    logits, _, ref_logits = make(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    labels[:, 0] = -100  # column 0 is never predicted: open-unlearning never reads it either
    beta = 10.0
    shift_labels, shift_logits, teacher = labels[:, 1:], logits[:, :-1], ref_logits[:, :-1]
    onehot = torch.zeros_like(teacher)
    onehot[torch.arange(2).view(-1, 1, 1), torch.arange(5).view(1, -1, 1), shift_labels.unsqueeze(-1)] = 1.0
    soft = F.softmax(teacher - onehot * beta, dim=-1)
    theirs = F.cross_entropy(shift_logits.reshape(-1, 11), soft.reshape(-1, 11), reduction="none").mean()
    torch.testing.assert_close(L.undial(logits, labels, ref_logits, beta), theirs, rtol=1e-12, atol=1e-12)


def test_undial_checks_its_inputs():
    logits, labels, ref_logits = make(2, 5, 7)
    with pytest.raises(ValueError, match="ref_logits shape"):
        L.undial(logits, labels, ref_logits[:, :-1])
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        L.undial(logits, labels, ref_logits, -1.0)
    bad = ref_logits.clone()
    bad[0, 0, 0] = float("nan")  # position 0 predicts labels[0, 1], a valid label
    with pytest.raises(FloatingPointError, match="UNDIAL cross-entropy"):
        L.undial(logits, labels, bad)
    with pytest.raises(L.AllMaskedError):
        L.undial(logits, torch.full_like(labels, -100), ref_logits)


@pytest.mark.parametrize("B,T,V", SHAPES)
@pytest.mark.parametrize("n", [1, 0, 2])
def test_ceu_matches_loop(B, T, V, n):
    logits, labels, _ = make(B, T, V, seed=3 * B + T + V, masked=0.2)
    if (L.valid_mask(L.drop_first_answer_tokens(labels, n))).sum() == 0:  # (1, 2, 5): one label only
        with pytest.raises(L.AllMaskedError, match="no answer token is left"):
            L.ceu(logits, labels, n)
        return
    got = value_and_grad(lambda x: L.ceu(x, labels, n), logits)
    want = value_and_grad(lambda x: ceu_loop(x, labels, n), logits)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)


def test_ceu_drops_the_first_answer_tokens_of_each_sequence():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 4, -100, 8, 9], [3, 1, 2, -100, -100]])
    assert L.drop_first_answer_tokens(labels, 1).tolist() == [[-100, -100, -100, 6, 7], [-100, -100, -100, 8, 9],
                                                              [-100, 1, 2, -100, -100]]
    assert L.drop_first_answer_tokens(labels, 0).tolist() == labels.tolist()
    logits, _, _ = make(3, 5, 11)
    # a label in column 0 counts among the first n, as open-unlearning's cumulative sum has it
    got = value_and_grad(lambda x: L.ceu(x, labels, 1), logits)
    want = value_and_grad(lambda x: ceu_loop(x, labels, 1), logits)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-13)
    with pytest.raises(L.AllMaskedError, match="no answer token is left after dropping the first 3"):
        L.ceu(logits, labels, 3)
    with pytest.raises(ValueError, match="integer >= 0"):
        L.ceu(logits, labels, -1)


def test_ceu_target_never_holds_the_true_token():
    """The gradient of CE-U is p − q with q(y) = 0: it pushes the true token's logit up by p(y)
    only through the normalisation, never towards q."""
    logits, labels, _ = make(2, 6, 9)
    _, g = value_and_grad(lambda x: L.ceu(x, labels, 0), logits)
    mask = L.valid_mask(labels)
    n = int(mask.sum())
    p = torch.softmax(logits[:, :-1], -1)
    rows = mask[:, 1:]
    y = labels[:, 1:][rows]
    q = torch.softmax(logits[:, :-1][rows].scatter(-1, y[:, None], -math.inf), -1)
    torch.testing.assert_close(g[:, :-1][rows], (p[rows] - q) / n, rtol=1e-10, atol=1e-13)


# ---- accumulation and per-sample parts --------------------------------------------------------------


def _fns(ref_logits):
    return {"satimp": lambda x, y, **k: L.satimp(x, y, **k),
            "undial": lambda x, y, sl=slice(None), **k: L.undial(x, y, ref_logits[sl], **k),
            "ceu": lambda x, y, **k: L.ceu(x, y, 1, **k)}


@pytest.mark.parametrize("name", ["satimp", "undial", "ceu"])
def test_accumulation_and_per_sample(name):
    logits, labels, ref_logits = make(4, 8, 13, seed=7, masked=0.1, scale=0.5)
    fn = _fns(ref_logits)[name]
    whole = fn(logits, labels)
    counted = L.drop_first_answer_tokens(labels, 1) if name == "ceu" else labels
    n = L.valid_mask(counted).sum()
    halves = []
    for sl in (slice(0, 1), slice(1, 4)):
        kw = {"sl": sl} if name == "undial" else {}
        halves.append(fn(logits[sl], labels[sl], num_items_in_batch=n, **kw))
    torch.testing.assert_close(sum(halves), whole, rtol=1e-12, atol=1e-14)
    parts = fn(logits, labels, per_sample=True)
    assert parts.shape == (4,)
    torch.testing.assert_close(parts.sum(), whole, rtol=1e-12, atol=1e-14)


# ---- SatImp's fused path -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta1,beta2", [(5.0, 1.0), (0.7, 1.3), (2.0, 0.0)])
def test_satimp_fused_linear_matches_unfused(backend, beta1, beta2):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(11)
    N, H, V = 29, 16, 97
    hidden = torch.randn(N, H, generator=gen) * 0.3
    weight = torch.randn(V, H, generator=gen) / 4
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.3] = -100
    labels[0] = 3
    labels[1] = 5
    weight[5] += hidden[1] * 40  # a saturated row: p ≈ 1, where the importance factor vanishes
    h, w, y = to_device(dev, hidden, weight, labels)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_token_weighted(h, w, y, objective="satimp", beta1=beta1, beta2=beta2, backend=backend,
                                     chunk_size=8)
    loss.backward()
    # unfused, in float64: the loss of fastgeffect.losses on materialised logits (one "sequence")
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    # row i predicts labels[i]: as logits (1, N + 1, V) with labels aligned one column later
    logits = torch.cat([h64 @ w64.t(), torch.zeros(1, V, dtype=torch.float64)])[None]
    aligned = torch.cat([torch.tensor([-100]), labels])[None]
    want = L.satimp(logits, aligned, beta1, beta2)
    want.backward()
    torch.testing.assert_close(loss.detach().double().cpu(), want.detach(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_satimp_fused_causal_lm_matches_unfused(backend):
    dev = device_for(backend)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().to(dev)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 53, (3, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, -2:] = -100
    ids, labels = to_device(dev, ids, labels)
    kw = {"beta1": 0.5, "beta2": 2.0}
    loss = fused_causal_lm_loss(model, ids, None, labels, objective="satimp", backend=backend, chunk_size=8, **kw)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = L.satimp(model(input_ids=ids).logits, labels, **kw)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
