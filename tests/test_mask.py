"""The masking ops ``ops.keep_mask_to_budget`` and ``ops.apply_mask`` against
``reference.keep_mask_to_budget`` / ``reference.apply_mask`` (and PEFT's kthvalue rule where it has
no ties), on every real implementation (the ``impl`` fixture: "torch", "cpp" = the C++ selection
and masking, "triton" = the Triton mask kernel under the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adalora_fast import ops, reference


# ----------------------------------------------------------------------------- keep_mask_to_budget
def test_keep_mask_to_budget_exact_count_with_ties(impl):
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.5])
    for n in range(scores.numel() + 1):
        keep = ops.keep_mask_to_budget(scores, n)
        assert keep.dtype == torch.bool and keep.shape == scores.shape
        assert int((~keep).sum()) == n, f"n_prune={n} pruned {int((~keep).sum())}"
        if 0 < n < scores.numel():
            # every pruned score is <= every kept score
            assert scores[~keep].max() <= scores[keep].min()
        assert torch.equal(keep, reference.keep_mask_to_budget(scores, n))
    # all-zero scores (right after a zero-init warm-up): exactly n, the first ones
    keep = ops.keep_mask_to_budget(torch.zeros(10), 4)
    assert torch.equal(keep, torch.tensor([False] * 4 + [True] * 6))


def test_keep_mask_to_budget_equals_peft_rule_without_ties(impl):
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(50, generator=gen)
    assert scores.unique().numel() == 50
    for n in (1, 7, 25, 49, 50):
        thr = torch.kthvalue(scores, n).values
        peft_keep = ~(scores <= thr)
        assert torch.equal(ops.keep_mask_to_budget(scores, n), peft_keep)
    assert torch.all(ops.keep_mask_to_budget(scores, 0))
    for bad in (-1, 51):
        with pytest.raises(ValueError, match="n_prune"):
            ops.keep_mask_to_budget(scores, bad)


def test_keep_mask_to_budget_matches_stable_sort_with_ties_nan_and_signed_zero(impl):
    """Exactly the set a stable sort's first n_prune would prune: ties by position, NaN last, -0.0
    equal to 0.0 (the C++ selection is O(n), not a sort)."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        n = int(torch.randint(1, 300, (1,), generator=gen))
        scores = torch.randint(0, 6, (n,), generator=gen).float() / 4  # many ties
        if trial % 3 == 0:
            scores[torch.rand(n, generator=gen) < 0.1] = float("nan")
        if trial % 4 == 0:
            scores[torch.rand(n, generator=gen) < 0.2] = -0.0
        for n_prune in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            got = ops.keep_mask_to_budget(scores, n_prune)
            assert torch.equal(got, reference.keep_mask_to_budget(scores, n_prune)), (trial, n, n_prune)


# ----------------------------------------------------------------------------- apply_mask
def test_apply_mask_matches_reference_in_place(impl):
    gen = torch.Generator().manual_seed(3)
    ranks = [4, 0, 1, 3, 4]
    E = [torch.randn(r, 1, generator=gen) for r in ranks]
    keep = torch.rand(sum(ranks), generator=gen) > 0.5
    keep[0] = False
    keep[1] = True
    Er = [e.clone() for e in E]
    reference.apply_mask(Er, keep)
    Ep = [nn.Parameter(e.clone()) for e in E]  # on Parameters, in place
    ids = [id(p) for p in Ep]
    ptrs = [p.data_ptr() for p in Ep]
    ops.apply_mask(Ep, keep)
    assert [id(p) for p in Ep] == ids and [p.data_ptr() for p in Ep] == ptrs
    for p, er, e, kp in zip(Ep, Er, E, keep.split(ranks)):
        assert torch.equal(p.data, er)
        assert torch.equal(p.data, e * kp.view(-1, 1).float())


def test_apply_mask_bumps_versions_and_takes_mixed_dtypes(impl):
    """In place on the parameters, as PEFT's masked_fill_: the version counters move (autograd
    then refuses a backward through a stale saved E), and a list mixing dtypes still works."""
    keep = torch.tensor([True, False, True, False, True])
    E = [nn.Parameter(torch.ones(3, 1)), nn.Parameter(torch.ones(2, 1))]
    versions = [p._version for p in E]
    ops.apply_mask(E, keep)
    assert all(p._version > v for p, v in zip(E, versions))
    assert E[0].view(-1).tolist() == [1.0, 0.0, 1.0] and E[1].view(-1).tolist() == [0.0, 1.0]
    for dt in (torch.bfloat16, torch.float16):
        mixed = [torch.ones(3, 1), torch.ones(2, 1, dtype=dt)]
        ops.apply_mask(mixed, keep)
        assert mixed[0].view(-1).tolist() == [1.0, 0.0, 1.0] and mixed[1].view(-1).tolist() == [0.0, 1.0], dt
        assert mixed[1].dtype == dt


def test_apply_mask_fp64(impl):
    """fp64 adapters (an fp64 model's) are masked by every implementation (the Triton one hands
    them to torch ops), beside the other dtypes."""
    keep = torch.tensor([True, False, True, False])
    E = [torch.ones(3, 1, dtype=torch.float64), torch.ones(1, 1)]
    ops.apply_mask(E, keep)
    assert E[0].view(-1).tolist() == [1.0, 0.0, 1.0] and E[1].item() == 0.0


def test_apply_mask_wrong_length_raises(impl):
    keep = torch.tensor([True, False, True, False, True])
    E = [torch.ones(3, 1), torch.ones(3, 1)]
    with pytest.raises(ValueError, match="keep"):
        ops.apply_mask(E, keep)
    with pytest.raises(ValueError, match="bool"):
        ops.apply_mask(E, torch.ones(6))
    assert all(torch.all(e == 1) for e in E), "nothing masked"


def test_mask_to_budget_then_apply(impl):
    """The allocator's masking step: prune exactly n_prune triplets of many layers."""
    gen = torch.Generator().manual_seed(5)
    ranks = [12, 6, 0, 1, 32, 12, 20]
    scores = torch.rand(sum(ranks), generator=gen)
    keep = ops.keep_mask_to_budget(scores, 30)
    Es = [torch.randn(r, 1, generator=gen) for r in ranks]
    before = [e.clone() for e in Es]
    ops.apply_mask(Es, keep)
    for e, b0, part in zip(Es, before, keep.split(ranks)):
        assert torch.equal(e.view(-1), torch.where(part, b0.view(-1), torch.zeros_like(b0.view(-1))))
    assert int((torch.cat([e.view(-1) for e in Es]) == 0).sum()) == 30
