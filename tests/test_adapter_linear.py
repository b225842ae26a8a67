"""The adapted-layer op ``ops.adapter_linear`` (``adalora_fast::adapter_linear`` and its backward)
against ``reference.adapter_linear``, on every real implementation (the ``impl`` fixture: "torch",
"cpp" = torch with the C++ dropout kernel, "triton" = the Triton kernels under the interpreter).

Forward and every gradient on fresh random inputs: N = 1, 3-D and 4-D inputs, k and d not
multiples of 16, r = 1 ... 64 and r = 0 (r > 64: the torch paths compute it, a forced Triton
raises), bias none / frozen / trainable, a trainable base weight, fan_in_fan_out (Conv1D), every
(base, adapter) dtype pair, autocast, masked ranks, non-contiguous inputs, stride-0 gradients and
partial requires_grad. Dropout is compared with the reference run on the keep mask the running
implementation draws (``ops.dropout_keep_mask``), plus the masks' own properties: keep rate, seeds,
independence of N, the same mask in forward and backward. Shapes stay tiny: the interpreter
runs every Triton program in numpy.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adalora_fast import ops, reference
from tolerances import assert_close, rtol_for


# ----------------------------------------------------------------------------- helpers
def _make(
    lead,
    k,
    d,
    r,
    *,
    bias=True,
    bias_grad=False,
    fifo=False,
    base_dtype=torch.float32,
    adapter_dtype=torch.float32,
    weight_grad=False,
    masked=False,
    seed=0,
):
    """Fresh random inputs for one adapted layer (E non-zero so the adapter term matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(base_dtype)
    w = (torch.randn(k, d, generator=g) if fifo else torch.randn(d, k, generator=g)) / math.sqrt(k)
    w = w.to(base_dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(base_dtype) if bias else None
    A = (torch.randn(r, k, generator=g) * 0.5).to(adapter_dtype)
    E = torch.randn(r, 1, generator=g)
    if masked:
        E[::2] = 0.0  # masked triplets, as the allocator leaves them
    E = E.to(adapter_dtype)
    B = (torch.randn(d, r, generator=g) * 0.5).to(adapter_dtype)
    ranknum = torch.full((1,), float(max(r, 1)))
    go = torch.randn(*lead, d, generator=g)
    t = dict(x=x, w=w, b=b, A=A, E=E, B=B)
    for n in ("x", "A", "E", "B"):
        t[n].requires_grad_(True)
    if b is not None and bias_grad:
        t["b"].requires_grad_(True)
    if weight_grad:
        t["w"].requires_grad_(True)
    return t, ranknum, 8.0, go


def _clone(t):
    return {n: None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for n, v in t.items()}


def _grads(t):
    return {n: (v.grad if v is not None and v.requires_grad else None) for n, v in t.items()}


def _keep_for(seed, shape, p, dtype=torch.float32):
    """The keep mask the running implementation draws for an x of ``shape`` (adapters of ``dtype``)."""
    n = 1
    for v in shape[:-1]:
        n *= v
    return ops.dropout_keep_mask(seed, (n, shape[-1]), p, "cpu", dtype).view(shape)


def _loss(out, go, reduce):
    return out.float().sum() if reduce == "sum" else (out.float() * go).sum()


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _run_ops(t, ranknum, scaling, go, *, fifo=False, p=0.0, training=True, seed=None, reduce="dot", autocast=None):
    with _autocast(autocast):
        out = ops.adapter_linear(
            t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, p, training, fifo, seed=seed
        )
    _loss(out, go, reduce).backward()
    return out, _grads(t)


def _run_ref(t, ranknum, scaling, go, *, fifo=False, keep=None, p=0.0, reduce="dot", autocast=None):
    """PEFT's layer; under autocast it runs under the same autocast (PEFT's behaviour)."""
    with _autocast(autocast):
        out = reference.adapter_linear(t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, p, fifo, keep)
    _loss(out, go, reduce).backward()
    return out, _grads(t)


def _compare(out, grads, rout, rgrads, dtype=None, rtol=None):
    """Forward and every gradient; a gradient the reference has not must be absent too."""
    assert_close(out, rout, dtype, "forward", rtol)
    for n in ("x", "A", "E", "B", "b", "w"):
        if rgrads[n] is None:
            assert grads[n] is None, f"d{n} should be None"
            continue
        assert_close(grads[n], rgrads[n], dtype, f"d{n}", rtol)


def _adapter_term(t, out):
    base = F.linear(t["x"].detach(), t["w"].detach(), None if t["b"] is None else t["b"].detach())
    return (out.detach().float() - base.float()).abs().max()


# ----------------------------------------------------------------------------- fp32, shapes
SHAPES = [
    # (leading shape of x, k, d, r)
    ((7,), 16, 24, 12),
    ((1,), 13, 9, 12),  # N = 1, k and d not multiples of 16, k != d
    ((2, 5), 19, 11, 1),  # 3-D input, r = 1
    ((9,), 37, 21, 64),  # r = 64 > k, d (the largest rank the Triton kernels take)
    ((3, 1, 4), 8, 8, 12),  # 4-D input
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-k{s[1]}-d{s[2]}-r{s[3]}")
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
def test_fp32_forward_and_grads_match_reference(impl, shape, bias):
    lead, k, d, r = shape
    t, ranknum, scaling, go = _make(lead, k, d, r, bias=bias != "none", bias_grad=bias == "trainable", seed=1)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    assert out.shape == (*lead, d)
    _compare(out, grads, rout, rgrads)
    if bias == "trainable":
        assert grads["b"] is not None
    assert _adapter_term(t, out) > 1e-2, "the adapter term is not negligible"


def test_fp32_weight_grad_when_base_trainable(impl):
    t, ranknum, scaling, go = _make((6,), 10, 7, 4, bias=True, bias_grad=True, weight_grad=True, seed=2)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    assert grads["w"] is not None
    _compare(out, grads, rout, rgrads)


@pytest.mark.parametrize("bias", [False, True])
def test_conv1d_fan_in_fan_out_matches_reference(impl, bias):
    t, ranknum, scaling, go = _make((2, 3), 13, 10, 12, bias=bias, bias_grad=bias, fifo=True, seed=3)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, fifo=True)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, fifo=True)
    _compare(out, grads, rout, rgrads)


def test_rank_zero_is_the_base_layer(impl):
    t, _, scaling, go = _make((5,), 12, 9, 0, seed=4)
    ranknum = torch.zeros(1)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, grads, rout, rgrads)
    x, w, b = t["x"].detach(), t["w"], t["b"]
    assert_close(out, F.linear(x, w, b), what="out = base")
    assert_close(grads["x"], go @ w, what="dx = g W")
    assert grads["A"].shape == (0, 12) and grads["E"].shape == (0, 1) and grads["B"].shape == (9, 0)


def test_rank_above_64(impl):
    """The Triton kernels take r <= 64: a forced Triton raises a clear error (never a silent
    fallback); the torch paths compute any rank."""
    t, ranknum, scaling, go = _make((3,), 5, 4, 65, seed=5)
    if impl == "triton":
        with pytest.raises(NotImplementedError, match="r <= 64"):
            _run_ops(t, ranknum, scaling, go)
        return
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, grads, rout, rgrads)


# ----------------------------------------------------------------------------- dtypes
DTYPE_PAIRS = [  # (base dtype, adapter dtype): the pairs the Triton kernels are built for
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]
DTYPE_CASES = [
    # N, k, d, r, p, masked
    (37, 40, 24, 12, 0.0, False),  # N not a multiple of the block, k, d not multiples of 16
    (1, 20, 17, 1, 0.0, False),  # N = 1, r = 1
    (50, 72, 33, 6, 0.2, True),  # dropout, masked ranks
    (64, 80, 40, 32, 0.0, True),  # r = 32 (rank padded to 64), masked
    (45, 24, 70, 12, 0.1, False),  # d > one expand block, dropout
]


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: "N{}k{}d{}r{}p{}m{}".format(*c))
def test_dtype_pairs_match_reference(impl, dtypes, case):
    base_dtype, adapter_dtype = dtypes
    N, k, d, r, p, masked = case
    t, ranknum, scaling, go = _make(
        (N,), k, d, r, base_dtype=base_dtype, adapter_dtype=adapter_dtype, masked=masked, seed=N * 131 + r
    )
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, seed=1234)
    keep = _keep_for(1234, (N, k), p, adapter_dtype) if p > 0 else None
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, keep=keep, p=p)
    assert out.dtype == base_dtype and out.shape == (N, d)
    assert grads["x"].dtype == base_dtype
    assert all(grads[n].dtype == adapter_dtype for n in ("A", "E", "B"))
    # out and dx in the base dtype's tolerance; the adapter gradients in the adapter dtype's (with
    # fp32 adapters they are fp32 products of the same half-rounded x and g as the reference's)
    assert_close(out, rout, what="forward")
    assert_close(grads["x"], rgrads["x"], what="dx")
    for n in ("A", "E", "B"):
        assert_close(grads[n], rgrads[n], what=f"d{n}")
    if masked:
        assert torch.all(grads["A"][t["E"].detach().view(-1) == 0] == 0), "masked triplets: no gradient into A"


def test_bf16_base_fp32_adapters_without_autocast(impl):
    t, ranknum, scaling, go = _make((2, 4), 24, 20, 12, bias=True, base_dtype=torch.bfloat16, seed=6)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    assert out.dtype == torch.bfloat16, "the output stays in the base layer's dtype"
    assert grads["x"].dtype == torch.bfloat16
    for n in ("A", "E", "B"):
        assert grads[n].dtype == torch.float32
    _compare(out, grads, rout, rgrads)


def test_unsupported_dtype_pair(impl):
    """fp32 activations with bf16 adapters: not a pair the Triton kernels are built for (a clear
    TypeError naming the pair); the torch paths compute it in the adapter dtype, as PEFT does."""
    t, ranknum, scaling, go = _make((4,), 16, 8, 2, adapter_dtype=torch.bfloat16, seed=7)
    if impl == "triton":
        with pytest.raises(TypeError, match="adapter dtype"):
            _run_ops(t, ranknum, scaling, go)
        return
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, grads, rout, rgrads, dtype=torch.bfloat16)


AUTOCAST_CASES = [
    # (leading shape, k, d, r, p)
    ((7,), 16, 24, 12, 0.0),
    ((2, 3), 19, 11, 1, 0.0),
    ((1,), 21, 13, 64, 0.0),
    ((2, 9), 20, 12, 8, 0.1),  # dropout under autocast
    ((33,), 40, 24, 12, 0.1),
]


@pytest.mark.parametrize("adt", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=lambda c: f"N{c[0]}-k{c[1]}-d{c[2]}-r{c[3]}-p{c[4]}")
def test_autocast_matches_reference_under_autocast(impl, adt, case):
    lead, k, d, r, p = case
    t, ranknum, scaling, go = _make(lead, k, d, r, bias=True, bias_grad=True, seed=8)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, seed=77, autocast=adt)
    # under autocast the adapters compute in the autocast dtype: that is the mask's dtype too
    keep = _keep_for(77, (*lead, k), p, adt) if p > 0 else None
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, keep=keep, p=p, autocast=adt)
    assert out.dtype == rout.dtype == adt
    for n in ("x", "A", "E", "B", "b"):
        assert grads[n].dtype == torch.float32, "fp32 leaves keep fp32 gradients"
    # both sides round every product to the autocast dtype, in different orders
    _compare(out, grads, rout, rgrads, dtype=adt, rtol=2 * rtol_for(adt))


# ----------------------------------------------------------------------------- dropout
DROPOUT_CASES = [
    ((33,), False, torch.float32),
    ((3, 11), True, torch.float32),
    ((1,), False, torch.float32),
    ((3, 11), False, torch.bfloat16),
    ((33,), True, torch.bfloat16),
]


@pytest.mark.parametrize(
    "lead,fifo,base_dtype", DROPOUT_CASES, ids=["N33", "3d-conv1d", "N1", "3d-bf16-base", "N33-conv1d-bf16-base"]
)
def test_dropout_matches_reference_with_same_mask(impl, lead, fifo, base_dtype):
    p, seed = 0.1, 1234
    k, d, r = 17, 12, 12
    t, ranknum, scaling, go = _make(lead, k, d, r, bias=True, bias_grad=True, fifo=fifo, seed=9, base_dtype=base_dtype)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, fifo=fifo, p=p, seed=seed)
    keep = _keep_for(seed, (*lead, k), p)
    if lead != (1,):
        assert not keep.all(), "with p=0.1 some elements must be dropped"
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, fifo=fifo, keep=keep, p=p)
    assert out.dtype == base_dtype
    _compare(out, grads, rout, rgrads)
    # and it is not the no-dropout result
    nout, _ = _run_ref(_clone(t), ranknum, scaling, go, fifo=fifo)
    if not keep.all():
        assert (nout.detach().float() - out.detach().float()).abs().max() > 1e-3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_within_three_sigma(impl, p):
    n, k = 64, 1000
    m = n * k
    sigma = math.sqrt(p * (1 - p) / m)
    for seed in (0, 987654321):
        keep = ops.dropout_keep_mask(seed, (n, k), p, "cpu")
        assert keep.dtype == torch.bool and keep.shape == (n, k)
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 3 * sigma, f"seed {seed}: keep rate {rate}, expected {1 - p} ± {3 * sigma}"
        # no structure along rows or columns: every row keeps some and drops some
        assert keep.any(1).all() and (~keep).any(1).all()
        assert (keep.float().mean(0) - (1 - p)).abs().max() < 0.3


def test_seeds_differ_and_repeat(impl):
    shape, p = (40, 72), 0.3
    a = ops.dropout_keep_mask(1, shape, p, "cpu")
    b = ops.dropout_keep_mask(2, shape, p, "cpu")
    c = ops.dropout_keep_mask(1, shape, p, "cpu")
    big = ops.dropout_keep_mask(2**62 - 1, shape, p, "cpu")
    assert torch.equal(a, c), "same seed, same mask"
    assert not torch.equal(a, b) and not torch.equal(a, big), "different seeds give different masks"
    assert (a != b).float().mean() > 0.2  # independent masks differ in ~2p(1-p) = 42% of places
    t, ranknum, scaling, _ = _make((64,), 32, 16, 8, seed=10)
    args = (t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, 0.1, True, False)
    with torch.no_grad():
        o1 = ops.adapter_linear(*args, seed=1)
        o1b = ops.adapter_linear(*args, seed=1)
        o2 = ops.adapter_linear(*args, seed=2)
        o3 = ops.adapter_linear(*args, seed=torch.tensor([2]))  # a [1] int64 tensor works as the int
    assert torch.equal(o1, o1b)
    assert not torch.allclose(o1, o2)
    assert torch.equal(o2, o3)


def test_mask_depends_on_rows_not_on_n(impl):
    # row n's mask is the same whatever the number of rows (so the mask of a row of a batch does
    # not depend on how many rows the batch has)
    a = ops.dropout_keep_mask(9, (7, 40), 0.5, "cpu")
    b = ops.dropout_keep_mask(9, (70, 40), 0.5, "cpu")
    assert torch.equal(a, b[:7])


def test_mask_identical_between_forward_and_backward(impl):
    """With W = 0 and b = 0, out is the mask-dependent adapter term only and dx = mask ⊙ (ge A)/(1-p):
    dx is exactly zero where the mask drops and (generically) non-zero where it keeps; forward,
    dx and dA all equal the reference computed with the mask ``ops.dropout_keep_mask`` returns."""
    g = torch.Generator().manual_seed(11)
    N, k, d, r, p, seed = 48, 40, 24, 6, 0.3, 4242
    x = torch.randn(N, k, generator=g, requires_grad=True)
    W, b = torch.zeros(d, k), torch.zeros(d)
    A, E, B = (torch.randn(*s, generator=g).requires_grad_() for s in ((r, k), (r, 1), (d, r)))
    rk = torch.tensor([float(r)])
    out = ops.adapter_linear(x, W, b, A, E, B, 1.0, rk, dropout_p=p, training=True, seed=seed)
    go = torch.randn(out.shape, generator=g)
    dx, dA = torch.autograd.grad(out, (x, A), go)
    keep = ops.dropout_keep_mask(seed, (N, k), p, "cpu")
    assert not keep.all()
    assert torch.equal(dx != 0, keep)
    out_r = reference.adapter_linear(x, W, b, A, E, B, 1.0, rk, p, keep_mask=keep)
    dx_r, dA_r = torch.autograd.grad(out_r, (x, A), go)
    assert_close(out, out_r, what="forward")
    assert_close(dx, dx_r, what="dx")
    assert_close(dA, dA_r, what="dA")
    # another seed gives another output
    out2 = ops.adapter_linear(x, W, b, A, E, B, 1.0, rk, dropout_p=p, training=True, seed=seed + 1)
    assert not torch.allclose(out, out2)


def test_dropout_without_seed_follows_torch_manual_seed(impl):
    t, ranknum, scaling, _ = _make((20,), 16, 8, 4, seed=12)
    args = (t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, 0.3, True, False)
    with torch.no_grad():
        torch.manual_seed(5)
        a = ops.adapter_linear(*args)
        torch.manual_seed(5)
        b = ops.adapter_linear(*args)
        c = ops.adapter_linear(*args)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


@pytest.mark.parametrize("case", ["p0", "eval"])
def test_dropout_off_equals_no_dropout(impl, case):
    t, ranknum, scaling, go = _make((10,), 14, 9, 6, bias=True, bias_grad=True, seed=13)
    t2 = _clone(t)
    p, training = (0.0, True) if case == "p0" else (0.5, False)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, training=training, seed=3)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, grads, rout, rgrads)
    with torch.no_grad():  # p = 0 in training and any p in eval: the very same computation
        args = (t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum)
        assert torch.equal(ops.adapter_linear(*args, 0.0, True, seed=99), ops.adapter_linear(*args, 0.3, False))
    assert ops.dropout_keep_mask(5, (10, 14), 0.0, "cpu").all()


# ----------------------------------------------------------------------------- strides, requires_grad
def test_non_contiguous_input(impl):
    t, ranknum, scaling, _ = _make((4, 6), 10, 8, 5, bias=True, seed=14)
    g = torch.Generator().manual_seed(15)
    big = torch.randn(4, 12, 20, generator=g)
    for xnc in (big[:, ::2, ::2], torch.randn(10, 24, generator=g).t()):
        assert not xnc.is_contiguous()
        ta, tb = _clone(t), _clone(t)
        ta["x"] = xnc.detach().requires_grad_(True)  # a view: keeps the strides (clone() would not)
        tb["x"] = xnc.contiguous().requires_grad_(True)
        assert not ta["x"].is_contiguous()
        go = torch.randn(*xnc.shape[:-1], 8, generator=g)
        out, grads = _run_ops(ta, ranknum, scaling, go)
        rout, rgrads = _run_ref(tb, ranknum, scaling, go)
        _compare(out, grads, rout, rgrads)


def test_non_contiguous_3d_conv1d_with_stride_zero_gradient(impl):
    t, ranknum, scaling, go = _make((2, 9), 40, 24, 6, bias=True, fifo=True, seed=16)
    x = torch.randn(2, 40, 9, generator=torch.Generator().manual_seed(17)).transpose(1, 2)  # [2, 9, 40]
    assert not x.is_contiguous()
    ta, tb = _clone(t), _clone(t)
    ta["x"], tb["x"] = x.detach().requires_grad_(), x.contiguous().requires_grad_()
    assert not ta["x"].is_contiguous()
    out, grads = _run_ops(ta, ranknum, 1.5, go, fifo=True, reduce="sum")
    rout, rgrads = _run_ref(tb, ranknum, 1.5, go, fifo=True, reduce="sum")
    assert out.shape == (2, 9, 24)
    _compare(out, grads, rout, rgrads)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_stride_zero_gradient_from_sum(impl, p):
    lead, k = (3, 5), 12
    t, ranknum, scaling, go = _make(lead, k, 9, 7, bias=True, bias_grad=True, seed=18)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, seed=77, reduce="sum")
    keep = _keep_for(77, (*lead, k), p) if p > 0 else None
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, keep=keep, p=p, reduce="sum")
    _compare(out, grads, rout, rgrads)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_partial_requires_grad(impl, p):
    """Only A and B train (x and E frozen): the gradients that exist still match the reference."""
    t, ranknum, scaling, go = _make((6,), 11, 7, 5, bias=True, seed=19)
    t["x"].requires_grad_(False)
    t["E"].requires_grad_(False)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, seed=9)
    keep = _keep_for(9, (6, 11), p) if p > 0 else None
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, keep=keep, p=p)
    _compare(out, grads, rout, rgrads)
    assert grads["A"] is not None and grads["B"] is not None


def test_impl_fixture_runs_the_named_implementation(impl, monkeypatch):
    """Guards every test above: "triton" launches the Triton kernels, "cpp" calls the C++ dropout
    kernel, "torch" neither."""
    from adalora_fast.kernels import _launch

    calls = []
    real_launch = _launch.launch
    cpu_ops = torch.ops.adalora_fast_cpu
    real_shrink = getattr(cpu_ops, "dropout_shrink", None)  # None: the C++ kernels are not loaded

    def launch(kernel, grid, *a, **kw):
        calls.append("triton")
        return real_launch(kernel, grid, *a, **kw)

    def shrink(*a, **kw):
        calls.append("cpp")
        return real_shrink(*a, **kw)

    monkeypatch.setattr(_launch, "launch", launch)
    if real_shrink is not None:
        monkeypatch.setattr(cpu_ops, "dropout_shrink", shrink)
    t, ranknum, scaling, go = _make((5,), 8, 6, 3, seed=20)
    _run_ops(t, ranknum, scaling, go, p=0.1, seed=1)
    assert set(calls) == ({impl} if impl != "torch" else set()), calls


# ----------------------------------------------------------------------------- fp32 adapters, half base
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("r", [12, 40], ids=lambda r: f"r{r}")  # R_PAD 16 and 64 (its narrower tiles)
def test_fp32_adapters_on_a_half_base_are_fp32_class(use_backend, monkeypatch, base_dtype, p, r):
    """The Triton path's "bf16x3" products (fp32 adapters on a bf16 or fp16 base under torch's
    full-fp32 default, ``kernels/triton_ops/adapter_linear._dot``) against an fp64 reference: dA, dE,
    dB within 10x of the error of PEFT's fp32 path (the reference computed with fp32 adapters by
    torch), and the output as PEFT's rounding of it to the base dtype (see below). On an fp16 base x
    and g take two bf16 parts each. At R_PAD 64 the launches run the narrower tiles of
    ``BF16X3_R64_CONSTEXPRS``."""
    from adalora_fast.kernels import adapter_linear as ka

    use_backend("triton")
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")
    assert torch.get_float32_matmul_precision() == "highest"
    assert ka.layer_precision(base_dtype, torch.float32, r) == "bf16x3"
    from adalora_fast.kernels import _launch

    precs, blocks, launch = [], set(), _launch.launch

    def record(kernel, grid, *a, **kw):
        precs.append(kw.get("DOT_PREC"))
        if kw.get("DOT_PREC"):
            blocks.add((kernel.__name__, kw.get("BLOCK_K", kw.get("BLOCK_D")), kw["SPLIT"]))
        return launch(kernel, grid, *a, **kw)

    monkeypatch.setattr(_launch, "launch", record)
    N, k, d, seed = 192, 96, 80, 5
    t, ranknum, scaling, go = _make((N,), k, d, r, bias=True, base_dtype=base_dtype, seed=21)
    keep = _keep_for(seed, (N, k), p) if p else None
    ours, ours_g = _run_ops(_clone(t), ranknum, scaling, go, p=p, seed=seed)
    precs = [v for v in precs if v is not None]  # the dropout mask kernel (for the reference) has no dots
    assert len(precs) == 4 and set(precs) == {"bf16x3"}, precs
    narrow = ka.BF16X3_R64_CONSTEXPRS[base_dtype] if r > 16 else {}
    assert blocks == {  # (kernel, tile width, split binary): the layer is too narrow to split
        ("_shrink_kernel", narrow.get("shrink", {}).get("BLOCK_K", ka.BLOCK_K), False),
        ("_expand_add_kernel", ka.EXPAND_BLOCK_D, False),
        ("_grad_rank_kernel", narrow.get("grad_rank", {}).get("BLOCK_D", ka.GRAD_BLOCK_D), False),
        ("_dA_dx_kernel", ka.DA_BLOCK_K, r > 16),  # at R_PAD 64 the split binary, one partial
    }, blocks
    fp32, fp32_g = _run_ref(_clone(t), ranknum, scaling, go, keep=keep, p=p)
    t64 = {n: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for n, v in t.items()}
    # the fp64 reference from the same gradient both paths get: the output's, rounded to its dtype
    ref, ref_g = _run_ref(t64, ranknum.double(), scaling, go.to(base_dtype).double(), keep=keep, p=p)

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    for n in ("A", "E", "B"):
        e_ours, e_fp32 = err(ours_g[n], ref_g[n]), err(fp32_g[n], ref_g[n])
        assert e_ours <= 10 * max(e_fp32, 1e-7), f"d{n}: {e_ours:.3g} vs PEFT fp32 {e_fp32:.3g}"
    # the output: both paths add the fp32 adapter term into the same half-rounded base output and round
    # once; ours may be off the exactly rounded sum by no more than PEFT's own fp32 error plus one ulp
    # (the interpreter rounds fp32 to bf16 by truncation, PEFT to nearest; where the adapter term
    # cancels the base output to near zero, PEFT's fp32 sum is itself several of the result's ulps off)
    x, w, b = (t[n].detach() for n in ("x", "w", "b"))
    keep64 = keep.double() / (1 - p) if keep is not None else 1.0
    A, E, B = (t[n].detach().double() for n in ("A", "E", "B"))
    exact = F.linear(x, w, b).double() + ((x.double() * keep64) @ (A * E).T @ B.T) * scaling / (float(ranknum) + 1e-5)
    o, f = ours.detach().double(), fp32.detach().double()
    ulp = torch.finfo(base_dtype).eps * 2.0 ** torch.floor(torch.log2(exact.abs().clamp_min(1e-30)))
    excess = ((o - exact).abs() - (f - exact).abs()) / ulp
    assert (excess <= 1.0).all(), f"the output {excess.max().item():.1f} ulp further from the exact sum than PEFT's"


def test_bf16x3_on_a_half_base_at_every_rank_pad(monkeypatch):
    """bf16x3 for fp32 adapters on a bf16 or fp16 base at full fp32, at R_PAD 16 and 64 (both
    compiled, linted and shipped; R_PAD 64 on narrower tiles); an fp32 base, TF32 allowed or half
    adapters keep their own precision (on CUDA the full-fp32 fp32 base runs the torch
    implementation); a rank above the pads is refused."""
    from adalora_fast.kernels import adapter_linear as ka

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    for base in (bf16, f16):
        for r in (1, 16, 17, 64):
            assert ka.layer_precision(base, f32, r) == "bf16x3", (base, r)
        assert (
            ka.layer_kwargs(f32, 17, base)["shrink"]["BLOCK_K"] == ka.BF16X3_R64_CONSTEXPRS[base]["shrink"]["BLOCK_K"]
        )
        assert ka.layer_kwargs(f32, 16, base)["shrink"]["BLOCK_K"] == ka.BLOCK_K
    with pytest.raises(NotImplementedError, match="r <= 64"):
        ka.layer_precision(bf16, f32, 65)
    assert ka.layer_precision(f32, f32, 12) == "ieee"
    assert ka.layer_precision(bf16, bf16, 12) == "tf32"  # half operands: the tensor cores as they are
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert ka.layer_precision(bf16, f32, 12) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)
