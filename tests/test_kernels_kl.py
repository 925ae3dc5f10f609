"""Fused KL regulariser against an independent float64 reference and fastgeffect.losses.kl."""
import math

import pytest
import torch
from helpers.devices import device_for

from fastgeffect import losses
from fastgeffect.kernels import fused_linear_kl, lm_head
from fastgeffect.kernels import kl as kl_mod
from fastgeffect.losses import AllMaskedError

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 3e-5, torch.bfloat16: 5e-2}


def make_inputs(N, H, V, dtype, seed=0, ref_h=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ref_h = ref_h or H
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(dtype)
    bias = (torch.randn(V, generator=gen) * 0.1).to(dtype)
    ref_hidden = torch.randn(N, ref_h, generator=gen).to(dtype)
    ref_weight = (torch.randn(V, ref_h, generator=gen) / math.sqrt(ref_h)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.4] = -100
    labels[1] = 0
    # drawn on the CPU (same values everywhere), then moved where the backend runs
    return tuple(t.to(device) for t in (hidden, weight, bias, ref_hidden, ref_weight, labels))


def reference(hidden, weight, bias, ref_hidden, ref_weight, labels, direction, positions):
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    logq = torch.log_softmax(h @ w.t() + b, -1)
    logr = torch.log_softmax(ref_hidden.double() @ ref_weight.double().t(), -1)
    if direction == "forward":
        per_row = (logr.exp() * (logr - logq)).sum(-1)
    else:
        per_row = (logq.exp() * (logq - logr)).sum(-1)
    loss = per_row.mean() if positions == "all" else per_row[labels != -100].mean()
    return loss.detach(), torch.autograd.grad(loss, (h, w, b))


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("positions", ["all", "answer"])
@pytest.mark.parametrize("N,H,V,dtype", [(27, 16, 97, torch.float32), (21, 64, 5000, torch.float32),
                                          (19, 40, 1001, torch.bfloat16)])
def test_matches_float64_reference(backend, direction, positions, N, H, V, dtype):
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(N, H, V, dtype, seed=V, device=dev)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref_weight.requires_grad_()  # the reference side must stay detached
    loss = fused_linear_kl(params[0], params[1], ref_hidden, ref_weight, labels=labels, direction=direction,
                           positions=positions, bias=params[2], backend=backend, chunk_size=8)
    loss.backward()
    want, grads = reference(*params, ref_hidden, ref_weight, labels, direction, positions)
    assert loss.dtype == torch.float32 and float(loss.detach()) > 0
    assert rel_err(loss.reshape(1), want.reshape(1)) < TOL[dtype]
    for p, g in zip(params, grads):
        assert p.grad.dtype == dtype and rel_err(p.grad, g) < 3 * TOL[dtype]
    assert ref_weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("positions", ["all", "answer"])
def test_matches_losses_kl(backend, direction, positions):
    """(B, T) rows given to fused_linear_kl with labels shifted left give losses.kl on (B, T, V) logits."""
    B, T, H, V = 3, 7, 16, 113
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, _ = make_inputs(B * T, H, V, torch.float32, seed=1, device=dev)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, V, (B, T), generator=gen).to(dev)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    aligned = torch.cat([labels[:, 1:], torch.full((B, 1), -100, device=dev)], 1).reshape(-1)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_kl(h, weight, ref_hidden, ref_weight, labels=aligned, direction=direction,
                           positions=positions, bias=bias, backend=backend, chunk_size=4)
    loss.backward()
    h2 = hidden.double().requires_grad_()
    logits = (h2 @ weight.double().t() + bias.double()).view(B, T, V)
    ref_logits = (ref_hidden.double() @ ref_weight.double().t()).view(B, T, V)
    want = losses.kl(logits, ref_logits, labels, direction=direction, positions=positions)
    want.backward()
    assert rel_err(loss.reshape(1), want.reshape(1)) < 3e-5
    assert rel_err(h.grad, h2.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_models_give_zero_and_mixed_widths_work(backend):
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(15, 24, 200, torch.float32, seed=3, ref_h=8,
                                                                       device=dev)
    zero = fused_linear_kl(hidden, weight, hidden, weight, backend=backend)
    assert abs(float(zero)) < 1e-5
    loss = fused_linear_kl(hidden, weight, ref_hidden, ref_weight, backend=backend)  # ref is narrower
    h = hidden.double()
    want = torch.nn.functional.kl_div(torch.log_softmax(h @ weight.double().t(), -1),
                                      torch.log_softmax(ref_hidden.double() @ ref_weight.double().t(), -1),
                                      reduction="batchmean", log_target=True)  # TOFU's form
    assert rel_err(loss.reshape(1), want.reshape(1)) < 3e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_and_errors(backend):
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(11, 32, 300, torch.bfloat16, seed=4, device=dev)
    h = (hidden.float() * 2e3).to(torch.bfloat16).requires_grad_()
    for direction in ("forward", "reverse"):
        loss = fused_linear_kl(h, weight, ref_hidden * 500, ref_weight, direction=direction, backend=backend)
        (g,) = torch.autograd.grad(loss, (h,))
        assert torch.isfinite(loss) and bool(torch.isfinite(g).all())
    with pytest.raises(AllMaskedError):
        fused_linear_kl(hidden, weight, ref_hidden, ref_weight, labels=torch.full((11,), -100, device=dev),
                        positions="answer", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_reference_vocabulary(backend):
    """A reference bias of −inf on some entries (probability 0): the forward KL is finite and equals
    losses.kl (0·log 0 = 0, no NaN); the reverse KL is +inf (the current model has mass there),
    which the objective's finite-loss check refuses."""
    N, H, V = 13, 16, 300
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, _ = make_inputs(N, H, V, torch.float32, seed=6, device=dev)
    ref_bias = torch.zeros(V)
    ref_bias[torch.randperm(V, generator=torch.Generator().manual_seed(6))[:100]] = float("-inf")
    ref_bias = ref_bias.to(dev)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_kl(h, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, backend=backend,
                           chunk_size=4)
    loss.backward()
    h2 = hidden.double().requires_grad_()
    logits = (h2 @ weight.double().t() + bias.double()).view(1, N, V)
    ref_logits = (ref_hidden.double() @ ref_weight.double().t() + ref_bias.double()).view(1, N, V)
    want = losses.kl(logits, ref_logits)
    want.backward()
    assert torch.isfinite(loss) and rel_err(loss.reshape(1), want.reshape(1)) < 3e-5
    assert rel_err(h.grad, h2.grad) < 1e-4
    rev = fused_linear_kl(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias,
                          direction="reverse", backend=backend, chunk_size=4)
    assert float(rev) == math.inf


@pytest.mark.parametrize("n", [0, -4, float("nan")])
def test_num_items_must_be_positive(n):
    # positions="all" divided by it unchecked: 0 gave a ZeroDivisionError, a negative count flipped the sign
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(11, 16, 97, torch.float32)
    for positions in ("all", "answer"):
        with pytest.raises(ValueError, match="num_items_in_batch must be"):
            fused_linear_kl(hidden, weight, ref_hidden, ref_weight, labels=labels, positions=positions,
                            num_items_in_batch=n)


def test_bad_inputs():
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(11, 16, 97, torch.float32)
    with pytest.raises(ValueError, match="direction"):
        fused_linear_kl(hidden, weight, ref_hidden, ref_weight, direction="sym")
    with pytest.raises(ValueError, match="positions"):
        fused_linear_kl(hidden, weight, ref_hidden, ref_weight, positions="some")
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_kl(hidden, weight, ref_hidden, ref_weight, positions="answer")
    with pytest.raises(ValueError, match="rows"):
        fused_linear_kl(hidden, weight, ref_hidden[:5], ref_weight)
    with pytest.raises(ValueError, match="vocab"):
        fused_linear_kl(hidden, weight, ref_hidden, ref_weight[:50])
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_kl(hidden, weight, ref_hidden[:, :4], ref_weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels compiled for the device)")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gpu_triton_matches_reference(direction):
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(200, 256, 32000, torch.bfloat16, seed=5)
    params = [t.cuda().requires_grad_() for t in (hidden, weight, bias)]
    loss = fused_linear_kl(params[0], params[1], ref_hidden.cuda(), ref_weight.cuda(), bias=params[2],
                           direction=direction, backend="triton", chunk_size=64)
    loss.backward()
    want, grads = reference(*[p.detach().cpu() for p in params], ref_hidden, ref_weight, labels, direction, "all")
    assert rel_err(loss.cpu().reshape(1), want.reshape(1)) < 5e-2
    for p, g in zip(params, grads):
        assert rel_err(p.grad.cpu(), g) < 1e-1


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_skips_the_gradient_gemms(backend, monkeypatch):
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(23, 16, 150, torch.float32, seed=4, device=dev)
    h = hidden.clone().requires_grad_()
    want = fused_linear_kl(h, weight, ref_hidden, ref_weight, bias=bias, backend=backend)
    needs = []
    real = lm_head.chunked_lm_head
    monkeypatch.setattr(kl_mod, "chunked_lm_head", lambda *a: needs.append(a[-1]) or real(*a))
    monkeypatch.setattr(lm_head, "addmm_fp32_", lambda *a: pytest.fail("dW accumulated under no_grad"))
    with torch.no_grad():
        got = fused_linear_kl(h, weight, ref_hidden, ref_weight, bias=bias, backend=backend)
    assert needs == [(False, False, False)]
    assert not got.requires_grad and torch.equal(got, want.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_weights(backend):
    dev = device_for(backend)
    hidden, weight, bias, ref_hidden, ref_weight, labels = make_inputs(25, 32, 200, torch.float32, seed=6, device=dev)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = fused_linear_kl(*params[:2], ref_hidden, ref_weight, bias=params[2], backend=backend)
    loss.backward()
    bf16 = [t.bfloat16() for t in (hidden, weight, bias, ref_hidden, ref_weight)]
    ref_loss, ref_grads = reference(*bf16, labels, "forward", "all")
    assert rel_err(loss.reshape(1), ref_loss.reshape(1)) < 5e-2
    for p, g in zip(params, ref_grads):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, g) < 5e-2


def test_double_backward_raises():
    hidden, weight, bias, ref_hidden, ref_weight, _ = make_inputs(12, 16, 50, torch.float32, seed=1)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_kl(h, weight, ref_hidden, ref_weight, backend="torch")
    (g,) = torch.autograd.grad(loss ** 2, h, create_graph=True)  # grad_output depends on h
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
