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
