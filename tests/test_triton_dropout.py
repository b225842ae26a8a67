"""In-kernel Philox dropout of the Triton backend (TRITON_INTERPRET=1 on CPU tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from adalora_fast import ops
from adalora_fast import reference as ref
from adalora_fast.ops import triton_backend as tb


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_3_sigma(p):
    n, k = 64, 1000
    keep = tb.dropout_keep_mask(123456789, (n, k), p, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (n, k)
    m = n * k
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 3 * math.sqrt(p * (1 - p) / m)
    # no structure along rows or columns: every row and every column keeps some and drops some
    assert keep.any(1).all() and (~keep).any(1).all()


def test_different_seeds_different_masks_same_seed_same_mask():
    a = tb.dropout_keep_mask(1, (40, 72), 0.3, "cpu")
    b = tb.dropout_keep_mask(2, (40, 72), 0.3, "cpu")
    c = tb.dropout_keep_mask(1, (40, 72), 0.3, "cpu")
    big = tb.dropout_keep_mask(2**62 - 1, (40, 72), 0.3, "cpu")
    assert torch.equal(a, c)
    assert not torch.equal(a, b) and not torch.equal(a, big)
    assert (a != b).float().mean() > 0.2  # independent masks differ in ~2p(1-p) = 42% of places


def test_mask_depends_on_rows_not_on_n():
    # row n's mask is the same whatever the number of rows (the counter is n*ceil(k/8) + c//8)
    a = tb.dropout_keep_mask(9, (7, 40), 0.5, "cpu")
    b = tb.dropout_keep_mask(9, (70, 40), 0.5, "cpu")
    assert torch.equal(a, b[:7])


def test_mask_identical_between_forward_and_backward(use_backend):
    """With W = 0 and b = 0, out = mask-dependent adapter term only and dx = mask ⊙ (ge A)/(1-p):
    dx is exactly zero where the mask drops and (generically) non-zero where it keeps; forward,
    dx and dA all equal the reference computed with the mask ``dropout_keep_mask`` returns."""
    use_backend("triton")
    torch.manual_seed(0)
    N, k, d, r, p, seed = 48, 40, 24, 6, 0.3, 4242
    x = torch.randn(N, k, requires_grad=True)
    W, b = torch.zeros(d, k), torch.zeros(d)
    A, E, B = (torch.randn(*s, requires_grad=True) for s in ((r, k), (r, 1), (d, r)))
    rk = torch.tensor([float(r)])
    out = ops.adapter_linear(x, W, b, A, E, B, 1.0, rk, dropout_p=p, training=True, seed=seed)
    g = torch.randn_like(out)
    dx, dA = torch.autograd.grad(out, (x, A), g)
    keep = tb.dropout_keep_mask(seed, (N, k), p, "cpu")
    assert torch.equal(dx != 0, keep)
    out_r = ref.adapter_linear(x, W, b, A, E, B, 1.0, rk, keep, p)
    dx_r, dA_r = torch.autograd.grad(out_r, (x, A), g)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dA, dA_r, rtol=1e-5, atol=1e-5)
    # another seed gives another output
    out2 = ops.adapter_linear(x, W, b, A, E, B, 1.0, rk, dropout_p=p, training=True, seed=seed + 1)
    assert not torch.allclose(out, out2)


def test_p0_equals_no_dropout(use_backend):
    use_backend("triton")
    torch.manual_seed(1)
    N, k, d, r = 21, 40, 24, 12
    x, W, b = torch.randn(N, k), torch.randn(d, k), torch.randn(d)
    A, E, B = torch.randn(r, k), torch.randn(r, 1), torch.randn(d, r)
    rk = torch.tensor([float(r)])
    a = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, dropout_p=0.0, training=True, seed=99)
    e = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, dropout_p=0.3, training=False)
    assert torch.equal(a, e)
    torch.testing.assert_close(a, ref.adapter_linear(x, W, b, A, E, B, 2.0, rk), rtol=1e-5, atol=1e-5)
    assert tb.dropout_keep_mask(5, (N, k), 0.0, "cpu").all()
