"""Ahead-of-time compilation of every Triton kernel variant the package launches, for one GPU
architecture, without a GPU (tests/test_kernels_compile.py runs this file in a subprocess,
without TRITON_INTERPRET).

The variants come from the package's own launch functions (``token_weighted_launch``,
``kl_launch``: arguments, dtypes, ``BLOCK_V``, ``num_warps``), called with meta tensors for every
input the public API accepts; Triton's launch binder turns each call into the signature,
constants and specialisation attributes (16-divisibility of pointers, strides and the vocab size)
that a real launch would compile, and the distinct ones are compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. ptxas's ``-v`` log of each
compile gives registers and spills. Usage: ``python aot_compile.py ARCH OUT.json``.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

# the embedded targets' vocabularies (the models the package ships) and real models' ones
EMBEDDED_VOCABS = {"embedded-tiny": 1024, "embedded-default": 2048}
MODEL_VOCABS = {"llama2": 32000, "smollm2": 49152, "gpt2": 50257, "phi-1.5": 51200, "llama3": 128256,
                "qwen2": 151936}
LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the Triton kernels' logits (fp64: torch path)
PER_TOKEN_DTYPES = LOGIT_DTYPES + (torch.float64,)  # reference log-probs, weights: any float (check_per_token)
LABEL_DTYPES = (torch.int64, torch.int32)  # check_labels accepts both
ROWS = 8
UNSUPPORTED_TRITON = 3  # exit status: this Triton cannot compile here as a launch would (the test skips)

Launch = Tuple[str, str, object, tuple, dict]  # kernel name, variant label, kernel, args, compile-time params


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # data_ptr() is 0: aligned like every buffer the fused losses allocate
    return torch.empty(shape, dtype=dtype, device="meta")


def short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def token_weighted_launches(vocab: int) -> Iterator[Launch]:
    from fastgeffect.kernels import token_weighted_triton as twt
    from fastgeffect.losses import token_weights as tw

    names = {e.code: e.name for e in tw.ALL}
    names[tw.WTNPO_PRODUCT.code] = "wtnpo-product"
    for dtype, labels, entry, grad in itertools.product(LOGIT_DTYPES, LABEL_DTYPES, tw.ALL, (True, False)):
        for per_token in PER_TOKEN_DTYPES if entry.needs_ref or entry.needs_explicit else (None,):
            ref = meta(ROWS, dtype=per_token) if entry.needs_ref else None
            explicit = meta(ROWS, dtype=per_token) if entry.needs_explicit else None
            args, params = twt.token_weighted_launch(meta(ROWS, vocab, dtype=dtype), meta(ROWS, dtype=labels), ref,
                                                     explicit, meta(), meta(ROWS), meta(ROWS), entry, 1.0, 1.0, grad)
            label = f"{short(dtype)} {names[entry.code]}{' grad' if grad else ''}"
            yield "token_weighted", label, twt._token_weighted_rows, args, params


def kl_launches(vocab: int) -> Iterator[Launch]:
    from fastgeffect.kernels import kl_triton

    # the reference model may have another dtype than the trained one (fused_linear_kl)
    for q, r, reverse, grad in itertools.product(LOGIT_DTYPES, LOGIT_DTYPES, (False, True), (True, False)):
        args, params = kl_triton.kl_launch(meta(ROWS, vocab, dtype=q), meta(ROWS, vocab, dtype=r), meta(),
                                           meta(ROWS), reverse, grad)
        label = f"{short(q)}|ref {short(r)} {'reverse' if reverse else 'forward'}{' grad' if grad else ''}"
        yield "kl", label, kl_triton._kl_rows, args, params


def specialise(kernel, args: tuple, params: dict, backend) -> Tuple[dict, dict, dict, object]:
    """(signature, constants, attributes, options) exactly as ``JITFunction.run`` computes them for
    this launch (Triton 3.9: the binder, then ``_pack_args``), without a driver."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    params = dict(params, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **params)
    options, signature, constants, attrs = kernel._pack_args(backend, params, bound, specialization, options)
    return signature, constants, attrs, options


def vocab_class(kernel, attrs: dict) -> str:
    """How the launch specialised on the vocab size: 16-divisible or not (decides vector loads)."""
    v = kernel.arg_names.index("V")
    return "V%16=0" if ["tt.divisibility", 16] in attrs.get((v,), []) else "V%16!=0"


def unusual_pointers(signature: dict) -> List[str]:
    """Pointer arguments of another dtype than the launch functions normally pass (logits are in
    the label already), so that two variants never share a label."""
    usual = {"labels_ptr": "*i64"}  # every other pointer: fp32
    return [f"{k[:-4]}={v[1:]}" for k, v in signature.items()
            if v.startswith("*") and k not in ("logits_ptr", "q_ptr", "r_ptr") and v != usual.get(k, "*fp32")]


def ptxas_usage(log: str) -> Dict[str, int]:
    """Registers and spill bytes from a ``ptxas -v`` log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise ValueError(f"no register/spill line in the ptxas log:\n{log}")
    return {"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def variants(backend) -> List[dict]:
    """The distinct compiles: one per (kernel, signature, constants, attributes, options), with the
    vocabularies that launch it."""
    seen: Dict[str, dict] = {}
    for name, vocab in {**EMBEDDED_VOCABS, **MODEL_VOCABS}.items():
        for kernel_name, label, kernel, args, params in itertools.chain(token_weighted_launches(vocab),
                                                                        kl_launches(vocab)):
            sig, constants, attrs, options = specialise(kernel, args, params, backend)
            key = json.dumps([kernel_name, sig, repr(sorted(constants.items())), repr(sorted(attrs.items())),
                              options.num_warps, options.num_stages])
            if key not in seen:
                config = (f"BLOCK_V={params['BLOCK_V']} warps={options.num_warps} stages={options.num_stages} "
                          f"{vocab_class(kernel, attrs)}")
                seen[key] = {"kernel": kernel_name, "function": kernel.fn.__name__,
                             "variant": " ".join([label, *unusual_pointers(sig), config]),
                             "vocabs": [], "src": (kernel, sig, constants, attrs, options)}
            if name not in seen[key]["vocabs"]:
                seen[key]["vocabs"].append(name)
    return list(seen.values())


def compile_variant(src, target) -> Tuple[Optional[Dict[str, int]], Optional[str]]:
    import triton
    from triton.compiler import ASTSource

    kernel, sig, constants, attrs, options = src
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints ptxas's log
            compiled = triton.compile(ASTSource(kernel, sig, constants, attrs), target=target,
                                      options=options.__dict__)
        if "cubin" not in compiled.asm:
            return None, "no cubin produced"
        return ptxas_usage(log.getvalue()), None
    except Exception as e:  # noqa: BLE001 - every failing variant is reported, not only the first
        return None, f"{type(e).__name__}: {e}"[-3000:]


def unsupported(arch: int) -> Optional[str]:
    """Why this Triton cannot compile the variants here, or None."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} lacks the launch binder of Triton 3.9 that this helper mirrors"
    try:
        get_ptxas(arch)  # the knob raises when the binary is absent
    except RuntimeError as e:  # "Cannot find ptxas"
        return f"Triton's ptxas for sm_{arch} is missing: {e}"
    return None


def main(arch: int, out: str) -> None:
    problem = unsupported(arch)
    if problem:
        print(problem)
        sys.exit(UNSUPPORTED_TRITON)
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    rows = []
    for v in variants(backend):
        t0 = time.perf_counter()
        usage, error = compile_variant(v.pop("src"), target)
        rows.append({**v, "arch": arch, **(usage or {}), "error": error,
                     "seconds": round(time.perf_counter() - t0, 3)})
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
