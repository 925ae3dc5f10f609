"""Grouped gradient dot accumulation over the Llama-2-7B gradient list (291 tensors; widths × 1/64
on CPU, the real list on a GPU): the compiled op and the torch fallback."""
import bench_dot
import pytest
import torch

import fastgeffect.ops as ops

WIDTH = {"small": 1 / 64, "real": 1.0}


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_bench_dot_accumulate(benchmark, scale, backend, sync):
    size, device = scale
    if backend == "ext" and not ops.extension_available(device):
        pytest.skip(f"the compiled op is not built for {device}")
    ta, tb, gids = bench_dot.make_pairs(bench_dot.llama_grad_shapes(WIDTH[size]), torch.bfloat16, device)
    acc = torch.zeros(5, dtype=torch.float64, device=device)
    fn = ops.dot_accumulate_ if backend == "ext" else ops.dot_accumulate_torch_
    previous = ops.get_backend()
    ops.set_backend(backend)
    try:
        benchmark(lambda: (fn(acc, ta, tb, gids), sync(device)))
    finally:
        ops.set_backend(previous)
