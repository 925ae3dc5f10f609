"""GPU code compiled ahead of time, without a GPU (docs/design.md §10).

Triton's interpreter is lenient (it runs the kernels as numpy), so a type or lowering error in a
kernel would first show on a user's GPU. Here every Triton kernel, in every variant the package
launches (tests/helpers/aot_compile.py builds them from the package's own launch functions), is
compiled to a cubin for sm_80 (A100) and sm_90 (H100/H200) with Triton's toolchain, in one
subprocess per architecture without TRITON_INTERPRET; ptxas's registers and spills are printed
per variant (``pytest -s``) and a spill fails unless allowed below with its reason. The CUDA
extension's sources are compiled with nvcc for the architectures setup.py builds by default.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers.aot_compile import EMBEDDED_VOCABS, MODEL_VOCABS, UNSUPPORTED_TRITON, ptxas_usage

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
# (kernel, variant, arch) -> why its spills are accepted. Empty: no variant spills today; a new one
# that does is a failure until its launch configuration (launch_config) is fixed or it is listed here.
SPILL_ALLOWED: Dict[Tuple[str, str, int], str] = {}
COLUMNS = ("kernel", "variant", "arch", "regs", "spill stores", "spill loads", "used for")


def table(rows: List[dict]) -> str:
    cells = [COLUMNS] + [(r["kernel"], r["variant"], f"sm_{r['arch']}", str(r.get("regs", "-")),
                          str(r.get("spill_stores", "-")), str(r.get("spill_loads", "-")),
                          r.get("error") or ",".join(r.get("vocabs", []))) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells)


def summary(rows: List[dict]) -> str:
    lines = []
    for kernel in sorted({r["kernel"] for r in rows}):
        for arch in ARCHS:
            mine = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch and r.get("error") is None]
            if mine:
                regs = [r["regs"] for r in mine]
                spilled = sum(1 for r in mine if r["spill_stores"] or r["spill_loads"])
                lines.append(f"{kernel} sm_{arch}: {len(mine)} variants, {min(regs)}-{max(regs)} registers, "
                             f"{spilled} spilling, {sum(r['seconds'] for r in mine):.0f} s of compiles")
    return "\n".join(lines)


def triton_kernels_in_package() -> set:
    """The name of every ``@triton.jit`` function under fastgeffect/."""
    names = set()
    for path in (ROOT / "fastgeffect").rglob("*.py"):
        names |= set(re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)", path.read_text()))
    return names


@pytest.fixture(scope="module")
def triton_rows(tmp_path_factory) -> List[dict]:
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = ROOT / "tests" / "helpers" / "aot_compile.py"
    procs = {arch: subprocess.Popen([sys.executable, str(script), str(arch), str(tmp / f"sm{arch}.json")], env=env,
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in ARCHS}  # one per architecture, in parallel
    try:
        outs = {arch: proc.communicate(timeout=1800)[0] for arch, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = []
    for arch, proc in procs.items():
        out = outs[arch]
        if proc.returncode == UNSUPPORTED_TRITON:
            pytest.skip(out.strip()[-1000:])
        assert proc.returncode == 0, f"sm_{arch} compile helper failed:\n{out[-5000:]}"
        rows += json.loads((tmp / f"sm{arch}.json").read_text())
    return rows


@pytest.mark.slow
def test_every_triton_kernel_variant_compiles_for_sm80_and_sm90(triton_rows):
    kernels = {r["function"] for r in triton_rows}
    missing = triton_kernels_in_package() - kernels
    assert not missing, f"@triton.jit kernels not compiled ahead of time: {sorted(missing)}; add their launches " \
        "to tests/helpers/aot_compile.py"
    assert {r["arch"] for r in triton_rows} == set(ARCHS)
    for arch in ARCHS:  # both architectures compile the same variants
        assert sorted(r["variant"] for r in triton_rows if r["arch"] == arch) == \
            sorted(r["variant"] for r in triton_rows if r["arch"] == ARCHS[0])
    failed = [r for r in triton_rows if r["error"] is not None]
    assert not failed, f"{len(failed)} variants failed to compile:\n{table(failed)}"
    # every objective, KL direction, logits dtype, with and without gradient, and both vocab classes
    variants = " ".join(r["variant"] for r in triton_rows)
    from fastgeffect.losses.token_weights import ALL
    for word in [e.name for e in ALL] + ["forward", "reverse", "bf16", "fp16", "fp32", "grad", "V%16=0", "V%16!=0"]:
        assert word in variants, word


@pytest.mark.slow
def test_no_triton_kernel_variant_spills_registers(triton_rows):
    report = f"{table(triton_rows)}\n\n{summary(triton_rows)}"
    print("\n" + report)
    assert all(r["regs"] > 0 for r in triton_rows if r["error"] is None), report
    spilling = [r for r in triton_rows if r.get("spill_stores") or r.get("spill_loads")]
    unexplained = [r for r in spilling if (r["kernel"], r["variant"], r["arch"]) not in SPILL_ALLOWED]
    assert not unexplained, f"{len(unexplained)} variants spill registers (fix launch_config or document them " \
        f"in SPILL_ALLOWED):\n{table(unexplained)}\n\nall variants:\n{report}"


def test_embedded_vocabularies_are_the_shipped_ones():
    """The compile helper lists the embedded targets' vocabulary sizes (importing the builder there
    would cost each subprocess seconds); they must be the ones the builder trains."""
    from fastgeffect.embedded.build import SIZES
    assert EMBEDDED_VOCABS == {f"embedded-{k}": c.tokenizer.vocab_size for k, c in SIZES.items()}


def test_ptxas_usage_reads_registers_and_spills():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\nptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 448 bytes cmem[0]\n")
    assert ptxas_usage(log) == {"regs": 255, "spill_stores": 20, "spill_loads": 12}
    with pytest.raises(ValueError, match="no register"):
        ptxas_usage("ptxas info    : 0 bytes gmem\n")


# --- the CUDA extension (csrc/): nvcc, compile only -------------------------------------------

CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "tests" / "cpp").glob("*.cu"))
NO_NVCC = "nvcc not found: the CUDA sources compile only where the CUDA toolkit is installed"


def nvcc_arch_flags() -> List[str]:
    """The -gencode flags torch's extension build gives nvcc for setup.py's default arch list."""
    from torch.utils import cpp_extension

    from fastgeffect.ops import build_config
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.cuda_arch_list({})
    try:
        return cpp_extension._get_cuda_arch_flags()
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def kernel_name(mangled: str) -> str:
    """'dot_accumulate_kernel<float>' from its mangled name (as is without c++filt)."""
    if shutil.which("c++filt") is None:
        return mangled
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    return name.split("(")[0].split("::")[-1]


def nvcc_usage(log: str, source: str) -> List[dict]:
    """Per kernel and architecture, registers and spills from nvcc's ``-Xptxas -v`` output."""
    rows = []
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log)[1:]:
        mangled, arch = re.search(r"entry function '([^']+)' for 'sm_(\d+)a?'", block).groups()
        rows.append({"kernel": kernel_name(mangled), "variant": source, "arch": int(arch), **ptxas_usage(block)})
    return rows


def test_default_cuda_build_targets_sm80_and_sm90():
    flags = " ".join(nvcc_arch_flags())
    assert "code=sm_80" in flags and "code=sm_90" in flags, flags


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NO_NVCC)
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    assert CUDA_SOURCES, "no .cu file found"
    # what torch's BuildExtension passes for setup.py's CUDAExtension (nvcc: -O3), plus ptxas's report
    flags = [*COMMON_NVCC_FLAGS, *nvcc_arch_flags(), "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
             f"-I{ROOT / 'csrc'}"]
    rows = []
    for src in CUDA_SOURCES:
        proc = subprocess.run(["nvcc", "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), *flags],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"nvcc failed on {src.relative_to(ROOT)}:\n{proc.stderr[-5000:]}"
        rows += nvcc_usage(proc.stdout + proc.stderr, str(src.relative_to(ROOT)))
    print("\n" + table(rows))
    assert {r["arch"] for r in rows} >= set(ARCHS), f"no kernel compiled for each of {ARCHS}:\n{table(rows)}"
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"CUDA kernels spill registers:\n{table(rows)}"


CUDA_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NO_NVCC)
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """csrc/bindings_cuda.cpp (the pybind11 binding of the CUDA op) includes c10/cuda headers. A CPU
    torch wheel ships them all but ``c10/cuda/impl/cuda_cmake_macros.h``, which torch's CUDA build
    generates from one line (``#cmakedefine C10_CUDA_BUILD_SHARED_LIBS``; torch is built shared):
    that header is written here when missing. The binding is type-checked (``-fsyntax-only``) by the
    host compiler, with nvcc as the driver for the CUDA include paths."""
    from torch.utils.cpp_extension import include_paths
    includes = [*include_paths(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]  # Python.h: pybind11
    if not any((Path(p) / CUDA_MACROS).exists() for p in include_paths()):
        (tmp_path / CUDA_MACROS).parent.mkdir(parents=True)
        (tmp_path / CUDA_MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path))
    cmd = ["nvcc", "-std=c++17", "-x", "c++", "-c", str(ROOT / "csrc" / "bindings_cuda.cpp"), "-o",
           str(tmp_path / "bindings_cuda.o"), "-Xcompiler", "-fsyntax-only", *(f"-I{p}" for p in includes),
           "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_launch_config_one_block_for_every_real_vocabulary():
    """Every vocabulary above SMALL_VOCAB shares one block size and warp count (one compiled variant
    per dtype and objective); tiny test vocabularies take their own power of two."""
    pytest.importorskip("triton")
    from fastgeffect.kernels.token_weighted_triton import MAX_BLOCK_V, SMALL_VOCAB, launch_config
    full = {"BLOCK_V": MAX_BLOCK_V, "num_warps": 8}
    for vocab in [SMALL_VOCAB + 1, *EMBEDDED_VOCABS.values(), *MODEL_VOCABS.values(), 262144]:
        assert launch_config(vocab) == full, vocab
    assert launch_config(SMALL_VOCAB) == {"BLOCK_V": SMALL_VOCAB, "num_warps": 4}
    assert launch_config(37) == {"BLOCK_V": 64, "num_warps": 4}


@pytest.mark.parametrize("case", ["embedded-tiny", "two-trips"])
def test_full_block_launch_matches_the_torch_chunk_ops(case):
    """The configuration real vocabularies launch (one 4096-column block on 8 warps): a vocabulary
    smaller than the block (3/4 of it masked) and one over two loop trips with a ragged tail give
    the torch chunk ops' log-probs, weighted log-probs, KL and logits gradients (fp32, TNPO and
    both KL directions). On a GPU this runs compiled, else through the interpreter."""
    pytest.importorskip("triton")
    import torch
    from helpers.devices import TRITON_DEVICE, to_device

    from fastgeffect.kernels.kl_torch import kl_chunk_torch
    from fastgeffect.kernels.kl_triton import kl_chunk_triton
    from fastgeffect.kernels.token_weighted_torch import token_weighted_chunk_torch
    from fastgeffect.kernels.token_weighted_triton import MAX_BLOCK_V, token_weighted_chunk_triton
    from fastgeffect.losses.token_weights import TNPO

    vocab = EMBEDDED_VOCABS[case] if case in EMBEDDED_VOCABS else MAX_BLOCK_V + 37
    gen = torch.Generator().manual_seed(vocab)
    C = 3
    logits, ref_logits = torch.randn(C, vocab, generator=gen) * 3, torch.randn(C, vocab, generator=gen) * 3
    labels = torch.tensor([0, vocab - 1, vocab // 2])  # first column, last (in the tail), middle
    ref, scale = -torch.rand(C, generator=gen) * 5, torch.tensor(0.5)

    def close(got, want):
        got = got.cpu().double()
        assert torch.allclose(got, want.double(), rtol=0, atol=1e-5 * (1 + want.abs().max().item())), \
            (got - want).abs().max()

    want_grad = logits.clone()
    want = token_weighted_chunk_torch(want_grad, labels, ref, None, scale, TNPO, 0.0, 2.0, True)
    got_grad, *args = to_device(TRITON_DEVICE, logits.clone(), labels, ref, None, scale)
    got = token_weighted_chunk_triton(got_grad, *args, TNPO, 0.0, 2.0, True)
    for g, w in zip((*got, got_grad), (*want, want_grad)):
        close(g, w)
    for reverse in (False, True):
        want_grad = logits.clone()
        want = kl_chunk_torch(want_grad, ref_logits, scale, reverse, True)
        got_grad, ref_dev, scale_dev = to_device(TRITON_DEVICE, logits.clone(), ref_logits, scale)
        close(kl_chunk_triton(got_grad, ref_dev, scale_dev, reverse, True), want)
        close(got_grad, want_grad)
