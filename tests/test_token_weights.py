"""The token-weight table (fastgeffect/losses/token_weights.py) is the one source of the token-weighted
objectives: the losses, the objectives and the fused kernels read it, and the Triton kernel's branch
(the only other place a formula is written) equals the table's torch function for every code."""
import inspect

import pytest
import torch
from helpers.devices import TRITON_DEVICE, to_device

import fastgeffect.losses as L
from fastgeffect.losses import token_weights as tw
from fastgeffect.objectives import OBJECTIVES


def test_codes_are_distinct_and_every_entry_is_reachable():
    assert len({w.code for w in tw.ALL}) == len(tw.ALL)
    reachable = {tw.token_weight(name).code for name in tw.TOKEN_WEIGHTS}
    reachable |= {tw.token_weight("wtnpo", form).code for form in tw.WTNPO_FORMS}
    assert reachable == {w.code for w in tw.ALL}
    with pytest.raises(ValueError, match="unknown objective 'npo'"):
        tw.token_weight("npo")
    with pytest.raises(ValueError, match="WTNPO form 'x'; valid: eq16, product"):
        tw.token_weight("wtnpo", "x")


@pytest.mark.parametrize("name", ["ga", "nll", "wga", "tnpo", "wtnpo", "satimp"])
def test_losses_and_objectives_take_the_table_defaults(name):
    entry = tw.TOKEN_WEIGHTS[name]
    params = inspect.signature(getattr(L, name)).parameters
    assert {k: params[k].default for k in entry.defaults} == dict(entry.defaults)
    assert ("ref_logprobs" in params) == entry.needs_ref
    if name in OBJECTIVES:
        term = OBJECTIVES[name]
        assert term.defaults == dict(entry.defaults)
        assert term.needs_reference == entry.needs_ref


def test_generic_loss_checks_its_inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    ref = -torch.rand(2, 6, generator=gen)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        L.token_weighted("ga", logits, labels, alpha=1.0)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        L.token_weighted("tnpo", logits, labels)
    with pytest.raises(ValueError, match="takes no ref_logprobs"):
        L.token_weighted("wga", logits, labels, ref)
    with pytest.raises(ValueError, match="needs weights"):
        L.token_weighted("weighted", logits, labels)
    # caller-given weights equal to the GA weight give GA
    torch.testing.assert_close(L.token_weighted("weighted", logits, labels, weights=torch.ones(2, 6)),
                               L.ga(logits, labels))


@pytest.mark.parametrize("entry", tw.ALL, ids=lambda w: f"{w.name}-{w.code}")
def test_triton_branch_equals_table_function(entry):
    """On the GPU, or under TRITON_INTERPRET=1 (conftest.py) on CPU: the kernel's per-row w·logp and logits gradient
    against the entry's torch function evaluated on float64 log-probs."""
    from fastgeffect.kernels.token_weighted_triton import token_weighted_chunk_triton

    C, V = 13, 37
    gen = torch.Generator().manual_seed(entry.code)
    logits = torch.randn(C, V, generator=gen) * 2
    labels = torch.randint(0, V, (C,), generator=gen)
    ref = -torch.rand(C, generator=gen) * 5
    explicit = torch.randn(C, generator=gen)
    alpha, beta = 0.7, 1.3
    scale = torch.tensor(0.25)
    grad, *args = to_device(TRITON_DEVICE, logits.clone(), labels, ref, explicit, scale)
    logp, wlogp = token_weighted_chunk_triton(grad, *args, entry, alpha, beta, True)
    grad, logp, wlogp = grad.cpu(), logp.cpu(), wlogp.cpu()

    z = logits.double()
    want_logp = torch.log_softmax(z, -1).gather(1, labels[:, None]).squeeze(1)
    w = entry.fn(want_logp, ref.double(), explicit.double(), alpha, beta)
    want_grad = 0.25 * w[:, None] * (torch.nn.functional.one_hot(labels, V).double() - torch.softmax(z, -1))
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wlogp.double(), w * want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_satimp_fills_the_kernels_scalar_slots_with_its_exponents():
    assert tw.SATIMP.scalar_names == ("beta1", "beta2") and tw.WGA.scalar_names == ("alpha", "beta")
    assert tw.SATIMP.scalars({}) == (5.0, 1.0)
    assert tw.SATIMP.scalars({"beta1": 2.0, "beta2": None, "alpha": 9.0}) == (2.0, 1.0)
    with pytest.raises(ValueError, match="satimp: beta1 must be a finite number >= 0"):
        tw.SATIMP.scalars({"beta1": -1.0})


@pytest.mark.parametrize("beta2", [0.0, 1.3])
def test_triton_satimp_branch_at_saturated_tokens(beta2):
    """p = 1 in fp32 (1 − p = 0): the importance factor is 0^β2, 0 for β2 > 0 and 1 for β2 = 0, as
    torch's pow gives it; no NaN from the logarithm of 0."""
    from fastgeffect.kernels.token_weighted_triton import token_weighted_chunk_triton

    C, V = 5, 19
    logits = torch.randn(C, V, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(C)
    logits[torch.arange(C), labels] += torch.tensor([200.0, 200.0, 0.0, 1.0, 200.0])  # rows 0, 1, 4 saturated
    grad, lab, scale = to_device(TRITON_DEVICE, logits.clone(), labels, torch.tensor(1.0))
    logp, wlogp = token_weighted_chunk_triton(grad, lab, None, None, scale, tw.SATIMP, 0.5, beta2, True)
    lp64 = torch.log_softmax(logits.double(), -1).gather(1, labels[:, None]).squeeze(1)
    w = tw.SATIMP.fn(lp64, None, None, 0.5, beta2)
    assert bool(torch.isfinite(grad).all()) and bool(torch.isfinite(wlogp).all())
    torch.testing.assert_close(wlogp.cpu().double(), w * lp64, rtol=1e-5, atol=1e-6)
    want_grad = w[:, None] * (torch.nn.functional.one_hot(labels, V).double() - torch.softmax(logits.double(), -1))
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-5, atol=1e-6)
