"""Install fastgeffect.

The compiled extension (``csrc/``) is optional: the package falls back to plain torch when it
is absent. Build without it with ``FASTGEFFECT_NO_EXT=1``.
"""
import os

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "transformers>=4.46",
    "datasets",
    "accelerate",
    "tokenizers",
    "numpy",
    "scipy",
    "rouge-score",
    "matplotlib",
    "tqdm",
    "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

extras_require = {
    "test": ["pytest", "hypothesis", "pytest-benchmark", "peft"],
    "peft": ["peft"],
}


def compiled_extensions():
    """``fastgeffect._C`` (CPU, C++) everywhere; ``fastgeffect._C_cuda`` where torch has CUDA and
    nvcc is found. Opt out with ``FASTGEFFECT_NO_EXT=1`` (all) or ``FASTGEFFECT_NO_CUDA_EXT=1``.
    The extensions are ``optional``: a failed compile is reported and the package installs
    with the torch fallback."""
    if os.environ.get("FASTGEFFECT_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not importable at build time (build isolation): pure-python install
        return [], {}
    cxx = ["-O3"]
    exts = [CppExtension("fastgeffect._C", ["csrc/bindings.cpp", "csrc/dot_core.cpp"],
                         extra_compile_args={"cxx": cxx})]
    if torch.version.cuda and CUDA_HOME and os.environ.get("FASTGEFFECT_NO_CUDA_EXT") != "1":
        exts.append(CUDAExtension("fastgeffect._C_cuda", ["csrc/bindings_cuda.cpp", "csrc/dot_cuda.cu"],
                                  extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}))
    for ext in exts:
        ext.optional = True
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = compiled_extensions()

setup(
    name="fastgeffect",
    version="0.1.0",
    description="Fast G-effect analysis and unlearning objectives for LLMs (ICLR 2025, Wang et al.)",
    packages=find_packages(include=["fastgeffect", "fastgeffect.*"]),
    package_data={"fastgeffect": ["resources/*"]},
    python_requires=">=3.9",
    install_requires=install_requires,
    extras_require=extras_require,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
