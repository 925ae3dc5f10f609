"""Install fastgeffect.

The compiled extension (``csrc/``) is optional: the package falls back to plain torch when it
is absent. Build without it with ``FASTGEFFECT_NO_EXT=1``.
"""
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

setup(
    name="fastgeffect",
    version="0.1.0",
    description="Fast G-effect analysis and unlearning objectives for LLMs (ICLR 2025, Wang et al.)",
    packages=find_packages(include=["fastgeffect", "fastgeffect.*"]),
    package_data={"fastgeffect": ["resources/*"]},
    python_requires=">=3.9",
    install_requires=install_requires,
    extras_require=extras_require,
)
