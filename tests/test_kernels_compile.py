"""The interpreter is lenient (it runs the kernels as numpy); this compiles every kernel variant
to a cubin for sm_90 with Triton's own toolchain, no GPU needed, so a kernel that
would fail to compile on a real GPU fails here. Runs in a subprocess without TRITON_INTERPRET."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastgeffect.kernels.token_weighted_triton import _token_weighted_rows
    from fastgeffect.kernels.kl_triton import _kl_rows

    wsig = {"logits_ptr": "*bf16", "stride_row": "i64", "labels_ptr": "*i64", "ref_ptr": "*fp32",
            "explicit_ptr": "*fp32", "scale_ptr": "*fp32", "logp_ptr": "*fp32", "wlogp_ptr": "*fp32",
            "V": "i32", "alpha": "fp32", "beta": "fp32",
            "CODE": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr"}
    ksig = {"q_ptr": "*bf16", "stride_q": "i64", "r_ptr": "*fp16", "stride_r": "i64", "scale_ptr": "*fp32",
            "kl_ptr": "*fp32", "V": "i32", "REVERSE": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr"}
    n = 0
    for arch in (90,):
        target = GPUTarget("cuda", arch, 32)
        for code, grad in [(c, True) for c in range(7)] + [(0, False)]:
                src = ASTSource(_token_weighted_rows, wsig, {"CODE": code, "WRITE_GRAD": grad, "BLOCK_V": 4096})
                assert "cubin" in triton.compile(src, target=target).asm
                n += 1
        for rev in (True, False):
            src = ASTSource(_kl_rows, ksig, {"REVERSE": rev, "WRITE_GRAD": True, "BLOCK_V": 4096})
            assert "cubin" in triton.compile(src, target=target).asm
            n += 1
    print("compiled", n)
""")


def test_kernels_compile_for_gpu_targets():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 10" in proc.stdout
