"""The orthogonal regulariser ``ops.orth_penalty(lora_A, lora_B)`` (value and gradients) against
``reference.orth_penalty``, on every real implementation (the ``impl`` fixture: "torch", "cpp"
(the same torch ops: the penalty has no C++ kernel), "triton" = the Triton kernels under the
interpreter).
"""

from __future__ import annotations

import pytest
import torch

from adalora_fast import ops, reference
from tolerances import assert_close, rtol_for

SHAPE_SETS = {
    # repeated shapes (one group of 3 layers), r = 0 and r = 1 layers, k != d
    "mixed": [(4, 8, 6), (1, 5, 7), (4, 8, 6), (0, 8, 6), (3, 6, 9), (4, 8, 6), (0, 3, 2), (2, 7, 7)],
    # ranks and widths crossing the kernels' tiles
    "wide": [(12, 40, 24), (6, 40, 24), (0, 17, 9), (1, 33, 70), (32, 80, 16), (12, 40, 24), (20, 19, 300)],
    "r1": [(1, 16, 16)],
    "r0only": [(0, 8, 8)],
}


def _mats(shapes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, k, generator=gen) * 0.4).to(dtype).requires_grad_() for r, k, _ in shapes]
    Bs = [(torch.randn(d, r, generator=gen) * 0.4).to(dtype).requires_grad_() for r, _, d in shapes]
    return As, Bs


def _fresh(ms, dtype=None):
    return [m.detach().to(dtype or m.dtype).clone().requires_grad_() for m in ms]


def _check_against_reference(As, Bs, upstream=1.0):
    """ops.orth_penalty's value and every matrix's gradient against reference.orth_penalty's."""
    val = ops.orth_penalty(As, Bs)
    rAs, rBs = _fresh(As), _fresh(Bs)
    rval = reference.orth_penalty(rAs, rBs)
    assert val.dim() == 0 and val.dtype == torch.float32
    assert_close(val, rval, what="penalty")
    (val * upstream).backward()
    (rval * upstream).backward()
    for i, (m, rm) in enumerate(zip(As + Bs, rAs + rBs)):
        if m.numel() == 0:  # r = 0: an empty gradient or none, either is fine
            assert m.grad is None or m.grad.numel() == 0
            continue
        assert_close(m.grad, rm.grad, what=f"matrix {i} ({'A' if i < len(As) else 'B'})")


@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=str)
def test_orth_penalty_value_and_grads_match_reference(impl, shapes):
    As, Bs = _mats(SHAPE_SETS[shapes], seed=4)
    _check_against_reference(As, Bs, upstream=3.0)  # a gradient other than 1 reaches every matrix


def test_orth_penalty_is_peft_mean_with_rank_zero_layers(impl):
    """PEFT's form: the mean over every A and B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F (not squared);
    r = 0 matrices count in the mean with a norm of 0."""
    shapes = SHAPE_SETS["mixed"]
    As, Bs = _mats(shapes, seed=5)
    manual = sum(
        torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0]))
        + torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1]))
        for a, b in zip(As, Bs)
    ) / (2 * len(shapes))
    assert_close(ops.orth_penalty(As, Bs).detach(), manual.detach(), what="penalty")
    assert ops.orth_penalty([], []).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_orth_penalty_half_parameters_and_autocast(impl, dtype):
    """The penalty is computed in fp32 whatever the parameters' dtype, and under autocast too; each
    gradient comes back in its matrix's dtype."""
    As, Bs = _mats(SHAPE_SETS["mixed"], seed=6, dtype=dtype)
    rAs, rBs = _fresh(As, torch.float32), _fresh(Bs, torch.float32)  # the same values, in fp32
    rval = reference.orth_penalty(rAs, rBs)
    rval.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = ops.orth_penalty(As, Bs)
    assert val.dtype == torch.float32
    assert_close(val, rval, what="penalty")
    val.backward()
    for i, (m, rm) in enumerate(zip(As + Bs, rAs + rBs)):
        if m.numel() == 0:
            continue
        assert m.grad.dtype == dtype
        # an fp32 gradient rounded once to the parameter's dtype
        assert_close(m.grad, rm.grad.to(dtype), what=f"matrix {i}", rtol=rtol_for(dtype))


def test_orth_penalty_rank_above_64(impl):
    """The Triton kernels take r <= 64: a forced Triton raises a clear error; the torch paths compute it."""
    As, Bs = _mats([(65, 70, 66)], seed=7)
    if impl == "triton":
        with pytest.raises(NotImplementedError, match="rank 65"):
            ops.orth_penalty(As, Bs)
        return
    _check_against_reference(As, Bs)


def test_orth_penalty_rejects_mismatched_lists(impl):
    As, Bs = _mats([(4, 8, 6), (2, 5, 5)], seed=8)
    with pytest.raises(ValueError, match="lora_A"):
        ops.orth_penalty(As, Bs[:1])
    with pytest.raises(ValueError, match="lora_A"):
        ops.orth_penalty(As, Bs[::-1])


def test_orth_penalty_forced_reference_backward(use_backend):
    """``ADALORA_FAST_BACKEND=reference`` (the path the PEFT parity tests force) runs the op too. Not
    the reference against itself: this checks the op's plumbing around it (the reference's autograd
    graph built inside the backward op), which the other tests never reach."""
    use_backend("reference")
    As, Bs = _mats(SHAPE_SETS["mixed"], seed=9)
    _check_against_reference(As, Bs)
