"""Registration and dispatch (``ops/registry.py``): which implementation an op runs, and what
``ADALORA_FAST_BACKEND`` may force."""

from __future__ import annotations

import os

import pytest
import torch

from adalora_fast import ops
from adalora_fast.ops import registry


def test_default_implementation_by_device(monkeypatch):
    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    assert registry.forced_impl() == ""
    assert registry.impl_for(torch.device("cpu")) == "torch"
    assert registry.impl_for(torch.device("cuda")) == "triton"
    assert ops.backend_name("cpu") == "torch"


@pytest.mark.parametrize("name", registry.IMPLS)
def test_a_forced_implementation_wins_on_every_device(monkeypatch, name):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", f" {name.upper()} ")  # read case- and space-insensitively
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.forced_impl() == name
    for dev in ("cpu", "cuda"):
        assert registry.impl_for(torch.device(dev)) == name


def test_the_backend_switch_follows_every_way_of_writing_the_environment(monkeypatch):
    """forced_impl reads os.environ's own dict (no Python frames per layer call): every write through
    os.environ shows at the next read, and an unset variable reads as no forced backend."""
    from unittest import mock

    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    assert registry.forced_impl() == ""
    os.environ["ADALORA_FAST_BACKEND"] = "reference"
    try:
        assert registry.forced_impl() == "reference"
    finally:
        del os.environ["ADALORA_FAST_BACKEND"]
    assert registry.forced_impl() == ""
    with mock.patch.dict(os.environ, {"ADALORA_FAST_BACKEND": "Torch"}):
        assert registry.forced_impl() == "torch"
    assert registry.forced_impl() == ""
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "")  # set but empty: not forced
    assert registry.forced_impl() == ""
    os.environ.update(ADALORA_FAST_BACKEND="bogus")
    try:
        with pytest.raises(ValueError, match="ADALORA_FAST_BACKEND='bogus'"):
            registry.forced_impl()
    finally:
        os.environ.pop("ADALORA_FAST_BACKEND")


def test_an_unknown_backend_name_raises_naming_the_variable(monkeypatch):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ADALORA_FAST_BACKEND='cuda': expected one of reference, torch, triton"):
        registry.impl_for(torch.device("cpu"))


def test_forced_triton_on_the_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        registry.impl_for(torch.device("cpu"))
    assert registry.impl_for(torch.device("cuda")) == "triton"


def test_every_op_has_a_cpu_and_a_cuda_kernel():
    for name in (
        "adapter_linear",
        "adapter_linear_backward",
        "importance_update",
        "triplet_scores",
        "keep_mask_to_budget",
        "apply_mask",
        "orth_penalty",
        "orth_penalty_backward",
    ):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adalora_fast::{name}", key), (name, key)


def test_no_autocast_turns_autocast_off_inside_an_implementation():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with registry.no_autocast(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
