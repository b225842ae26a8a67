"""Test set-up: no GPU here, so Triton runs in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
