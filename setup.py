# Package metadata lives in pyproject.toml. setup.py maps the top-level `kernels/` (Triton) into
# the package as `adalora_fast.kernels`, and ships the C++ sources of `csrc/` as package data
# (`adalora_fast/csrc/`), built on first use by torch.utils.cpp_extension.
from setuptools import setup

setup(
    packages=["adalora_fast", "adalora_fast.ops", "adalora_fast.kernels", "adalora_fast.csrc"],
    package_dir={"adalora_fast.kernels": "kernels", "adalora_fast.csrc": "csrc"},
    package_data={"adalora_fast.csrc": ["*.cpp", "*.md"]},
)
