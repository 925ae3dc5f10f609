"""Forward+backward of the fused token-weighted NLL (TNPO weights) and the fused KL against eager
PyTorch, on the inputs of ``bench_losses``."""
import bench_losses
import pytest
import torch

from fastgeffect import losses
from fastgeffect.kernels import fused_linear_kl

# (hidden, vocab, tokens)
SHAPES = {"small": (64, 4000, 256), "real": (4096, 32000, 8192)}


def _inputs(size, device):
    hidden, vocab, tokens = SHAPES[size]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return bench_losses.make_inputs(tokens, hidden, vocab, dtype, device, 0.5)


@pytest.mark.parametrize("method", ["eager", "torch_chunked", "ours"])
def test_bench_token_weighted(benchmark, scale, method, sync):
    size, device = scale
    h, w, labels, ref = _inputs(size, device)
    try:
        fn = bench_losses.loss_fn(method, device)
    except RuntimeError as e:
        pytest.skip(str(e))

    def step():
        h.grad = w.grad = None
        fn(h, w, labels, ref).backward()
        sync(device)
    benchmark(step)


@pytest.mark.parametrize("method", ["eager", "ours"])
def test_bench_kl(benchmark, scale, method, sync):
    size, device = scale
    h, w, _, _ = _inputs(size, device)
    rh, rw = h.detach().flip(0), w.detach().clone()
    if method == "eager":
        fn = lambda: losses.kl((h @ w.t())[None], (rh @ rw.t())[None])  # noqa: E731
    else:
        fn = lambda: fused_linear_kl(h, w, rh, rw)  # noqa: E731

    def step():
        h.grad = w.grad = None
        fn().backward()
        sync(device)
    benchmark(step)
