"""Triton backend (under TRITON_INTERPRET=1 on CPU tensors) against ``reference.py``.

Every op, forward and every gradient, on fresh random inputs: fp32, fp16 and bf16 activations
(the interpreter upcasts half loads to fp32, see kernels/_launch.py), N not a multiple of the
block, N = 1, k and d not multiples of 16, r in {1, 6, 12, 32}, masked ranks (zeros in E), r = 0
layers, 3-D inputs, non-contiguous x, stride-0 gradients, fan_in_fan_out, autocast.
"""

from __future__ import annotations

import pytest
import torch

from adalora_fast import ops
from adalora_fast import reference as ref
from adalora_fast.ops import triton_backend as tb
from adalora_fast.ops.layout import FlatLayout

# max-abs error relative to the reference's max-abs value
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _layer(N, k, d, r, dtype, masked=False, bias=True, fifo=False, lead=()):
    x = torch.randn(*lead, N, k, dtype=dtype)
    W = torch.randn(k, d, dtype=dtype) if fifo else torch.randn(d, k, dtype=dtype)
    b = torch.randn(d, dtype=dtype) if bias else None
    A = torch.randn(r, k) * 0.5
    E = torch.randn(r, 1)
    if masked and r > 1:
        E[::2] = 0.0
    B = torch.randn(d, r) * 0.5
    return x, W, b, A, E, B


def _run(backend, use_backend, x, W, b, A, E, B, scaling, ranknum, p, seed, fifo, g=None, autocast=None):
    use_backend(backend)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, E, B)]
    xl, Al, El, Bl = leaves
    if backend == "reference":
        keep = None
        if p > 0:
            keep = tb.dropout_keep_mask(seed, x.shape, p, x.device)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            if autocast is not None:
                xa, Wa, ba, Aa, Ea, Ba = (t.to(autocast) if t is not None else None for t in (xl, W, b, Al, El, Bl))
            else:
                xa, Wa, ba, Aa, Ea, Ba = xl, W, b, Al, El, Bl
            with torch.autocast("cpu", enabled=False):
                out = ref.adapter_linear(xa, Wa, ba, Aa, Ea, Ba, scaling, ranknum, keep, p, fifo)
    else:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = ops.adapter_linear(xl, W, b, Al, El, Bl, scaling, ranknum, dropout_p=p, training=True,
                                     fan_in_fan_out=fifo, seed=seed)
    if g is None:
        g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out, grads, g


CASES = [
    # N, k, d, r, p, masked
    (37, 40, 24, 12, 0.0, False),  # N not a multiple of the block, k, d not multiples of 16
    (1, 20, 17, 1, 0.0, False),  # N = 1, r = 1
    (50, 72, 33, 6, 0.2, True),  # dropout, masked ranks
    (64, 80, 40, 32, 0.0, True),  # r = 32 (R_PAD 64), masked
    (45, 24, 70, 12, 0.1, False),  # d > one expand block, dropout
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}k{}d{}r{}p{}m{}".format(*c))
def test_adapter_linear_parity(use_backend, dtype, case):
    N, k, d, r, p, masked = case
    torch.manual_seed(hash((N, k, d, r, str(dtype))) % 2**31)
    x, W, b, A, E, B = _layer(N, k, d, r, dtype, masked)
    rk = torch.tensor([float(r)])
    out, grads, g = _run("triton", use_backend, x, W, b, A, E, B, 2.0, rk, p, 1234, False)
    out_r, grads_r, _ = _run("reference", use_backend, x, W, b, A, E, B, 2.0, rk, p, 1234, False, g=g)
    assert out.dtype == dtype and out.shape == (N, d)
    assert _rel(out, out_r) < TOL[dtype]
    for name, a, ar in zip(("dx", "dA", "dE", "dB"), grads, grads_r):
        assert a.dtype == ar.dtype and a.shape == ar.shape, name
        # adapter grads are fp32 (fp32 adapter weights): fp32 tolerance unless x is bf16-rounded upstream
        tol = TOL[dtype] if name == "dx" else (TOL[torch.float32] if dtype == torch.float32 else 1e-4)
        assert _rel(a, ar) < tol, name
    if masked:
        assert torch.all(grads[1][E.view(-1) == 0] == 0)  # masked triplets: no gradient into A


def test_adapter_linear_3d_noncontig_stride0_fifo(use_backend):
    torch.manual_seed(1)
    N, k, d, r = 9, 40, 24, 6
    base = torch.randn(2, k, N)  # x = base.transpose(1, 2): [2, N, k], non-contiguous
    x = base.transpose(1, 2)
    W = torch.randn(k, d)  # fan_in_fan_out (Conv1D)
    b = torch.randn(d)
    A, E, B = torch.randn(r, k), torch.randn(r, 1), torch.randn(d, r)
    rk = torch.tensor([5.0])
    outs = {}
    for be in ("triton", "reference"):
        use_backend(be)
        xl, Al, El, Bl = (t.detach().clone().requires_grad_() for t in (x, A, E, B))
        if be == "reference":
            out = ref.adapter_linear(xl, W, b, Al, El, Bl, 1.5, rk, fan_in_fan_out=True)
        else:
            assert not xl.is_contiguous()
            out = ops.adapter_linear(xl, W, b, Al, El, Bl, 1.5, rk, dropout_p=0.0, fan_in_fan_out=True)
        loss = out.sum()  # stride-0 gradient
        outs[be] = (out, torch.autograd.grad(loss, (xl, Al, El, Bl)))
    (o1, g1), (o2, g2) = outs["triton"], outs["reference"]
    assert o1.shape == (2, N, d)
    assert _rel(o1, o2) < 1e-5
    for a, b_ in zip(g1, g2):
        assert _rel(a, b_) < 1e-5


@pytest.mark.parametrize("adt", [torch.bfloat16, torch.float16], ids=str)
def test_adapter_linear_autocast(use_backend, adt):
    torch.manual_seed(2)
    x, W, b, A, E, B = _layer(33, 40, 24, 12, torch.float32)
    rk = torch.tensor([12.0])
    out, grads, g = _run("triton", use_backend, x, W, b, A, E, B, 2.0, rk, 0.1, 77, False, autocast=adt)
    out_r, grads_r, _ = _run("reference", use_backend, x, W, b, A, E, B, 2.0, rk, 0.1, 77, False, g=g, autocast=adt)
    assert out.dtype == adt
    assert _rel(out, out_r) < TOL[adt]
    for a, ar in zip(grads, grads_r):
        assert a.dtype == ar.dtype == torch.float32
        assert _rel(a, ar) < 2 * TOL[adt]


def test_adapter_linear_rank0(use_backend):
    torch.manual_seed(3)
    x, W, b, A, E, B = _layer(10, 24, 20, 0, torch.float32)
    rk = torch.tensor([0.0])
    out, grads, g = _run("triton", use_backend, x, W, b, A, E, B, 2.0, rk, 0.0, None, False)
    assert torch.allclose(out, torch.nn.functional.linear(x, W, b))
    assert torch.allclose(grads[0], g @ W)
    assert grads[1].shape == (0, 24) and grads[3].shape == (20, 0)


def test_adapter_linear_unsupported_dtype_pair(use_backend):
    use_backend("triton")
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="adapter dtype"):
        ops.adapter_linear(x, torch.randn(8, 16), None, torch.randn(2, 16, dtype=torch.bfloat16),
                           torch.randn(2, 1, dtype=torch.bfloat16), torch.randn(8, 2, dtype=torch.bfloat16),
                           1.0, torch.tensor([2.0]))


# ---------------------------------------------------------------------------------------------
# importance update, triplet scores, masking

SHAPES = [(12, 40, 24), (6, 40, 24), (0, 17, 9), (1, 33, 70), (32, 80, 16), (12, 40, 24), (20, 19, 300)]


def _adapters(shapes):
    params, grads = [], []
    for r, k, d in shapes:
        params += [torch.randn(r, k), torch.randn(d, r), torch.randn(r, 1)]
    grads = [torch.randn_like(p) for p in params]
    return params, grads


@pytest.mark.parametrize("want", [True, False])
def test_importance_update_parity(use_backend, want):
    torch.manual_seed(4)
    L = FlatLayout(SHAPES)
    params, grads = _adapters(SHAPES)
    m1, m2 = torch.rand(L.numel), torch.rand(L.numel)
    use_backend("triton")
    a1, a2 = m1.clone(), m2.clone()
    scores = ops.importance_update(L, params, grads, a1, a2, 0.85, 0.8, want_scores=want)
    exp_scores = []
    for i, (r, k, d) in enumerate(SHAPES):
        el = []
        for t in (3 * i, 3 * i + 1, 3 * i + 2):
            sl = slice(L.offsets[t], L.offsets[t] + L.numel_of(t))
            e1, e2 = ref.importance_update(params[t], grads[t], m1[sl].view(params[t].shape),
                                           m2[sl].view(params[t].shape), 0.85, 0.8)
            torch.testing.assert_close(a1[sl].view(e1.shape), e1, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a2[sl].view(e2.shape), e2, rtol=1e-6, atol=1e-7)
            el.append(ref.element_score(e1, e2))
        exp_scores.append(ref.triplet_scores(el[0], el[2], el[1]))
    if not want:
        assert scores is None
        return
    exp = torch.cat(exp_scores)
    assert scores.shape == (L.total_rank,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, exp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ops.triplet_scores(L, a1, a2), exp, rtol=1e-5, atol=1e-7)


def test_importance_update_missing_grad(use_backend):
    use_backend("triton")
    L = FlatLayout([(2, 16, 16)])
    params, grads = _adapters([(2, 16, 16)])
    grads[1] = None
    m1, m2 = torch.zeros(L.numel), torch.zeros(L.numel)
    with pytest.raises(ValueError, match="no gradient"):
        ops.importance_update(L, params, grads, m1, m2, 0.85, 0.85)
    assert torch.all(m1 == 0)


def test_mask_to_budget_and_apply(use_backend):
    torch.manual_seed(5)
    L = FlatLayout(SHAPES)
    use_backend("triton")
    scores = torch.rand(L.total_rank)
    keep = ops.keep_mask_to_budget(scores, 30)
    Es = [torch.randn(r, 1) for r, _, _ in SHAPES]
    before = [e.clone() for e in Es]
    ops.apply_mask(Es, keep, L.ranks)
    for e, b0, part in zip(Es, before, keep.split(L.ranks)):
        assert torch.equal(e.view(-1), torch.where(part, b0.view(-1), torch.zeros_like(b0.view(-1))))
    assert int((torch.cat([e.view(-1) for e in Es]) == 0).sum()) == 30


# ---------------------------------------------------------------------------------------------
# orthogonal penalty


@pytest.mark.parametrize("shapes", [SHAPES, [(1, 16, 16)], [(0, 8, 8)]], ids=["mixed", "r1", "r0only"])
def test_orth_penalty_parity(use_backend, shapes):
    torch.manual_seed(6)
    L = FlatLayout(shapes)
    params, _ = _adapters(shapes)
    res = {}
    for be in ("triton", "reference"):
        ps = [p.detach().clone().requires_grad_() for p in params]
        mats = [p for i, p in enumerate(ps) if i % 3 != 2]
        if be == "triton":
            use_backend("triton")
            loss = ops.orth_penalty(L, ps)
        else:
            loss = ref.orth_penalty(ps[0::3], ps[1::3])
        if loss.requires_grad:
            gr = torch.autograd.grad(loss * 3.0, mats, allow_unused=True)
        else:
            gr = [None] * len(mats)
        res[be] = (loss.detach(), gr)
    (l1, g1), (l2, g2) = res["triton"], res["reference"]
    torch.testing.assert_close(l1, l2.to(l1.dtype), rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        if b is None or b.numel() == 0:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
