"""The importance ops ``ops.importance_update`` and ``ops.triplet_scores`` against
``reference.importance_update`` / ``element_score`` / ``triplet_scores``, one tensor at a time, on
every real implementation (the ``impl`` fixture: "torch", "cpp" = the C++ pass, "triton" = the
Triton kernel under the interpreter). The FlatLayout their state lives in: ``test_layout.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device_for
from torch import nn

from adalora_fast import ops, reference
from adalora_fast.ops import FlatLayout
from adalora_fast.ops.layout import KIND_A, KIND_B, KIND_E, split_kinds, tensor_index
from tiny_models import LAYOUT_SHAPES, adapter_params
from tolerances import assert_close

# Shapes crossing the Triton kernel's tiles (16 triplets x 128 columns): r > 16, k and d > 128.
TILE_SHAPES = [(12, 40, 24), (6, 40, 24), (0, 17, 9), (1, 33, 70), (32, 80, 16), (12, 40, 24), (20, 19, 300)]
LAYOUTS = {"small": LAYOUT_SHAPES, "tiles": TILE_SHAPES}

# The EMA is the same elementwise arithmetic in every implementation: much tighter than a product.
STATE_RTOL = 1e-6


def _view(layout, buf, t):
    o = layout.offsets[t]
    return buf[o : o + layout.numel_of(t)].view(layout.tensor_shapes[t])


def _assert_same_results(impl, a, b):
    """Two (m1, m2, scores) of one implementation from the same inputs: bit for bit.

    Except the scores of the Triton kernel on a GPU: each triplet's score is the sum of three
    partial sums (its A row, B column and E entry) that the kernel's programs add into the zeroed
    score vector with fp32 atomics, in whatever order they run, so two launches on the same inputs
    may round the sum differently in the last bits (a few ulp: three non-negative fp32 terms). m1
    and m2 are written without atomics and stay bitwise equal; the interpreter (CPU) adds in
    program order and stays bitwise equal too."""
    (m1a, m2a, sa), (m1b, m2b, sb) = a, b
    assert torch.equal(m1a, m1b), "m1"
    assert torch.equal(m2a, m2b), "m2"
    if device_for(impl).type == "cuda":
        torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0.0, msg=lambda m: f"scores: {m}")
    else:
        assert torch.equal(sa, sb), "scores"


def _expected_scores(layout, m1s, m2s):
    """reference.triplet_scores of every layer, from per-tensor reference states."""
    out = []
    for i in range(layout.n_layers):
        sA, sB, sE = (
            reference.element_score(m1s[tensor_index(i, k)], m2s[tensor_index(i, k)]) for k in (KIND_A, KIND_B, KIND_E)
        )
        out.append(reference.triplet_scores(sA, sE, sB))
    return torch.cat(out)


# ----------------------------------------------------------------------------- importance_update
@pytest.mark.parametrize("shapes", list(LAYOUTS), ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_importance_update_matches_reference_over_steps(impl, shapes, masked):
    gen = torch.Generator().manual_seed(1)
    shapes = LAYOUTS[shapes]
    layout = FlatLayout(shapes)
    params = adapter_params(shapes, gen)
    beta1, beta2 = 0.85, 0.7
    if shapes is LAYOUT_SHAPES:  # PEFT's start: zero state
        m1, m2 = torch.zeros(layout.numel), torch.zeros(layout.numel)
    else:  # any state
        m1, m2 = torch.rand(layout.numel, generator=gen), torch.rand(layout.numel, generator=gen)
    ref_m1 = [_view(layout, m1, t).clone() for t in range(len(params))]
    ref_m2 = [_view(layout, m2, t).clone() for t in range(len(params))]
    n_scores = 0
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        want = step % 2 == 1
        scores = ops.importance_update(layout, params, grads, m1, m2, beta1, beta2, want_scores=want)
        for t, (p, g) in enumerate(zip(params, grads)):  # the reference, tensor by tensor
            ref_m1[t], ref_m2[t], _ = reference.importance_update(p, g, ref_m1[t], ref_m2[t], beta1, beta2)
        assert m1.dtype == torch.float32 and m1.shape == (layout.numel,)
        for t in range(len(params)):
            assert_close(_view(layout, m1, t), ref_m1[t], what=f"step {step} m1 {t}", rtol=STATE_RTOL)
            assert_close(_view(layout, m2, t), ref_m2[t], what=f"step {step} m2 {t}", rtol=STATE_RTOL)
        if want:
            n_scores += 1
            expect = _expected_scores(layout, ref_m1, ref_m2)
            assert expect.shape == (layout.total_rank,)
            assert scores.dtype == torch.float32
            assert_close(scores, expect, what=f"step {step} scores")
            # triplet_scores (no update) agrees with the scores returned by the update
            assert_close(ops.triplet_scores(layout, m1, m2), expect, what=f"step {step} triplet_scores")
        else:
            assert scores is None
        if masked:
            # mask some E between steps, as the allocator does: zeroed E changes |p * g|
            keep = torch.rand(layout.total_rank, generator=gen) > 0.4
            E = split_kinds(params)[KIND_E]
            ops.apply_mask(E, keep)
            for e, kp in zip(E, keep.split(layout.ranks)):
                assert torch.all(e[~kp] == 0)
    assert n_scores == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_importance_update_half_parameters(impl, dtype):
    """Half adapters (not PEFT's default): the state stays fp32; the implementations form |p·g| in
    fp32 where the reference (PEFT) rounds the product to the half dtype first."""
    gen = torch.Generator().manual_seed(2)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = adapter_params(LAYOUT_SHAPES, gen, dtype)
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    m1, m2 = torch.rand(layout.numel, generator=gen), torch.rand(layout.numel, generator=gen)
    ref = [
        reference.importance_update(p, g, _view(layout, m1, t), _view(layout, m2, t), 0.85, 0.8)
        for t, (p, g) in enumerate(zip(params, grads))
    ]
    scores = ops.importance_update(layout, params, grads, m1, m2, 0.85, 0.8, want_scores=True)
    for t, (e1, e2, _) in enumerate(ref):
        assert_close(_view(layout, m1, t), e1, dtype, f"m1 {t}")
        assert_close(_view(layout, m2, t), e2, dtype, f"m2 {t}")
    assert_close(scores, _expected_scores(layout, [e[0] for e in ref], [e[1] for e in ref]), dtype, "scores")


def test_importance_update_reads_param_grads_when_grads_is_none(impl):
    """grads=None (what the allocator passes) means each parameter's .grad: the same state and
    scores as the explicit list; a missing .grad raises and changes nothing."""
    gen = torch.Generator().manual_seed(11)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = [nn.Parameter(t) for t in adapter_params(LAYOUT_SHAPES, gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    out = []
    for grads in ([p.grad for p in params], None):
        st = torch.Generator().manual_seed(1)
        m1, m2 = torch.rand(layout.numel, generator=st), torch.rand(layout.numel, generator=st)
        s = ops.importance_update(layout, params, grads, m1, m2, 0.85, 0.8, want_scores=True)
        out.append((m1, m2, s))
    _assert_same_results(impl, *out)
    params[4].grad = None
    m1, m2 = torch.rand(layout.numel, generator=gen), torch.rand(layout.numel, generator=gen)
    before = (m1.clone(), m2.clone())
    with pytest.raises(ValueError, match="adapter tensor 4 .*no gradient"):
        ops.importance_update(layout, params, None, m1, m2, 0.85, 0.8, want_scores=False)
    assert torch.equal(m1, before[0]) and torch.equal(m2, before[1]), "a failed update leaves the state as it was"


def test_importance_update_missing_grad_in_list_raises_and_leaves_state(impl):
    layout = FlatLayout([(2, 16, 16), (3, 8, 8)])
    gen = torch.Generator().manual_seed(3)
    params = adapter_params(layout.shapes, gen)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[4] = None  # layer 1's B
    m1, m2 = torch.rand(layout.numel, generator=gen), torch.rand(layout.numel, generator=gen)
    before = (m1.clone(), m2.clone())
    with pytest.raises(ValueError, match="lora_B.*no gradient"):
        ops.importance_update(layout, params, grads, m1, m2, 0.85, 0.85)
    assert torch.equal(m1, before[0]) and torch.equal(m2, before[1])


def test_importance_update_takes_non_contiguous_grads(impl):
    gen = torch.Generator().manual_seed(9)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = adapter_params(LAYOUT_SHAPES, gen)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    strided = [g.t().contiguous().t() if g.dim() == 2 and min(g.shape) > 1 else g for g in grads]
    assert any(not g.is_contiguous() for g in strided)
    out = []
    for gs in (grads, strided):
        m1, m2 = torch.zeros(layout.numel), torch.zeros(layout.numel)
        s = ops.importance_update(layout, params, gs, m1, m2, 0.85, 0.85, want_scores=True)
        out.append((m1, m2, s))
    _assert_same_results(impl, *out)


def test_importance_update_rejects_a_wrong_state(impl):
    layout = FlatLayout(LAYOUT_SHAPES)
    params = adapter_params(LAYOUT_SHAPES, torch.Generator().manual_seed(4))
    grads = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match="m1"):
        ops.importance_update(layout, params, grads, torch.zeros(layout.numel + 1), torch.zeros(layout.numel), 0.8, 0.8)
    with pytest.raises(ValueError, match="m2"):
        ops.importance_update(
            layout, params, grads, torch.zeros(layout.numel), torch.zeros(layout.numel).double(), 0.8, 0.8
        )
    with pytest.raises(ValueError, match="shape"):
        ops.importance_update(
            layout, params[3:] + params[:3], grads, torch.zeros(layout.numel), torch.zeros(layout.numel), 0.8, 0.8
        )


def test_importance_update_checks_replaced_data_every_call(impl):
    """``p.data = bigger`` keeps the parameter's identity: the op still compares every tensor's
    shape (and every gradient's) with the layout on each call, raises naming the tensor, and
    changes nothing, instead of reading or writing another tensor's state."""
    layout = FlatLayout(LAYOUT_SHAPES)
    gen = torch.Generator().manual_seed(5)
    params = [nn.Parameter(t) for t in adapter_params(LAYOUT_SHAPES, gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    m1, m2 = torch.zeros(layout.numel), torch.zeros(layout.numel)
    ops.importance_update(layout, params, None, m1, m2, 0.85, 0.8)  # the same tensors pass: cached
    before = (m1.clone(), m2.clone())
    for t, grow in ((0, (1, 0)), (4, (0, 1)), (2, (1, 0))):  # layer 0's A, layer 1's B, layer 0's E
        old = params[t].data
        params[t].data = torch.randn(old.shape[0] + grow[0], old.shape[1] + grow[1], generator=gen)
        with pytest.raises(ValueError, match=f"adapter tensor {t} .*has shape"):
            ops.importance_update(layout, params, None, m1, m2, 0.85, 0.8)
        params[t].data = old
        grads = [p.grad for p in params]
        grads[t] = torch.randn(old.shape[0] + grow[0], old.shape[1] + grow[1], generator=gen)
        with pytest.raises(ValueError, match=f"gradient of adapter tensor {t} .*has shape"):
            ops.importance_update(layout, params, grads, m1, m2, 0.85, 0.8)
    assert torch.equal(m1, before[0]) and torch.equal(m2, before[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_importance_update_skips_non_finite_elements(impl, dtype):
    """A NaN or inf in |p·g| (a NaN or inf gradient, or an inf parameter) leaves that element's m1
    and m2 as they were and is counted per tensor; every other element is updated as usual, and the
    scores stay finite. Checked against the reference over three steps, the bad elements moving."""
    gen = torch.Generator().manual_seed(21)
    layout = FlatLayout(TILE_SHAPES)
    params = adapter_params(TILE_SHAPES, gen, dtype)
    T = len(params)
    m1, m2 = torch.rand(layout.numel, generator=gen), torch.rand(layout.numel, generator=gen)
    ref_m1 = [_view(layout, m1, t).clone() for t in range(T)]
    ref_m2 = [_view(layout, m2, t).clone() for t in range(T)]
    skipped = torch.zeros(T, dtype=torch.int64)
    expect_skipped = torch.zeros(T, dtype=torch.int64)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        for t, bad in ((0, float("nan")), (1, float("inf")), (4 + step, float("-inf")), (T - 3, float("nan"))):
            if grads[t].numel():
                flat = grads[t].view(-1)
                idx = torch.randint(flat.numel(), (3,), generator=gen)
                flat[idx] = bad
        before = [(_view(layout, m1, t).clone(), _view(layout, m2, t).clone()) for t in range(T)]
        scores = ops.importance_update(layout, params, grads, m1, m2, 0.85, 0.8, want_scores=True, skipped=skipped)
        for t, (p, g) in enumerate(zip(params, grads)):
            ref_m1[t], ref_m2[t], n = reference.importance_update(p, g, ref_m1[t], ref_m2[t], 0.85, 0.8)
            expect_skipped[t] += n
            bad = ~torch.isfinite(p.float() * g.float())
            assert torch.equal(_view(layout, m1, t)[bad], before[t][0][bad]), f"step {step} m1 {t} moved"
            assert torch.equal(_view(layout, m2, t)[bad], before[t][1][bad]), f"step {step} m2 {t} moved"
            rtol = STATE_RTOL if dtype == torch.float32 else None  # half: the reference rounds p·g to bf16
            assert_close(_view(layout, m1, t), ref_m1[t], dtype, f"step {step} m1 {t}", rtol=rtol)
            assert_close(_view(layout, m2, t), ref_m2[t], dtype, f"step {step} m2 {t}", rtol=rtol)
        assert torch.isfinite(m1).all() and torch.isfinite(m2).all() and torch.isfinite(scores).all()
        assert torch.equal(skipped, expect_skipped), (skipped.tolist(), expect_skipped.tolist())
    assert int(skipped.sum()) > 0
