"""The C++ CPU dropout kernel (csrc/, ``torch.ops.adalora_fast_cpu``) directly, against the reference
and against the pure-torch path."""

import math

import pytest
import torch
from conftest import set_impl

import adalora_fast.reference as ref
from adalora_fast import ops
from adalora_fast.ops import cpu_ext
from tolerances import assert_close


@pytest.fixture(scope="module")
def ext():
    assert cpu_ext.available(), f"the C++ CPU kernel did not build: {cpu_ext._state['error']}"
    return torch.ops.adalora_fast_cpu


def _layer(N, k, d, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, k, generator=g, requires_grad=True)
    W, b = torch.randn(d, k, generator=g), torch.randn(d, generator=g)
    A = torch.randn(r, k, generator=g, requires_grad=True)
    E = torch.randn(r, 1, generator=g, requires_grad=True)
    B = torch.randn(d, r, generator=g, requires_grad=True)
    return x, W, b, A, E, B


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("shape", [(1, 7, 5, 1), (37, 29, 23, 6), (64, 80, 48, 12)])
def test_dropout_layer_matches_reference_with_its_own_mask(shape, path, monkeypatch, ext):
    set_impl(monkeypatch, path)
    N, k, d, r = shape
    x, W, b, A, E, B = _layer(N, k, d, r)
    rn = torch.tensor([float(r)])
    y = ops.adapter_linear(x, W, b, A, E, B, 4.0, rn, 0.25, True, False, seed=1234)
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [t.grad.clone() for t in (x, A, E, B)]
    for t in (x, A, E, B):
        t.grad = None
    keep = ops.dropout_keep_mask(1234, (N, k), 0.25, "cpu")
    if path == "cpp":  # the C++ kernel's own hash, not torch's generator
        assert torch.equal(keep, ext.dropout_keep_mask(N, k, 1234, 0.25))
    yr = ref.adapter_linear(x, W, b, A, E, B, 4.0, rn, 0.25, keep_mask=keep)
    yr.backward(gy)
    assert_close(y, yr, what="forward")
    for name, a, t in zip("xAEB", got, (x, A, E, B)):
        assert_close(a, t.grad, what=f"d{name}")


def test_keep_rate_within_3_sigma_and_seeds_differ(ext):
    N, k, p = 512, 384, 0.1
    m = ext.dropout_keep_mask(N, k, 7, p)
    n = N * k
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(m.float().mean().item() - (1 - p)) < 3 * sigma
    assert not torch.equal(m, ext.dropout_keep_mask(N, k, 8, p))
    assert torch.equal(m, ext.dropout_keep_mask(N, k, 7, p))
    # rows are not copies of one another (the row key decorrelates them)
    assert not torch.equal(m[0], m[1])
    # columns and rows both keep at the right rate (no striping)
    assert (m.float().mean(0) - (1 - p)).abs().max() < 0.12
    assert (m.float().mean(1) - (1 - p)).abs().max() < 0.12


def test_ext_and_torch_paths_agree_in_distribution(monkeypatch, ext):
    # Different mask streams, same law: the mean output over many seeds agrees with no dropout.
    x, W, b, A, E, B = _layer(8, 64, 16, 4, seed=3)
    rn = torch.tensor([4.0])
    with torch.no_grad():
        clean = ops.adapter_linear(x, W, b, A, E, B, 1.0, rn, 0.0, True, False)
        for flag in ("cpp", "torch"):
            set_impl(monkeypatch, flag)
            runs = torch.stack(
                [ops.adapter_linear(x, W, b, A, E, B, 1.0, rn, 0.2, True, False, seed=s) for s in range(300)]
            )
            err = (runs.mean(0) - clean).abs().max() / (clean - x @ W.T - b).abs().max()
            assert err < 0.15, f"path {flag}: mean over seeds is off by {err:.3f} of the adapter term"


def test_ext_rejects_bad_inputs(ext):
    with pytest.raises(RuntimeError, match="float32"):
        ext.dropout_shrink(torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64), 1, 0.1)
    with pytest.raises(RuntimeError, match="A is"):
        ext.dropout_shrink(torch.randn(4, 8), torch.randn(2, 9), 1, 0.1)
    with pytest.raises(RuntimeError, match="p must"):
        ext.dropout_shrink(torch.randn(4, 8), torch.randn(2, 8), 1, 1.0)


def test_an_abandoned_build_lock_is_named(tmp_path, monkeypatch, capsys):
    """A build killed midway leaves torch's lock file, and torch then waits for it forever: an old
    lock is named on stderr before the build starts; a fresh one (another process building) is not."""
    import os
    import time

    from torch.utils import cpp_extension

    from adalora_fast.ops import cpu_ext

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = cpp_extension._get_build_directory("adalora_fast_cpu", verbose=False)
    lock = os.path.join(build, "lock")
    open(lock, "w").close()
    cpu_ext._warn_if_stale_lock(cpp_extension, "adalora_fast_cpu")
    assert "lock" not in capsys.readouterr().err
    old = time.time() - 2 * cpu_ext._STALE_LOCK_S
    os.utime(lock, (old, old))
    cpu_ext._warn_if_stale_lock(cpp_extension, "adalora_fast_cpu")
    err = capsys.readouterr().err
    assert lock in err and "minutes old" in err
