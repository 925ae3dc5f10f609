"""Fused LM head + token-weighted log-likelihood against an independent float64 reference.

Both backends run: the chunked torch path and the Triton kernels (under TRITON_INTERPRET=1 on
CPU, see conftest.py). Shapes are small and odd; chunk sizes are forced small so that several
chunks run and the last one is partial.
"""
import math

import pytest
import torch
from helpers.devices import TRITON_DEVICE, device_for, needs_interpreter

from fastgeffect import losses
from fastgeffect.kernels import fused_linear_token_weighted, lm_head
from fastgeffect.kernels import token_weighted as wnll
from fastgeffect.kernels.dispatch import resolve_backend
from fastgeffect.losses import AllMaskedError

BACKENDS = ["torch", "triton"]
OBJECTIVES = ["ga", "nll", "wga", "tnpo", "wtnpo", "wtnpo_product", "weighted"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}


def make_inputs(N, H, V, dtype, seed=0, masked=0.3, bias=True, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=gen) * scale).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < masked] = -100
    labels[0] = 3  # at least one valid row
    ref = -torch.rand(N, generator=gen) * 8.0
    explicit = torch.randn(N, generator=gen)
    # drawn on the CPU (same values everywhere), then moved where the backend runs
    return tuple(None if t is None else t.to(device) for t in (hidden, weight, b, labels, ref, explicit))


def reference(hidden, weight, bias, labels, objective, ref, explicit, alpha, beta, denom=None, reduction="mean"):
    """Independent float64 reference: materialised logits, log_softmax, explicit weight formulas."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    params = [h, w]
    logits = h @ w.t()
    if bias is not None:
        b = bias.detach().double().requires_grad_()
        params.append(b)
        logits = logits + b
    mask = labels != -100
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all[mask].gather(1, labels[mask].unsqueeze(1)).squeeze(1)
    lp = logp.detach()
    r = None if ref is None else ref.double()[mask]
    weights = {
        "ga": lambda: torch.ones_like(lp), "nll": lambda: -torch.ones_like(lp),
        "wga": lambda: torch.exp(alpha * lp),
        "tnpo": lambda: 2 * torch.sigmoid(beta * (lp - r)),
        "wtnpo": lambda: 2 * torch.sigmoid((beta + alpha) * lp - beta * r),
        "wtnpo_product": lambda: 2 * torch.sigmoid(beta * (lp - r)) * torch.exp(alpha * lp),
        "weighted": lambda: explicit.double()[mask],
    }[objective]()
    total = (weights * logp).sum()
    loss = total if reduction == "sum" else total / (mask.sum() if denom is None else denom)
    grads = torch.autograd.grad(loss, params)
    full_logp = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    full_logp[mask] = lp
    return loss.detach(), grads, full_logp


def call(objective, hidden, weight, bias, labels, ref, explicit, backend, **kw):
    obj = {"wtnpo_product": "wtnpo"}.get(objective, objective)
    if objective == "wtnpo_product":
        kw["wtnpo_form"] = "product"
    if obj in ("tnpo", "wtnpo"):
        kw["ref_logprobs"] = ref
    if obj == "weighted":
        kw["weights"] = explicit
    return fused_linear_token_weighted(hidden, weight, labels, objective=obj, bias=bias, backend=backend, **kw)


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def default_ab(objective):
    ab = {"wga": (5.0, 0.0), "tnpo": (0.0, 4.0), "wtnpo": (1.5, 4.0), "wtnpo_product": (1.5, 4.0)}
    return ab.get(objective, (0.0, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("N,H,V,dtype", [(37, 16, 97, torch.float32), (45, 48, 1000, torch.float32),
                                          (19, 256, 5000, torch.float32), (29, 40, 777, torch.bfloat16)])
def test_matches_float64_reference(backend, objective, N, H, V, dtype):
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, explicit = make_inputs(N, H, V, dtype, seed=N + V, device=dev)
    if objective == "wga":  # make p^alpha weights non-negligible
        hidden = hidden * 0.2
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, logp = call(objective, *params, labels, ref, explicit, backend, chunk_size=8, return_logprobs=True)
    loss.backward()
    alpha, beta = default_ab(objective)
    ref_loss, ref_grads, ref_logp = reference(*params, labels, objective, ref, explicit, alpha, beta)
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and logp.shape == (N,)
    assert rel_err(loss.reshape(1), ref_loss.reshape(1)) < tol
    assert rel_err(logp, ref_logp) < tol
    assert bool((logp[labels == -100] == 0).all())
    for p, g in zip(params, ref_grads):
        assert p.grad is not None and p.grad.dtype == dtype and p.grad.shape == p.shape
        assert rel_err(p.grad, g) < tol * 3, objective


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["ga", "nll", "wga", "tnpo", "wtnpo", "wtnpo_product"])
def test_matches_losses_module(backend, objective):
    """Same value and gradient as fastgeffect.losses on the materialised (1, N+1, V) logits."""
    N, H, V = 23, 20, 131
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, _ = make_inputs(N, H, V, torch.float32, seed=7, device=dev)
    hidden = hidden * 0.3
    h1, h2 = hidden.clone().requires_grad_(), hidden.double().requires_grad_()
    loss = call(objective, h1, weight, bias, labels, ref, None, backend, chunk_size=5)
    loss.backward()
    # losses take unshifted logits (logits[t] predicts lab[t+1]): prepend -100 to the labels and
    # append an unused logits row
    logits = torch.cat([h2 @ weight.double().t() + bias.double(),
                        torch.zeros(1, V, dtype=torch.float64, device=dev)])[None]
    lab = torch.cat([torch.tensor([-100], device=dev), labels])[None]
    refa = torch.cat([torch.zeros(1, device=dev), ref]).double()[None]
    name = "wtnpo" if objective == "wtnpo_product" else objective
    fn = getattr(losses, name)
    kw = {"wtnpo_form": "product"} if objective == "wtnpo_product" else {}
    want = fn(logits, lab, refa, **kw) if name in ("tnpo", "wtnpo") else fn(logits, lab)
    want.backward()
    assert rel_err(loss.reshape(1), want.reshape(1)) < 2e-5
    assert rel_err(h1.grad, h2.grad) < 5e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_sum_and_grad_output(backend):
    N, H, V = 30, 16, 211
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, _ = make_inputs(N, H, V, torch.float32, seed=3, device=dev)
    n = int((labels != -100).sum())
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = call("tnpo", h, w, None, labels, ref, None, backend, num_items_in_batch=torch.tensor(4 * n))
    (3.0 * loss).backward()
    ref_loss, (gh, gw), _ = reference(h, w, None, labels, "tnpo", ref, None, 0.0, 4.0, denom=4 * n)
    assert rel_err(loss.reshape(1), ref_loss.reshape(1)) < 2e-5
    assert rel_err(h.grad, 3 * gh) < 5e-5 and rel_err(w.grad, 3 * gw) < 5e-5
    s = call("ga", hidden, weight, None, labels, ref, None, backend, reduction="sum")
    ref_s, _, _ = reference(hidden, weight, None, labels, "ga", ref, None, 0, 0, reduction="sum")
    assert rel_err(s.reshape(1), ref_s.reshape(1)) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_and_no_grad_do_not_change_the_result(backend):
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, _ = make_inputs(41, 24, 300, torch.float32, seed=5, device=dev)
    outs = [call("wtnpo", hidden, weight, bias, labels, ref, None, backend, chunk_size=c) for c in (1, 7, 64, None)]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=1e-6, atol=1e-7)
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        o = call("wtnpo", h, weight, bias, labels, ref, None, backend)
    assert not o.requires_grad and torch.allclose(o, outs[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    dev = device_for(backend)
    hidden, weight, bias, labels, _, _ = make_inputs(17, 16, 97, torch.float32, seed=11, device=dev)
    h = hidden.clone().requires_grad_()
    loss = call("nll", h, weight, bias, labels, None, None, backend)  # frozen head (e.g. LoRA)
    loss.backward()
    _, (gh, _, _), _ = reference(h, weight, bias, labels, "nll", None, None, 0, 0)
    assert rel_err(h.grad, gh) < 5e-5 and weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked(backend):
    dev = device_for(backend)
    hidden, weight, bias, labels, _, _ = make_inputs(9, 16, 97, torch.float32, device=dev)
    labels[:] = -100
    with pytest.raises(AllMaskedError):
        call("ga", hidden, weight, bias, labels, None, None, backend)
    # under gradient accumulation an all-masked micro-batch contributes exactly zero
    h = hidden.clone().requires_grad_()
    loss = call("ga", h, weight, bias, labels, None, None, backend, num_items_in_batch=12)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((h.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_extreme_logits_stay_finite(backend, dtype):
    N, H, V = 13, 32, 500
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, _ = make_inputs(N, H, V, dtype, seed=2, bias=False, device=dev)
    big = 1e4 if dtype != torch.float16 else 1e3  # logits up to ~±1e4 (fp16: ~±1e3, its range is 6.5e4)
    hidden = (hidden.float() * big / hidden.float().abs().max()).to(dtype).requires_grad_()
    weight = (weight.float() / weight.float().abs().max()).to(dtype).requires_grad_()
    for obj in ("ga", "wga", "tnpo", "wtnpo"):
        loss = call(obj, hidden, weight, None, labels, ref, None, backend)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert torch.isfinite(loss) and bool(torch.isfinite(gh).all()) and bool(torch.isfinite(gw).all()), obj


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, _ = make_inputs(20, 16, 97, torch.float32, seed=4, device=dev)
    want = call("tnpo", hidden, weight, bias, labels, ref, None, backend)
    wide = torch.zeros(20, 32, device=dev)
    wide[:, ::2] = hidden
    wt = weight.t().contiguous().t()  # same values, column-major
    lab2 = torch.stack([labels, labels], 1)[:, 0]
    ref2 = torch.stack([ref, ref], 1)[:, 1]
    got = call("tnpo", wide[:, ::2], wt, bias, lab2, ref2, None, backend)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    hidden, weight, bias, labels, ref, _ = make_inputs(10, 16, 97, torch.float32)
    f = fused_linear_token_weighted
    with pytest.raises(ValueError, match="hidden size"):
        f(hidden[:, :8], weight, labels)
    with pytest.raises(ValueError, match="dtype"):
        f(hidden.double(), weight, labels)
    with pytest.raises(ValueError, match="labels shape"):
        f(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="integer"):
        f(hidden, weight, labels.float())
    bad = labels.clone()
    bad[1] = 97
    with pytest.raises(ValueError, match="outside the vocabulary"):
        f(hidden, weight, bad)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        f(hidden, weight, labels, objective="tnpo")
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        f(hidden, weight, labels, objective="tnpo", ref_logprobs=ref[:3])
    with pytest.raises(ValueError, match="only used by"):
        f(hidden, weight, labels, objective="ga", ref_logprobs=ref)
    with pytest.raises(ValueError, match="unknown objective"):
        f(hidden, weight, labels, objective="npo")
    with pytest.raises(ValueError, match="WTNPO form"):
        f(hidden, weight, labels, objective="wtnpo", ref_logprobs=ref, wtnpo_form="x")
    with pytest.raises(ValueError, match="bias shape"):
        f(hidden, weight, labels, bias=bias[:5])
    with pytest.raises(ValueError, match="reduction"):
        f(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="unknown backend"):
        f(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="fp64"):
        f(hidden.double().to(TRITON_DEVICE), weight.double().to(TRITON_DEVICE), labels.to(TRITON_DEVICE),
          backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        f(hidden, weight, labels, backend="triton")


def test_backend_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FASTGEFFECT_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", cuda) == "triton"
    monkeypatch.setenv("FASTGEFFECT_BACKEND", "triton")
    assert resolve_backend("torch", cuda) == "torch"  # an explicit argument wins over the env
    monkeypatch.setenv("FASTGEFFECT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTGEFFECT_BACKEND"):
        resolve_backend("auto", cpu)


@needs_interpreter
def test_triton_on_cpu_tensors_under_the_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTGEFFECT_BACKEND", raising=False)
    assert resolve_backend("triton", cpu) == "triton"  # the interpreter is on in the tests
    monkeypatch.setenv("FASTGEFFECT_BACKEND", "triton")
    assert resolve_backend("auto", cpu) == "triton"


def test_env_backend_reaches_the_triton_kernel(monkeypatch):
    import fastgeffect.kernels.token_weighted_triton as wt
    calls = []
    real = wt.token_weighted_chunk_triton
    monkeypatch.setattr(wt, "token_weighted_chunk_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("FASTGEFFECT_BACKEND", "triton")
    hidden, weight, _, labels, _, _ = make_inputs(10, 16, 97, torch.float32, device=TRITON_DEVICE)
    fused_linear_token_weighted(hidden, weight, labels)
    assert calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels compiled for the device)")
@pytest.mark.parametrize("objective", ["ga", "wga", "tnpo", "wtnpo"])
def test_gpu_triton_matches_reference(objective):
    N, H, V = 300, 512, 32000
    hidden, weight, bias, labels, ref, explicit = make_inputs(N, H, V, torch.bfloat16, seed=1)
    params = [t.cuda().requires_grad_() for t in (hidden, weight, bias)]
    loss, logp = call(objective, *params, labels.cuda(), ref.cuda(), None, "triton", chunk_size=128,
                      return_logprobs=True)
    loss.backward()
    cpu_params = [p.detach().cpu() for p in params]
    ref_loss, ref_grads, ref_logp = reference(*cpu_params, labels, objective, ref, explicit, *default_ab(objective))
    assert rel_err(loss.cpu().reshape(1), ref_loss.reshape(1)) < 4e-2
    assert rel_err(logp.cpu(), ref_logp) < 4e-2
    for p, g in zip(params, ref_grads):
        assert rel_err(p.grad.cpu(), g) < 1e-1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (Triton on a non-current device)")
def test_gpu_triton_on_second_device():
    hidden, weight, bias, labels, _, _ = make_inputs(64, 64, 1000, torch.float32, seed=2)
    params = [t.to("cuda:1").requires_grad_() for t in (hidden, weight, bias)]
    loss = call("ga", *params, labels.to("cuda:1"), None, None, "triton")
    loss.backward()
    ref_loss, ref_grads, _ = reference(hidden, weight, bias, labels, "ga", None, None, *default_ab("ga"))
    assert rel_err(loss.cpu().reshape(1), ref_loss.reshape(1)) < 1e-3
    for p, g in zip(params, ref_grads):
        assert rel_err(p.grad.cpu(), g) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_skips_the_gradient_gemms(backend, monkeypatch):
    hidden, weight, bias, labels, ref, _ = make_inputs(33, 16, 200, torch.float32, seed=8, device=device_for(backend))
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = call("tnpo", *params, labels, ref, None, backend)
    needs = []
    real = lm_head.chunked_lm_head
    monkeypatch.setattr(wnll, "chunked_lm_head", lambda *a: needs.append(a[-1]) or real(*a))
    monkeypatch.setattr(lm_head, "addmm_fp32_", lambda *a: pytest.fail("dW accumulated under no_grad"))
    with torch.no_grad():
        got, logp = call("tnpo", *params, labels, ref, None, backend, return_logprobs=True)
    frozen = call("tnpo", hidden, weight, bias, labels, ref, None, backend)  # nothing requires grad
    assert needs == [(False, False, False)] * 2
    assert not got.requires_grad and torch.equal(got, want.detach()) and torch.equal(frozen, got)
    assert logp.shape == (33,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_weights(backend):
    # autocast casts the LM-head operands to bf16; fp32 parameters get fp32 gradients
    dev = device_for(backend)
    hidden, weight, bias, labels, ref, _ = make_inputs(40, 32, 300, torch.float32, seed=9, device=dev)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = call("wtnpo", *params, labels, ref, None, backend)
    loss.backward()
    bf16 = [t.bfloat16() for t in (hidden, weight, bias)]
    ref_loss, ref_grads, _ = reference(*bf16, labels, "wtnpo", ref, None, *default_ab("wtnpo"))
    assert loss.dtype == torch.float32 and rel_err(loss.reshape(1), ref_loss.reshape(1)) < 2e-2
    for p, g in zip(params, ref_grads):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, g) < 5e-2


@pytest.mark.parametrize("backend,grad_output", [("torch", 1.0), ("torch", 65536.0), ("triton", 65536.0)])
def test_fp16_gradients_do_not_underflow(backend, grad_output):
    # scale·p = 1/(2048·8192) ≈ 6e-8 per logit is below fp16's normal range: the gradients are stored
    # unscaled, scaled in fp32 in the backward; grad_output 65536 does not fit fp16 (max 65504)
    dev = device_for(backend)
    hidden, weight, bias, labels, _, _ = make_inputs(2048, 32, 8192, torch.float16, seed=3, masked=0.0, device=dev)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = call("ga", *params, labels, None, None, backend)
    loss.backward(torch.tensor(grad_output, device=dev))
    _, ref_grads, _ = reference(hidden, weight, bias, labels, "ga", None, None, 0.0, 0.0)
    for p, g in zip(params, ref_grads):  # in norm: the small entries are the ones that underflowed
        err = float((p.grad.double().cpu() / grad_output - g.cpu()).norm() / g.cpu().norm())
        assert p.grad.isfinite().all() and err < 2e-3  # 1e-2 to 3e-2 when stored scaled in fp16


def test_double_backward_raises():
    hidden, weight, bias, labels, _, _ = make_inputs(12, 16, 50, torch.float32, seed=1)
    h = hidden.clone().requires_grad_()
    loss = call("ga", h, weight, bias, labels, None, None, "torch")
    # loss² makes grad_output depend on h: without once_differentiable the second derivative would
    # silently miss the fused loss's own Hessian term
    (g,) = torch.autograd.grad(loss ** 2, h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
