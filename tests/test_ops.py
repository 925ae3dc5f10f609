"""fastgeffect.ops.dot_accumulate_: compiled extension and torch fallback against a float64
reference, bad input, backend switching, the CMake/ctest build, and the G-effect engine on
both backends."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.devices import HAS_CUDA
from helpers.tiny_models import qa_batch, tiny_llama

import fastgeffect.ops as ops
from fastgeffect.geffect.stream import default_accumulate_dtype
from fastgeffect.ops import _extension, build_config

ROOT = Path(__file__).resolve().parents[1]
HAS_EXT = ops.extension_available("cpu")
NO_CUDA = not HAS_CUDA
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"compiled extension not loaded: {_extension.load_error('cpu')}")
BACKENDS = [pytest.param("ext", marks=needs_ext), "torch"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def backend(request):
    previous = ops.get_backend()
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend(previous)


def reference(n_groups, tensors_a, tensors_b, group_ids):
    """Exact per-group sums: fp64 products of ≤24-bit mantissas are exact; math.fsum adds exactly."""
    terms = [[] for _ in range(n_groups)]
    for a, b, g in zip(tensors_a, tensors_b, group_ids):
        terms[g].extend((a.double() * b.double()).flatten().tolist())
    return torch.tensor([math.fsum(t) for t in terms], dtype=torch.float64)


def abs_scale(n_groups, tensors_a, tensors_b, group_ids):
    """Per-group Σ|a·b|: the scale that rounding errors of any summation order are bounded by."""
    out = torch.zeros(n_groups, dtype=torch.float64)
    for a, b, g in zip(tensors_a, tensors_b, group_ids):
        out[g] += (a.double() * b.double()).abs().sum()
    return out


def random_pairs(seed, device="cpu", n_pairs=12, n_groups=5, max_numel=70001):
    """Odd shapes (empty, one-element, ragged multi-chunk), mixed dtypes per side, some
    non-contiguous views, random group ids."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0,), (1,), (1, 1), (3, 0, 2), (max_numel,), (7, 13), (257, 129)]
    while len(sizes) < n_pairs:
        sizes.append(tuple(int(s) for s in torch.randint(1, 60, (int(torch.randint(1, 4, (1,), generator=g)),),
                                                          generator=g)))
    tensors_a, tensors_b, group_ids = [], [], []
    for i, shape in enumerate(sizes):
        da = FLOAT_DTYPES[int(torch.randint(0, 4, (1,), generator=g))]
        db = FLOAT_DTYPES[int(torch.randint(0, 4, (1,), generator=g))]
        a = torch.randn(shape, generator=g).to(da)
        b = torch.randn(shape, generator=g).to(db)
        if i % 4 == 3 and a.dim() >= 2:  # transposed: same shape, non-contiguous
            a = torch.randn(tuple(reversed(shape)), generator=g).to(da).transpose(0, -1)
        if i % 5 == 4:  # every other element of a larger buffer
            b = torch.randn(shape + (2,), generator=g).to(db)[..., 0]
        tensors_a.append(a.to(device))
        tensors_b.append(b.to(device))
        group_ids.append(int(torch.randint(0, n_groups, (1,), generator=g)))
    return tensors_a, tensors_b, group_ids


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(backend, seed, acc_dtype):
    ta, tb, gids = random_pairs(seed)
    assert any(not t.is_contiguous() for t in ta + tb)
    start = torch.randn(5, generator=torch.Generator().manual_seed(seed + 99)).to(acc_dtype)
    acc = start.clone()
    out = ops.dot_accumulate_(acc, ta, tb, gids)
    assert out is acc and acc.dtype == acc_dtype and acc.shape == (5,)
    want = start.double() + reference(5, ta, tb, gids)
    if acc_dtype == torch.float64:
        # ext: fp64 accumulation. torch fallback: fp64 casts + dot. Either way ~1e-15 relative.
        tol = 1e-13 * (1 + abs_scale(5, ta, tb, gids))
    else:
        # ext: fp64 accumulation, one rounding to fp32; fallback: fp32 dot products.
        tol = (1e-6 if backend == "ext" else 1e-5) * (1 + abs_scale(5, ta, tb, gids) + start.double().abs())
    assert torch.all((acc.double() - want).abs() <= tol), (acc.double() - want, tol)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_list_and_empty_tensors_are_no_ops(backend):
    acc = torch.tensor([1.5, -2.0], dtype=torch.float64)
    ops.dot_accumulate_(acc, [], [], [])
    ops.dot_accumulate_(acc, [torch.empty(0), torch.empty(2, 0, dtype=torch.bfloat16)],
                        [torch.empty(0, dtype=torch.float16), torch.empty(2, 0)], [0, 1])
    assert acc.tolist() == [1.5, -2.0]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_one_element_and_special_values(backend):
    acc = torch.zeros(3, dtype=torch.float64)
    a = [torch.tensor([3.0], dtype=torch.float16), torch.tensor([2.0 ** -24], dtype=torch.float16),
         torch.tensor([-0.5], dtype=torch.bfloat16), torch.tensor([float("inf")])]
    b = [torch.tensor([-2.0]), torch.tensor([2.0 ** 20], dtype=torch.bfloat16),
         torch.tensor([4.0], dtype=torch.float16), torch.tensor([1.0])]
    ops.dot_accumulate_(acc, a, b, [0, 1, 1, 2])
    assert acc.tolist() == [-6.0, 2.0 ** -4 - 2.0, float("inf")]  # fp16 subnormal read exactly


@needs_ext
def test_extension_is_deterministic_across_thread_counts():
    ta, tb, gids = random_pairs(5, max_numel=200001)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            acc = torch.zeros(5, dtype=torch.float64)
            ops._extension.module_for("cpu").dot_accumulate_(acc, ta, tb, gids)
            results.append(acc.tolist())
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


@needs_ext
def test_auto_backend_dispatches_to_the_extension(monkeypatch):
    real = _extension.module_for("cpu")
    calls = []

    def spy(*args):
        calls.append(len(args[1]))
        return real.dot_accumulate_(*args)

    monkeypatch.setitem(_extension._loaded, "cpu", SimpleNamespace(dot_accumulate_=spy))
    monkeypatch.setattr(ops.dot_accumulate, "_backend", "auto")
    acc = torch.zeros(2, dtype=torch.float64)
    ops.dot_accumulate_(acc, (torch.ones(3), torch.ones(2)), (torch.ones(3), torch.ones(2)), torch.tensor([1, 0]))
    assert calls == [2] and acc.tolist() == [2.0, 3.0]
    # fp16 acc: fallback
    ops.dot_accumulate_(torch.zeros(1, dtype=torch.float16), [torch.ones(3)], [torch.ones(3)], [0])
    ops.set_backend("torch")
    ops.dot_accumulate_(acc, [torch.ones(3)], [torch.ones(3)], [0])
    assert calls == [2] and acc.tolist() == [5.0, 3.0]


def _bad_inputs():
    one = torch.ones(3)
    return {
        "length": (ValueError, "same length", torch.zeros(2, dtype=torch.float64), [one, one], [one], [0, 0]),
        "shape": (ValueError, "shapes differ", torch.zeros(2, dtype=torch.float64), [one], [torch.ones(1, 3)], [0]),
        "device": (ValueError, "devices differ", torch.zeros(2, dtype=torch.float64), [one],
                   [torch.empty(3, device="meta")], [0]),
        "int dtype": (TypeError, "int", torch.zeros(2, dtype=torch.float64), [torch.ones(3, dtype=torch.int64)],
                      [torch.ones(3, dtype=torch.int64)], [0]),
        "group high": (IndexError, "out of range", torch.zeros(2, dtype=torch.float64), [one], [one], [2]),
        "group negative": (IndexError, "out of range", torch.zeros(2, dtype=torch.float64), [one], [one], [-1]),
        "acc 2-D": (ValueError, "1-D", torch.zeros(2, 2, dtype=torch.float64), [one], [one], [0]),
    }


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_clear_errors(backend, case):
    exc, words, acc, ta, tb, gids = _bad_inputs()[case]
    before = acc.clone()
    with pytest.raises(exc, match=f"(?i){words}"):
        ops.dot_accumulate_(acc, ta, tb, gids)
    assert torch.equal(acc, before)  # validation happens before any accumulation


@needs_ext
def test_extension_rejects_unsupported_acc_dtype(monkeypatch):
    monkeypatch.setattr(ops.dot_accumulate, "_backend", "ext")
    with pytest.raises(TypeError, match="acc must be float32 or float64"):
        ops.dot_accumulate_(torch.zeros(1, dtype=torch.float16), [torch.ones(3)], [torch.ones(3)], [0])


def test_set_backend_validates():
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.set_backend("cuda")
    assert ops.get_backend() in ops.BACKENDS


def _python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_no_ext_env_falls_back_and_warns_once():
    code = ("import torch, fastgeffect.ops as ops\n"
            "assert not ops.extension_available()\n"
            "acc = torch.zeros(1, dtype=torch.float64)\n"
            "for _ in range(3): ops.dot_accumulate_(acc, [torch.ones(4)], [torch.ones(4)], [0])\n"
            "assert acc.item() == 12.0\n"
            "ops.set_backend('ext')\n"
            "try:\n    ops.dot_accumulate_(acc, [], [], [])\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    r = _python(code, FASTGEFFECT_NO_EXT="1", FASTGEFFECT_OPS_BACKEND="auto")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("using the torch fallback") == 1 and "FASTGEFFECT_NO_EXT=1" in r.stderr
    assert "ERR" in r.stdout and "unavailable" in r.stdout


def test_backend_env_variable():
    r = _python("import fastgeffect.ops as ops; print(ops.get_backend())", FASTGEFFECT_OPS_BACKEND="torch")
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr
    r = _python("import fastgeffect.ops", FASTGEFFECT_OPS_BACKEND="fast")
    assert r.returncode != 0 and "unknown ops backend 'fast'" in r.stderr


def test_built_extension_loads():
    """A build that produced the module must also import (catches ABI/linking breakage); set
    FASTGEFFECT_NO_EXT=1 to run without compiled ops on purpose."""
    if os.environ.get("FASTGEFFECT_NO_EXT") == "1":
        pytest.skip("FASTGEFFECT_NO_EXT=1: compiled ops disabled on purpose")
    built = list((ROOT / "fastgeffect").glob("_C.*.so")) + list((ROOT / "fastgeffect").glob("_C.*.pyd"))
    if not built:
        pytest.skip("fastgeffect._C not built in this checkout (pip install --no-build-isolation -e .)")
    assert HAS_EXT, _extension.load_error("cpu")


def test_backend_info_reports_cpu_and_cuda():
    info = ops.backend_info()
    assert set(info) == {"cpu", "cuda"}
    for entry in info.values():
        assert entry["loaded"] == (entry["reason"] is None)
    assert info["cpu"]["loaded"] == HAS_EXT
    assert info["cuda"]["loaded"] == ops.extension_available("cuda")
    assert info["cuda"]["gpu_visible"] == torch.cuda.is_available() and info["cuda"]["torch_cuda"] == torch.version.cuda


def test_cuda_arch_list_defaults_to_a100_and_h100():
    assert build_config.cuda_arch_list({}) == "8.0;9.0+PTX"
    assert build_config.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": " "}) == "8.0;9.0+PTX"
    assert build_config.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}) == "8.6"


def test_nvcc_release_is_parsed():
    out = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert build_config.nvcc_release(out) == "13.0"
    assert build_config.nvcc_release("garbage") is None


@pytest.mark.parametrize("torch_cuda, nvcc, problem", [
    (None, "13.0", "CPU build"), ("12.8", None, "nvcc not found"), ("12.8", "13.0", "major version"),
    ("12.8", "12.4", None), ("13.0", "13.0", None)])
def test_cuda_build_problem(torch_cuda, nvcc, problem):
    """A major mismatch makes torch abort the whole build: the CUDA part is skipped with a reason."""
    got = build_config.cuda_build_problem(torch_cuda, nvcc)
    assert (got is None) if problem is None else (problem in got)


# setup.py run as under a CUDA torch whose own build-wide check fails (as with nvcc 13 and a cu12 wheel)
FAILING_CUDA_BUILD = """
import os, runpy, sys, torch, torch.utils.cpp_extension as ce
torch.version.cuda = "13.0"
ce.CUDA_HOME = "{cuda_home}"
def check(*a):
    raise RuntimeError("simulated CUDA version mismatch")
ce._check_cuda_version = check
sys.argv = ["setup.py", "build_ext", "-b", "{out}", "-t", "{out}/tmp"]
runpy.run_path("setup.py", run_name="__main__")
print("ARCH", os.environ["TORCH_CUDA_ARCH_LIST"])
"""


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None, reason="needs nvcc and a C++ compiler")
def test_failed_cuda_build_step_still_builds_the_cpu_extension(tmp_path):
    """torch checks nvcc for the whole build step, outside any one extension: when that fails,
    setup.py says so once and builds ``_C`` alone; the arch list defaults to A100 + H100."""
    cuda_home = str(Path(shutil.which("nvcc")).resolve().parents[1])
    code = FAILING_CUDA_BUILD.format(cuda_home=cuda_home, out=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FASTGEFFECT_NO_EXT")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("retrying without CUDA") == 1 and "simulated CUDA version mismatch" in r.stdout
    assert "ARCH 8.0;9.0+PTX" in r.stdout
    assert list((tmp_path / "fastgeffect").glob("_C.*")) and not list((tmp_path / "fastgeffect").glob("_C_cuda.*"))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build)], ["cmake", "--build", str(build), "-j2"],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "dot_core" in r.stdout
    if shutil.which("nvcc"):  # CUDA kernel and its test were compiled (they run only with a GPU)
        assert (build / "test_dot_cuda").exists()


# -- CUDA ------------------------------------------------------------------------------------------

@pytest.mark.skipif(NO_CUDA, reason="no CUDA device")
def test_cuda_extension_built_where_torch_has_cuda():
    assert ops.extension_available("cuda"), _extension.load_error("cuda")


@pytest.mark.skipif(NO_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["ext", "torch"], indirect=True)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_cuda_matches_float64_reference(backend, acc_dtype):
    ta, tb, gids = random_pairs(3, device="cuda", n_pairs=150, max_numel=3 * (1 << 17) + 7)
    acc = torch.zeros(5, dtype=acc_dtype, device="cuda")
    ops.dot_accumulate_(acc, ta, tb, gids)
    cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
    want = reference(5, cpu(ta), cpu(tb), gids)
    scale = abs_scale(5, cpu(ta), cpu(tb), gids)
    tol = (1e-12 if acc_dtype == torch.float64 else 1e-5) * (1 + scale)
    assert torch.all((acc.double().cpu() - want).abs() <= tol)


@pytest.mark.skipif(NO_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["ext"], indirect=True)
def test_cuda_unaligned_views_and_streams(backend):
    base_a = torch.randn(100003, device="cuda", dtype=torch.bfloat16)
    base_b = torch.randn(100005, device="cuda")
    a, b = base_a[1:], base_b[3:]  # odd element offsets, 100002 each: unaligned, the scalar path
    assert a.shape == b.shape
    acc = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    # Outside the side stream's context: inside it, current_stream() *is* the side stream and the
    # wait would order nothing after the default stream that wrote the inputs.
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.dot_accumulate_(acc, [a], [b], [0])
    torch.cuda.current_stream().wait_stream(side)
    want = (a.double() * b.double()).sum()
    assert abs(acc.double().item() - want.item()) <= 1e-5 * (1 + (a.double() * b.double()).abs().sum().item())


@pytest.mark.parametrize("device, want", [("cpu", torch.float64), ("cuda", torch.float64), ("cuda:1", torch.float64),
                                          ("mps", torch.float32)])
def test_default_accumulate_dtype_is_fp64_on_cpu_and_cuda(device, want):
    """fp64 on CUDA too (docs/design.md §4.1); fp32 only where the device has no fp64."""
    assert default_accumulate_dtype(torch.device(device)) == want
    assert default_accumulate_dtype(torch.device(device), torch.float32) == torch.float32
    with pytest.raises(ValueError, match="accumulate_dtype"):
        default_accumulate_dtype(torch.device(device), torch.bfloat16)


# -- G-effect engine on both backends --------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_engine_ga_identity(backend, monkeypatch):
    """GA on the same batch: unlearning G-effect = -||∇R||² (docs/design.md §4), R = token-mean NLL."""
    engine = pytest.importorskip("fastgeffect.geffect.engine", reason="G-effect engine not in this checkout")

    calls = []
    if backend == "ext":  # prove the compiled op did the accumulation
        real = _extension.module_for("cpu")
        monkeypatch.setitem(_extension._loaded, "cpu", SimpleNamespace(
            dot_accumulate_=lambda *a: (calls.append(1), real.dot_accumulate_(*a))[1]))
    model = tiny_llama(seed=1, layers=3)
    batch = qa_batch(4, b=3, t=9)

    def nll():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)

    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(nll(), params)
    norm2 = math.fsum(float((g.double() ** 2).sum()) for g in grads)

    model.zero_grad()
    (-nll()).backward()  # GA objective gradient in p.grad
    stashed = [p.grad.clone() for p in params]
    res = engine.GEffect(model).measure({"unlearn": nll})["unlearn"]
    assert res.total == pytest.approx(-norm2, rel=1e-9)
    assert math.fsum(res.groups.values()) == pytest.approx(res.total, rel=1e-12)
    assert all(torch.equal(p.grad, s) for p, s in zip(params, stashed))  # objective gradient restored
    assert (len(calls) > 0) == (backend == "ext")
