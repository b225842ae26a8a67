# The package metadata lives in pyproject.toml; setup.py only maps the top-level `kernels/`
# directory into the package as `adalora_fast.kernels` (the design card keeps Triton kernels
# at the top level, the import path keeps them inside the package).
from setuptools import setup

setup(
    packages=["adalora_fast", "adalora_fast.ops", "adalora_fast.kernels"],
    package_dir={"adalora_fast.kernels": "kernels"},
)
