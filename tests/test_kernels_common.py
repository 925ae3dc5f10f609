"""The backend-independent pieces of the fused losses (fastgeffect/kernels/common.py)."""
import contextlib

import pytest
import torch

from fastgeffect.kernels import common


def test_launch_device_is_a_no_op_on_cpu():
    assert isinstance(common.launch_device(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs: the launch must make the "
                    "tensor's device (cuda:1) current, which one GPU cannot tell apart from cuda:0")
def test_launch_device_makes_the_tensors_gpu_current():
    t = torch.zeros(1, device="cuda:1")
    with common.launch_device(t):
        assert torch.cuda.current_device() == 1
    assert torch.cuda.current_device() == 0


def test_grads_needed():
    h, w, b = (torch.zeros(2, 3, requires_grad=True), torch.zeros(4, 3), torch.zeros(4, requires_grad=True))
    assert common.grads_needed(h, w, b) == (True, False, True)
    assert common.grads_needed(h, w, None) == (True, False, False)
    with torch.no_grad():
        assert common.grads_needed(h, w, b) == (False, False, False)


@pytest.mark.parametrize("n,vocab,device,buffers,want", [
    (100000, 32000, "cpu", 1, 128), (100000, 128256, "cpu", 1, 32), (100000, 256000, "cpu", 2, 16),
    (100000, 97, "cpu", 1, 32768), (50, 32000, "cpu", 1, 50),
    (100000, 32000, "cuda", 1, 4096), (100000, 128256, "cuda", 1, 1024), (100000, 128256, "cuda", 2, 1024),
    (100000, 256000, "cuda", 2, 512), (1 << 21, 97, "cuda", 1, 1 << 20), (300, 128256, "cuda", 1, 300),
    (100000, 1 << 30, "cuda", 1, 1),
])
def test_chunk_rows(n, vocab, device, buffers, want):
    # CUDA: >= 1024 rows where 2^28 elements allow (the dW accumulator is re-read once per chunk)
    assert common.chunk_rows(n, vocab, torch.device(device), buffers=buffers) == want


def test_chunk_rows_override():
    assert common.chunk_rows(100, 32000, torch.device("cuda"), chunk_size=7) == 7
    with pytest.raises(ValueError, match="chunk_size"):
        common.chunk_rows(100, 32000, torch.device("cpu"), chunk_size=0)
