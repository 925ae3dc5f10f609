"""Every loss of fastgeffect.losses against an independent float64 reference written plainly here,
plus the identities of docs/design.md §3 and the bad-input contract."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgeffect.losses as L

B, T, V = 3, 11, 37  # odd sizes on purpose


def make_batch(seed=0, b=B, t=T, v=V, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :4] = -100  # a question prefix
    labels[1, :2] = -100
    labels[1, -3:] = -100  # right padding
    labels[2, 5] = -100  # a hole in the middle
    ref = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 5)
    return logits, labels, ref


def ref_token_logp(logits, labels):
    """Loop over positions: log p(labels[b, t] | :t) from logits[b, t-1], None where ignored."""
    lp = torch.log_softmax(logits.double(), -1)
    out = {}
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            y = int(labels[b, t])
            if y != -100:
                out[(b, t)] = lp[b, t - 1, y]
    return out


def ref_weighted(logits, labels, weight_fn):
    tok = ref_token_logp(logits, labels)
    total = sum(weight_fn(key, lp.detach()) * lp for key, lp in tok.items())
    return total / len(tok)


def grads(loss, x):
    return torch.autograd.grad(loss, x)[0]


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def test_token_logprobs_alignment():
    logits, labels, _ = make_batch()
    tok = L.token_logprobs(logits, labels)
    ref = ref_token_logp(logits, labels)
    mask = L.valid_mask(labels)
    assert mask.sum() == len(ref)
    for (b, t), v in ref.items():
        assert_close(tok[b, t], v)
    assert (tok[~mask] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.7, 5.0])
def test_ga_wga_against_reference(alpha):
    logits, labels, _ = make_batch(1)
    out = L.wga(logits, labels, alpha=alpha)
    ref = ref_weighted(logits, labels, lambda k, lp: math.exp(alpha * float(lp)))
    assert_close(out, ref)
    assert_close(grads(out, logits), grads(ref, logits))
    assert_close(L.ga(logits, labels), ref_weighted(logits, labels, lambda k, lp: 1.0))


def test_nll_and_gd_are_minus_ga():
    logits, labels, _ = make_batch(2)
    assert_close(L.nll(logits, labels), -L.ga(logits, labels))
    assert_close(L.gd(logits, labels), -L.ga(logits, labels))
    assert_close(L.po(logits, labels), -L.ga(logits, labels))


@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_tnpo_against_reference(beta):
    logits, labels, ref = make_batch(3)
    out = L.tnpo(logits, labels, ref, beta=beta)
    expect = ref_weighted(logits, labels, lambda k, lp: 2 * math.exp(beta * float(lp)) / (
        math.exp(beta * float(lp)) + math.exp(beta * float(ref[k]))))
    assert_close(out, expect)
    assert_close(grads(out, logits), grads(expect, logits))


@pytest.mark.parametrize("alpha,beta", [(1.5, 4.0), (0.3, 1.0)])
def test_wtnpo_eq16_and_product_against_reference(alpha, beta):
    logits, labels, ref = make_batch(4)

    def eq16(k, lp):
        a = math.exp((beta + alpha) * float(lp))
        return 2 * a / (a + math.exp(beta * float(ref[k])))

    def product(k, lp):
        p, pr = math.exp(beta * float(lp)), math.exp(beta * float(ref[k]))
        return 2 * p / (p + pr) * math.exp(alpha * float(lp))

    for form, fn in (("eq16", eq16), ("product", product)):
        out = L.wtnpo(logits, labels, ref, alpha=alpha, beta=beta, wtnpo_form=form)
        expect = ref_weighted(logits, labels, fn)
        assert_close(out, expect)
        assert_close(grads(out, logits), grads(expect, logits))


def seq_sums(logits, labels, ref=None):
    tok = ref_token_logp(logits, labels)
    sums = [0.0] * labels.shape[0]
    rsums = [0.0] * labels.shape[0]
    counts = [0] * labels.shape[0]
    for (b, t), lp in tok.items():
        sums[b] = sums[b] + lp
        counts[b] += 1
        if ref is not None:
            rsums[b] += float(ref[b, t])
    return sums, rsums, counts


def logsig(x):
    return -torch.nn.functional.softplus(-x)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_npo_against_reference(beta):
    logits, labels, ref = make_batch(5)
    s, r, _ = seq_sums(logits, labels, ref)
    expect = sum(-(2 / beta) * logsig(beta * (r[b] - s[b])) for b in range(B)) / B
    out = L.npo(logits, labels, ref, beta=beta)
    assert_close(out, expect)
    assert_close(grads(out, logits), grads(expect, logits))


def test_simnpo_against_reference():
    beta, delta = 4.5, 0.3
    logits, labels, _ = make_batch(6)
    s, _, n = seq_sums(logits, labels)
    expect = sum(-(2 / beta) * logsig(beta * (-s[b] / n[b] - delta)) for b in range(B)) / B
    out = L.simnpo(logits, labels, beta=beta, delta=delta)
    assert_close(out, expect)
    assert_close(grads(out, logits), grads(expect, logits))


def test_dpo_against_reference():
    beta = 0.1
    wl, wlab, wref = make_batch(7)
    ll, llab, lref = make_batch(8)
    sw, rw, _ = seq_sums(wl, wlab, wref)
    sl, rl, _ = seq_sums(ll, llab, lref)
    expect = sum(-(2 / beta) * logsig(beta * ((sw[b] - rw[b]) - (sl[b] - rl[b]))) for b in range(B)) / B
    out = L.dpo(wl, wlab, wref, ll, llab, lref, beta=beta)
    assert_close(out, expect)
    assert_close(grads(out, ll), grads(expect, ll))


def test_npo_without_win_is_dpo_limit():
    # NPO = DPO with no win term: -(2/β) logσ(-β(logp - logp_ref)).
    logits, labels, ref = make_batch(9)
    s, r, _ = seq_sums(logits, labels, ref)
    expect = sum(-(2 / 0.5) * logsig(-0.5 * (s[b] - r[b])) for b in range(B)) / B
    assert_close(L.npo(logits, labels, ref, beta=0.5), expect)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_against_reference(direction):
    logits, labels, _ = make_batch(10)
    ref_logits = torch.randn_like(logits.detach())
    p_cur = torch.softmax(logits, -1)
    p_ref = torch.softmax(ref_logits, -1)

    def kl_rows(rows):
        vals = []
        for b, t in rows:
            a, q = (p_ref[b, t], p_cur[b, t]) if direction == "forward" else (p_cur[b, t], p_ref[b, t])
            vals.append((a * (a.log() - q.log())).sum())
        return sum(vals) / len(vals)

    all_rows = [(b, t) for b in range(B) for t in range(T)]
    out = L.kl(logits, ref_logits, labels, direction=direction, positions="all")
    expect = kl_rows(all_rows)
    assert_close(out, expect)
    assert_close(grads(out, logits), grads(expect, logits))
    answer_rows = [(b, t - 1) for b in range(B) for t in range(1, T) if labels[b, t] != -100]
    assert_close(L.kl(logits, ref_logits, labels, direction=direction, positions="answer"), kl_rows(answer_rows))


def test_kl_matches_tofu_batchmean():
    logits, _, _ = make_batch(11)
    ref_logits = torch.randn_like(logits.detach())
    tofu = torch.nn.functional.kl_div(torch.log_softmax(logits, -1).view(-1, V),
                                      torch.log_softmax(ref_logits, -1).view(-1, V),
                                      reduction="batchmean", log_target=True)
    assert_close(L.kl(logits, ref_logits), tofu)


def test_rmu_and_rr_against_reference():
    g = torch.Generator().manual_seed(12)
    h = torch.randn(B, T, 16, generator=g, dtype=torch.float64, requires_grad=True)
    h_ref = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (B, T), generator=g)
    labels[:, :3] = -100
    c = L.control_vector(16, 4.0, seed=3, dtype=torch.float64)
    pos = [(b, t) for b in range(B) for t in range(T) if labels[b, t] != -100]
    expect = sum(((h[b, t] - c) ** 2).mean() for b, t in pos) / len(pos)
    assert_close(L.rmu(h, labels, c), expect)
    expect_rr = sum(((h[b, t] - h_ref[b, t]) ** 2).mean() for b, t in pos) / len(pos)
    assert_close(L.rr(h, h_ref, labels), expect_rr)
    assert_close(grads(L.rr(h, h_ref, labels), h), grads(expect_rr, h))


def test_control_vector_is_seeded_uniform():
    a, b, c = L.control_vector(64, 2.0, seed=1), L.control_vector(64, 2.0, seed=1), L.control_vector(64, 2.0, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and (a < 2.0).all()
    torch.testing.assert_close(L.control_vector(64, 2.0, seed=1, normalize=True).norm(), torch.tensor(2.0))


# ---- identities -------------------------------------------------------------------------------

def test_identities():
    logits, labels, ref = make_batch(13)
    ga = L.ga(logits, labels)
    assert_close(L.wga(logits, labels, alpha=0.0), ga)
    cur = L.token_logprobs(logits, labels).detach()
    assert_close(L.tnpo(logits, labels, cur, beta=4.0), ga)
    for beta in (0.5, 4.0):
        t = L.tnpo(logits, labels, ref, beta=beta)
        assert_close(L.wtnpo(logits, labels, ref, alpha=0.0, beta=beta), t)
        assert_close(L.wtnpo(logits, labels, ref, alpha=0.0, beta=beta, wtnpo_form="product"), t)


def test_masked_positions_do_not_change_the_loss():
    logits, labels, ref = make_batch(14)
    mask = labels == -100
    noisy = logits.detach().clone()
    # change the logits of positions that predict an ignored label (position t-1 for label t)
    predicts_ignored = torch.zeros_like(mask)
    predicts_ignored[:, :-1] = mask[:, 1:]
    predicts_ignored[:, -1] = True  # the last position predicts nothing
    noisy[predicts_ignored] += 100 * torch.randn_like(noisy[predicts_ignored])
    ref_noisy = ref.clone()
    ref_noisy[mask] = float("nan")  # ignored reference values are never read
    for fn in (lambda lg, r: L.ga(lg, labels), lambda lg, r: L.wga(lg, labels),
               lambda lg, r: L.tnpo(lg, labels, r), lambda lg, r: L.wtnpo(lg, labels, r),
               lambda lg, r: L.npo(lg, labels, r), lambda lg, r: L.simnpo(lg, labels)):
        assert_close(fn(logits.detach(), ref), fn(noisy, ref_noisy))


@pytest.mark.parametrize("name", ["ga", "wga", "tnpo", "wtnpo", "nll"])
def test_gradient_accumulation_2x8_equals_16(name):
    logits, labels, ref = make_batch(15, b=16, t=9, v=13)
    fn = {"ga": lambda lg, lab, r, n: L.ga(lg, lab, num_items_in_batch=n),
          "wga": lambda lg, lab, r, n: L.wga(lg, lab, num_items_in_batch=n),
          "tnpo": lambda lg, lab, r, n: L.tnpo(lg, lab, r, num_items_in_batch=n),
          "wtnpo": lambda lg, lab, r, n: L.wtnpo(lg, lab, r, num_items_in_batch=n),
          "nll": lambda lg, lab, r, n: L.nll(lg, lab, num_items_in_batch=n)}[name]
    full = grads(fn(logits, labels, ref, None), logits)
    n = int(L.valid_mask(labels).sum())
    acc = torch.zeros_like(logits)
    for sl in (slice(0, 8), slice(8, 16)):
        acc += grads(fn(logits[sl], labels[sl], ref[sl], n), logits)
    assert_close(acc, full)


def test_sequence_loss_accumulation():
    logits, labels, ref = make_batch(16, b=6)
    full = grads(L.npo(logits, labels, ref), logits)
    acc = grads(L.npo(logits[:2], labels[:2], ref[:2], num_seqs_in_batch=6), logits) + \
        grads(L.npo(logits[2:], labels[2:], ref[2:], num_seqs_in_batch=6), logits)
    assert_close(acc, full)


def test_details_for_logging():
    logits, labels, ref = make_batch(17)
    loss, d = L.tnpo(logits, labels, ref, return_details=True)
    mask = L.valid_mask(labels)
    assert torch.equal(d["mask"], mask)
    assert (d["weights"][mask] > 0).all() and (d["weights"][~mask] == 0).all()
    assert_close(d["nll"], L.nll(logits, labels))
    _, dn = L.npo(logits, labels, ref, return_details=True)
    assert dn["seq_weights"].shape == (B,)


# ---- bad input and numerics ------------------------------------------------------------------

def test_all_masked_raises_named_error():
    logits, labels, ref = make_batch(18)
    labels[:] = -100
    for fn in (lambda: L.ga(logits, labels), lambda: L.tnpo(logits, labels, ref), lambda: L.npo(logits, labels, ref)):
        with pytest.raises(L.AllMaskedError, match="no (answer token|valid label)"):
            fn()


def test_shape_mismatches_are_named():
    logits, labels, ref = make_batch(19)
    with pytest.raises(ValueError, match="labels shape"):
        L.ga(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        L.tnpo(logits, labels, ref[:, :-2])
    with pytest.raises(ValueError, match=r"\(batch, seq, vocab\)"):
        L.ga(logits[0], labels)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        L.ga(logits, labels.masked_fill(labels == labels.max(), V + 3))


def test_non_finite_inputs_are_named():
    logits, labels, ref = make_batch(20)
    bad = logits.detach().clone()
    bad[0, 6, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="logits"):
        L.ga(bad, labels)
    r = ref.clone()
    r[0, 7] = float("inf")
    with pytest.raises(FloatingPointError, match="ref_logprobs"):
        L.tnpo(logits, labels, r)
    w = torch.ones(B, T, dtype=torch.float64)
    w[0, 7] = float("nan")  # caller-given weights: a NaN gave a NaN loss without an error
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        L.token_weighted("weighted", logits, labels, weights=w)


def test_unknown_wtnpo_form():
    logits, labels, ref = make_batch(21)
    with pytest.raises(ValueError, match="eq16, product"):
        L.wtnpo(logits, labels, ref, wtnpo_form="bogus")


def _every_loss(logits, labels, ref, **count):
    """(name, call) of every logits loss; ``count`` is passed as num_items/num_seqs_in_batch."""
    items = {"num_items_in_batch": count["n"]} if count else {}
    seqs = {"num_seqs_in_batch": count["n"]} if count else {}
    return [("ga", lambda: L.ga(logits, labels, **items)), ("nll", lambda: L.nll(logits, labels, **items)),
            ("tnpo", lambda: L.tnpo(logits, labels, ref, **items)), ("npo", lambda: L.npo(logits, labels, ref, **seqs)),
            ("simnpo", lambda: L.simnpo(logits, labels, **seqs)),
            ("dpo", lambda: L.dpo(logits, labels, ref, logits, labels, ref, **seqs)),
            ("kl", lambda: L.kl(logits, logits.detach() + 1, **items))]


@pytest.mark.parametrize("n", [0, -3, torch.tensor(0), torch.tensor(-3.0), float("nan")])
def test_counts_must_be_positive(n):
    # 0 divided by zero (inf), a negative count flipped the sign of the sequence losses
    logits, labels, ref = make_batch(23)
    h = torch.randn(B, T, 8, dtype=torch.float64)
    hidden = [("rmu", lambda: L.rmu(h, labels, L.control_vector(8, 2.0, dtype=torch.float64),
                                    num_items_in_batch=n)),
              ("rr", lambda: L.rr(h, h + 1, labels, num_items_in_batch=n))]
    for name, fn in _every_loss(logits, labels, ref, n=n) + hidden:
        arg = "num_seqs_in_batch" if name in ("npo", "simnpo", "dpo") else "num_items_in_batch"
        with pytest.raises(ValueError, match=f"{arg} must be") as e:
            fn()
        assert isinstance(e.value, L.AllMaskedError) == (float(n) == 0), name


@pytest.mark.parametrize("b, t, why", [(B, 0, "have 0 token"), (0, T, "batch is empty"), (B, 1, "have 1 token")])
def test_degenerate_shapes_name_the_problem(b, t, why):
    # T=0 raised an IndexError, B=0 and T=1 said "all labels are -100" (npo on B=0 returned NaN)
    logits = torch.randn(b, t, V, dtype=torch.float64, requires_grad=True)
    labels, ref = torch.randint(0, V, (b, t)), -torch.rand(b, t, dtype=torch.float64)
    for name, fn in _every_loss(logits, labels, ref):
        if name == "kl" and t == 1:
            assert torch.isfinite(fn())  # the KL compares distributions at every position: one is enough
            continue
        with pytest.raises(L.AllMaskedError, match=why if name != "kl" else "no position for the KL"):
            fn()
    h = torch.randn(b, t, 8, dtype=torch.float64)
    if t:
        return  # the hidden-state losses act on unshifted positions: a single token counts
    with pytest.raises(L.AllMaskedError, match="no position for the hidden-state loss"):
        L.rr(h, h + 1)


@pytest.mark.parametrize("beta", [0, -1.0, float("nan"), float("inf")])
def test_sequence_losses_need_a_positive_beta(beta):
    # −(2/β)·logσ(β·…): β = 0 was a ZeroDivisionError, a negative β an unbounded loss
    logits, labels, ref = make_batch(25)
    for name, fn in (("npo", lambda: L.npo(logits, labels, ref, beta=beta)),
                     ("simnpo", lambda: L.simnpo(logits, labels, beta=beta)),
                     ("dpo", lambda: L.dpo(logits, labels, ref, logits, labels, ref, beta=beta))):
        with pytest.raises(ValueError, match=f"{name}: beta must be a finite number > 0"):
            fn()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_hyper_parameters_must_be_finite(bad):
    # a NaN α or β made every token weight NaN (or 0/1 for ±inf) without an error
    logits, labels, ref = make_batch(27)
    with pytest.raises(ValueError, match="simnpo: delta must be a finite number"):
        L.simnpo(logits, labels, delta=bad)
    for name, fn in (("wga", lambda: L.wga(logits, labels, alpha=bad)),
                     ("tnpo", lambda: L.tnpo(logits, labels, ref, beta=bad)),
                     ("wtnpo", lambda: L.wtnpo(logits, labels, ref, alpha=bad))):
        with pytest.raises(ValueError, match=f"{name}: (alpha|beta) must be a finite number"):
            fn()


def _masked_kl_reference(logp, logq):
    """Σ p·(log p − log q) over the entries where p > 0 only (a plain loop over rows)."""
    rows = []
    for lp, lq in zip(logp.reshape(-1, logp.shape[-1]), logq.reshape(-1, logq.shape[-1])):
        keep = lp > float("-inf")
        rows.append((lp[keep].exp() * (lp[keep] - lq[keep])).sum())
    return torch.stack(rows).mean()


def test_kl_with_a_masked_reference():
    # a reference masking vocabulary entries with −inf: KL(p_ref ‖ p_θ) is finite (0·log 0 = 0)
    logits, labels, _ = make_batch(26)
    g = torch.Generator().manual_seed(26)
    ref_logits = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    masked = torch.rand(B, T, V, generator=g) < 0.3
    masked[..., 0] = False  # every row keeps some mass
    ref_logits[masked] = float("-inf")
    loss = L.kl(logits, ref_logits)
    logq = torch.log_softmax(logits, -1)
    want = _masked_kl_reference(torch.log_softmax(ref_logits, -1), logq)
    assert_close(loss, want)
    assert_close(grads(loss, logits), grads(want, logits))
    # reverse KL(p_θ ‖ p_ref) is infinite there: refused, naming the cause and the finite direction
    with pytest.raises(FloatingPointError, match="reverse KL is infinite: ref_logits are −inf.*forward KL is finite"):
        L.kl(logits, ref_logits, direction="reverse")
    # both masked alike: both directions finite
    cur = logits.detach().masked_fill(masked, float("-inf")).requires_grad_()
    for direction, (p, q) in (("forward", (ref_logits, cur)), ("reverse", (cur, ref_logits))):
        loss = L.kl(cur, ref_logits, direction=direction)
        want = _masked_kl_reference(torch.log_softmax(p, -1), torch.log_softmax(q, -1))
        assert_close(loss, want)
        assert bool(torch.isfinite(grads(loss, cur)).all())
    # the current model at −inf where the reference has mass: the forward KL is the infinite one
    with pytest.raises(FloatingPointError, match="forward KL is infinite: logits are −inf"):
        L.kl(cur, ref_logits.masked_fill(masked, 0.0))
    nan_ref = ref_logits.clone()
    nan_ref[0, 1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="ref_logits contain NaN"):
        L.kl(logits, nan_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_extreme_confidences_stay_finite(dtype):
    # a token at log p ≈ -80 with WGA α = 5: weight exp(-400) underflows to 0, loss stays finite
    logits = torch.zeros(1, 3, 5)
    logits[0, :, 1] = 80.0
    logits = logits.to(dtype).requires_grad_(True)
    labels = torch.tensor([[-100, 0, 1]])
    for loss in (L.wga(logits, labels, alpha=5.0), L.ga(logits, labels),
                 L.tnpo(logits, labels, torch.full((1, 3), -200.0)), L.wtnpo(logits, labels, torch.zeros(1, 3))):
        g = grads(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


# ---- properties of the weights -----------------------------------------------------------------

logp_st = st.floats(min_value=-60, max_value=0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(lp=logp_st, lr=logp_st, beta=st.floats(min_value=0.05, max_value=10))
def test_tnpo_weight_in_open_interval(lp, lr, beta):
    w = float(L.tnpo_weights(torch.tensor(lp, dtype=torch.float64), torch.tensor(lr, dtype=torch.float64), beta))
    assert 0.0 <= w <= 2.0  # (0, 2) mathematically; fp64 may round to the ends at extreme margins
    if abs(beta * (lp - lr)) < 30:
        assert 0.0 < w < 2.0


@settings(max_examples=60, deadline=None)
@given(a=logp_st, b=logp_st, lr=logp_st, beta=st.floats(min_value=0.05, max_value=10),
       alpha=st.floats(min_value=0, max_value=5))
def test_weights_monotone_in_p(a, b, lr, beta, alpha):
    lo, hi = sorted((a, b))
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    assert L.tnpo_weights(t(lo), t(lr), beta) <= L.tnpo_weights(t(hi), t(lr), beta)
    assert L.wtnpo_weights(t(lo), t(lr), alpha, beta) <= L.wtnpo_weights(t(hi), t(lr), alpha, beta)
    assert L.wga_weights(t(lo), alpha) <= L.wga_weights(t(hi), alpha)


def test_per_sample_contributions_sum_to_the_loss():
    logits, labels, ref = make_batch(22)
    for fn in (lambda **k: L.ga(logits, labels, **k), lambda **k: L.wga(logits, labels, alpha=1.0, **k),
               lambda **k: L.tnpo(logits, labels, ref, **k), lambda **k: L.wtnpo(logits, labels, ref, **k),
               lambda **k: L.nll(logits, labels, **k), lambda **k: L.npo(logits, labels, ref, **k),
               lambda **k: L.simnpo(logits, labels, **k),
               lambda **k: L.dpo(logits, labels, ref, logits, labels, ref, **k)):
        parts = fn(per_sample=True)
        assert parts.shape == (B,)
        assert_close(parts.sum(), fn())
    # each part depends on its own sequence only
    g = grads(L.tnpo(logits, labels, ref, per_sample=True)[1], logits)
    assert g[0].abs().sum() == 0 and g[2].abs().sum() == 0 and g[1].abs().sum() > 0
    h = torch.randn(B, T, 8, dtype=torch.float64)
    c = L.control_vector(8, 2.0, dtype=torch.float64)
    assert_close(L.rmu(h, labels, c, per_sample=True).sum(), L.rmu(h, labels, c))
