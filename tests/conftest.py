"""Test set-up: no GPU here, so Triton runs in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.

Fixtures:
* ``use_backend(name)`` forces one implementation ("reference", "torch" or "triton") for the test;
* ``impl`` runs a test once per real implementation of the ops on the CPU: "torch" (torch ops
  only, ``ADALORA_FAST_CPU_EXT=0``), "cpp" (torch with the C++ kernels, which must build), and
  "triton" (the Triton kernels under the interpreter). Compare each with ``reference.py``, never
  the reference with itself.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REAL_IMPLS = ("torch", "cpp", "triton")


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    # Each test chooses its backend explicitly; an ADALORA_FAST_BACKEND from the shell must not leak in.
    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    yield


@pytest.fixture
def use_backend(monkeypatch):
    def _set(name: str):
        monkeypatch.setenv("ADALORA_FAST_BACKEND", name)

    return _set


def set_impl(monkeypatch, name: str) -> None:
    """Force one real implementation ("torch", "cpp" or "triton") for the rest of the test."""
    from adalora_fast.ops import cpu_ext

    if name == "cpp":
        monkeypatch.setenv("ADALORA_FAST_BACKEND", "torch")
        monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "1")
        assert cpu_ext.available(), f"the C++ CPU kernels did not build: {cpu_ext._state['error']}"
    else:
        monkeypatch.setenv("ADALORA_FAST_BACKEND", name)
        monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")


@pytest.fixture(params=REAL_IMPLS)
def impl(request, monkeypatch):
    set_impl(monkeypatch, request.param)
    return request.param
