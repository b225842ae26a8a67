# Package metadata lives in pyproject.toml. setup.py maps the Triton kernels of `kernels/triton_ops/`
# into the package as `adalora_fast.kernels`, and ships the C++ sources of `csrc/` as package data
# (`adalora_fast/csrc/`), built on first use by torch.utils.cpp_extension.
#
# `kernels/` itself has no `__init__.py` on purpose: `python -m pytest` and `python -m bench` put the
# repository root first on sys.path, and a regular package named `kernels` there would shadow
# Hugging Face's `kernels` (which transformers imports). A folder without `__init__.py` is only a
# namespace portion, which the import system passes over for an installed regular package.
from setuptools import setup

setup(
    packages=["adalora_fast", "adalora_fast.ops", "adalora_fast.kernels", "adalora_fast.csrc"],
    package_dir={"adalora_fast.kernels": "kernels/triton_ops", "adalora_fast.csrc": "csrc"},
    package_data={"adalora_fast.csrc": ["*.cpp", "*.md"]},
)
