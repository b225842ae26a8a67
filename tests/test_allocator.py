"""Importance, masking and orthogonal-penalty ops, and RankAllocator/AdaLoraModel schedule behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adalora_fast as af
from adalora_fast import ops, reference
from adalora_fast.ops import FlatLayout
from adalora_fast.ops import reference_backend, torch_backend

# Several (r, k, d): repeated shapes (one group of 3 layers), r = 0 and r = 1 layers, k != d.
LAYOUT_SHAPES = [(4, 8, 6), (1, 5, 7), (4, 8, 6), (0, 8, 6), (3, 6, 9), (4, 8, 6), (0, 3, 2), (2, 7, 7)]


@pytest.fixture(autouse=True, params=["ext", "no-ext"])
def cpu_ext_mode(request, monkeypatch):
    """Every test runs on the C++ allocator kernels and on the pure-torch ops."""
    from adalora_fast.ops import cpu_ext

    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "1" if request.param == "ext" else "0")
    if request.param == "ext":
        assert cpu_ext.available(), f"C++ CPU kernels did not build: {cpu_ext._state['error']}"
    return request.param


def _params(shapes, gen):
    ps = []
    for r, k, d in shapes:
        ps += [torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), torch.randn(r, 1, generator=gen)]
    return ps


def _view(layout, buf, t):
    o = layout.offsets[t]
    return buf[o : o + layout.numel_of(t)].view(layout.tensor_shapes[t])


# ----------------------------------------------------------------------------- layout
def test_layout_offsets_cover_state_once():
    layout = FlatLayout(LAYOUT_SHAPES)
    assert layout.numel == sum(r * k + d * r + r for r, k, d in LAYOUT_SHAPES)
    assert layout.total_rank == sum(r for r, _, _ in LAYOUT_SHAPES)
    covered = torch.zeros(layout.numel, dtype=torch.int64)
    for t in range(len(layout.tensor_shapes)):
        o = layout.offsets[t]
        covered[o : o + layout.numel_of(t)] += 1
    assert torch.all(covered == 1)
    with pytest.raises(ValueError, match="shape"):
        bad = _params(LAYOUT_SHAPES, torch.Generator().manual_seed(0))
        bad[0] = torch.zeros(5, 8)
        layout.check(bad)


# ----------------------------------------------------------------------------- importance_update
@pytest.mark.parametrize("masked", [False, True])
def test_importance_update_backends_match_reference_over_steps(use_backend, masked):
    gen = torch.Generator().manual_seed(1)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = _params(LAYOUT_SHAPES, gen)
    beta1, beta2 = 0.85, 0.7
    state = {b: (torch.zeros(layout.numel), torch.zeros(layout.numel)) for b in ("torch", "reference")}
    ref_m1 = [torch.zeros(s) for s in layout.tensor_shapes]
    ref_m2 = [torch.zeros(s) for s in layout.tensor_shapes]
    n_scores = 0
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        want = step % 2 == 1
        results = {}
        for b, (m1, m2) in state.items():
            use_backend(b)
            results[b] = ops.importance_update(layout, params, grads, m1, m2, beta1, beta2, want_scores=want)
        # the reference, tensor by tensor
        for t, (p, g) in enumerate(zip(params, grads)):
            ref_m1[t], ref_m2[t] = reference.importance_update(p, g, ref_m1[t], ref_m2[t], beta1, beta2)
        for b, (m1, m2) in state.items():
            assert m1.dtype == torch.float32 and m1.shape == (layout.numel,)
            for t in range(len(params)):
                torch.testing.assert_close(_view(layout, m1, t), ref_m1[t], rtol=1e-6, atol=1e-7, msg=f"{b} m1 {t}")
                torch.testing.assert_close(_view(layout, m2, t), ref_m2[t], rtol=1e-6, atol=1e-7, msg=f"{b} m2 {t}")
        if want:
            n_scores += 1
            expect = torch.cat(
                [
                    reference.triplet_scores(
                        reference.element_score(ref_m1[3 * i], ref_m2[3 * i]),
                        reference.element_score(ref_m1[3 * i + 2], ref_m2[3 * i + 2]),
                        reference.element_score(ref_m1[3 * i + 1], ref_m2[3 * i + 1]),
                    )
                    for i in range(layout.n_layers)
                ]
            )
            assert expect.shape == (layout.total_rank,)
            for b in state:
                assert results[b].shape == (layout.total_rank,)
                torch.testing.assert_close(results[b], expect, rtol=1e-5, atol=1e-9, msg=b)
            # triplet_scores (no update) agrees with the scores returned by the update
            for b, (m1, m2) in state.items():
                use_backend(b)
                torch.testing.assert_close(ops.triplet_scores(layout, m1, m2), expect, rtol=1e-5, atol=1e-9)
        else:
            assert results["torch"] is None and results["reference"] is None
        if masked:
            # mask some E between steps, as the allocator does: zeroed E changes |p * g|
            keep = torch.rand(layout.total_rank, generator=gen) > 0.4
            E = params[2::3]
            use_backend("torch")
            ops.apply_mask(E, keep, layout.ranks)
            for e, kp in zip(E, keep.split(layout.ranks)):
                assert torch.all(e[~kp] == 0)
    assert n_scores == 3


# ----------------------------------------------------------------------------- keep_mask_to_budget
def test_keep_mask_exact_count_with_ties():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.5])
    for n in range(scores.numel() + 1):
        keep = ops.keep_mask_to_budget(scores, n)
        assert keep.dtype == torch.bool and keep.shape == scores.shape
        assert int((~keep).sum()) == n, f"n_prune={n} pruned {int((~keep).sum())}"
        if 0 < n < scores.numel():
            # every pruned score is <= every kept score
            assert scores[~keep].max() <= scores[keep].min()
    # all-zero scores (right after a zero-init warm-up): exactly n, the first ones
    z = torch.zeros(10)
    keep = ops.keep_mask_to_budget(z, 4)
    assert int((~keep).sum()) == 4
    assert torch.equal(keep, torch.tensor([False] * 4 + [True] * 6))


def test_keep_mask_equals_peft_rule_without_ties():
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


def test_keep_mask_matches_stable_sort_with_ties_nan_and_signed_zero():
    """The backend's selection (O(n) C++ with the extension) prunes exactly the set a stable sort's
    first n_prune would: ties by position, NaN last, -0.0 equal to 0.0."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        n = int(torch.randint(1, 300, (1,), generator=gen))
        scores = torch.randint(0, 6, (n,), generator=gen).float() / 4  # many ties
        if trial % 3 == 0:
            scores[torch.rand(n, generator=gen) < 0.1] = float("nan")
        if trial % 4 == 0:
            scores[torch.rand(n, generator=gen) < 0.2] = -0.0
        for n_prune in {0, 1, n // 3, n // 2, n - 1, n}:
            got = ops.keep_mask_to_budget(scores, n_prune)
            assert torch.equal(got, reference.keep_mask_to_budget(scores, n_prune)), (trial, n, n_prune)


# ----------------------------------------------------------------------------- apply_mask
def test_apply_mask_backends_agree():
    gen = torch.Generator().manual_seed(3)
    ranks = [4, 0, 1, 3, 4]
    E = [torch.randn(r, 1, generator=gen) for r in ranks]
    keep = torch.rand(sum(ranks), generator=gen) > 0.5
    keep[0] = False
    keep[1] = True
    Et = [e.clone() for e in E]
    Er = [e.clone() for e in E]
    torch_backend.apply_mask(Et, keep, ranks)
    reference_backend.apply_mask(Er, keep, ranks)
    for e, et, er, kp in zip(E, Et, Er, keep.split(ranks)):
        assert torch.equal(et, er)
        assert torch.equal(et, e * kp.view(-1, 1).float())
    # via the dispatcher, on Parameters, in place
    Ep = [nn.Parameter(e.clone()) for e in E]
    ids = [id(p) for p in Ep]
    ops.apply_mask(Ep, keep, ranks)
    assert [id(p) for p in Ep] == ids
    for p, er in zip(Ep, Er):
        assert torch.equal(p.data, er)


def test_apply_mask_bumps_versions_and_takes_mixed_dtypes():
    """In place on the parameters, as PEFT's masked_fill_: the version counters move (autograd
    then refuses a backward through a stale saved E), and a list mixing dtypes still works."""
    ranks = [3, 2]
    keep = torch.tensor([True, False, True, False, True])
    E = [nn.Parameter(torch.ones(3, 1)), nn.Parameter(torch.ones(2, 1))]
    versions = [p._version for p in E]
    ops.apply_mask(E, keep, ranks)
    assert all(p._version > v for p, v in zip(E, versions))
    assert E[0].view(-1).tolist() == [1.0, 0.0, 1.0] and E[1].view(-1).tolist() == [0.0, 1.0]
    mixed = [torch.ones(3, 1), torch.ones(2, 1, dtype=torch.float64)]
    ops.apply_mask(mixed, keep, ranks)
    assert mixed[0].view(-1).tolist() == [1.0, 0.0, 1.0] and mixed[1].view(-1).tolist() == [0.0, 1.0]
    with pytest.raises(RuntimeError):
        ops.apply_mask([torch.ones(3, 1), torch.ones(3, 1)], keep, [3, 3])


# ----------------------------------------------------------------------------- orth_penalty
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_orth_penalty_value_and_grads_match_reference(use_backend, backend):
    use_backend(backend)
    gen = torch.Generator().manual_seed(4)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = [p.mul_(0.4).requires_grad_() for p in _params(LAYOUT_SHAPES, gen)]
    val = ops.orth_penalty(layout, params)
    val.backward()
    rparams = [p.detach().clone().requires_grad_() for p in params]
    rval = reference.orth_penalty(rparams[0::3], rparams[1::3])
    rval.backward()
    assert val.dim() == 0
    torch.testing.assert_close(val, rval, rtol=1e-5, atol=1e-6)
    for t, (p, rp) in enumerate(zip(params, rparams)):
        if t % 3 == 2:  # E does not enter the penalty
            assert p.grad is None or torch.all(p.grad == 0)
            continue
        if p.numel() == 0:  # r = 0: an empty gradient or none, either is fine
            assert p.grad is None or p.grad.numel() == 0
            continue
        assert p.grad is not None, f"tensor {t}"
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-5, atol=1e-6, msg=f"tensor {t}")
    # the r = 0 layers count in the mean (PEFT): 2 matrices per layer
    n_mat = 2 * len(LAYOUT_SHAPES)
    manual = sum(
        torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])) + torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1]))
        for a, b in zip(rparams[0::3], rparams[1::3])
    ) / n_mat
    torch.testing.assert_close(rval.detach(), manual.detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- RankAllocator / AdaLoraModel
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 12)
        self.c = nn.Linear(12, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))


def _model(seed=0, **cfg):
    torch.manual_seed(seed)
    base = Tiny()
    kw = dict(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=12, deltaT=1, target_modules=["a", "b", "c"])
    kw.update(cfg)
    return af.get_peft_model(base, af.AdaLoraConfig(**kw))


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 3, generator=g)


def _train_step(model, opt, step, update=True):
    x, y = _batch(step)
    loss = (model(x) - y).pow(2).mean() + 0.1 * model.orth_penalty()
    loss.backward()
    opt.step()
    if update:
        model.update_and_allocate(step)
    opt.zero_grad(set_to_none=False)
    return loss.detach()


def _E(model):
    return [m.lora_E["default"].detach().clone() for _, m in model.adapted_layers()]


def test_allocator_state_is_two_flat_fp32_buffers():
    model = _model()
    alloc = model.rankallocator
    layout = alloc.layout
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert layout.numel == n_adapter
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    _train_step(model, opt, 1)
    assert alloc.m1.dtype == torch.float32 and alloc.m2.dtype == torch.float32
    assert alloc.m1.shape == (layout.numel,) and alloc.m2.shape == (layout.numel,)
    tensors = [v for v in vars(alloc).values() if isinstance(v, torch.Tensor)]
    big = [t for t in tensors if t.numel() >= layout.numel]
    assert len(big) == 2, "exactly two full-size state buffers (no third ipt copy)"
    sd = alloc.state_dict()
    assert sd["exp_avg_ipt"].shape == (layout.numel,) and sd["exp_avg_unc"].shape == (layout.numel,)


def test_rank_pattern_none_before_first_mask_then_peft_keys():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in (1, 2):  # <= tinit: warm-up
        _train_step(model, opt, step)
        assert model.rank_pattern is None
        assert model.peft_config["default"].rank_pattern is None
    _train_step(model, opt, 3)
    rp = model.rank_pattern
    assert rp is not None
    assert set(rp) == {"a.lora_E.default", "b.lora_E.default", "c.lora_E.default"}
    for v in rp.values():
        assert isinstance(v, list) and len(v) == 4 and all(isinstance(b, bool) for b in v)
    # the pattern reflects E: pruned triplets have E == 0
    for (name, m) in model.adapted_layers():
        keep = torch.tensor(rp[f"{name}.lora_E.default"])
        assert torch.all(m.lora_E["default"][~keep] == 0)
    budget, _ = model.rankallocator.budget_schedule(3)
    assert sum(sum(v) for v in rp.values()) == budget


def test_schedule_prunes_exactly_to_budget_each_step():
    model = _model()
    alloc = model.rankallocator
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, 13):
        _train_step(model, opt, step)
        budget, mask_now = alloc.budget_schedule(step)
        if step <= 2:
            assert model.rank_pattern is None
            continue
        kept = sum(sum(v) for v in model.rank_pattern.values())
        if step >= 9:  # total_step - tfinal
            assert kept == alloc.target_bgt == 6
        else:
            assert kept == budget
        n_zero = sum(int((e == 0).sum()) for e in _E(model))
        assert n_zero == alloc.init_bgt - kept


def test_target_r_equal_init_r_masks_nothing():
    # PEFT: torch.kthvalue(k=0) raises here.
    model = _model(init_r=3, target_r=3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, 14):
        _train_step(model, opt, step)
        if step > 2:
            rp = model.rank_pattern
            assert rp is not None and all(all(v) for v in rp.values())
    for e in _E(model):
        assert torch.all(e != 0), "nothing was masked"


def test_skipped_final_step_still_finalises_and_reapplies_mask():
    # final phase starts at total_step - tfinal = 9; the counter jumps 8 -> 10
    model = _model()
    alloc = model.rankallocator
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in list(range(1, 9)) + [10, 11, 12]:
        _train_step(model, opt, step)
        if step == 10:
            assert alloc.finalized
            final = {k: list(v) for k, v in model.rank_pattern.items()}
            assert sum(sum(v) for v in final.values()) == alloc.target_bgt
            assert alloc.m1 is None and alloc.m2 is None, "state freed after finalising"
        if step > 10:
            assert model.rank_pattern == final
    # optimizer steps move the pruned E; the next update_and_allocate re-zeros them
    x, y = _batch(99)
    ((model(x) - y).pow(2).mean()).backward()
    opt.step()
    pruned_moved = sum(
        int((m.lora_E["default"][~torch.tensor(final[f"{n}.lora_E.default"])] != 0).sum()) for n, m in model.adapted_layers()
    )
    assert pruned_moved > 0
    model.update_and_allocate(13)
    for n, m in model.adapted_layers():
        keep = torch.tensor(final[f"{n}.lora_E.default"])
        assert torch.all(m.lora_E["default"][~keep] == 0)
        assert torch.all(m.lora_E["default"][keep] != 0)
    with pytest.raises(RuntimeError, match="step"):
        model.update_and_allocate(5)


def test_update_after_zero_grad_set_to_none_raises():
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = _batch(0)
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    E0 = _E(model)
    with pytest.raises(RuntimeError, match="zero_grad"):
        model.update_and_allocate(3)
    assert model.rankallocator.m1 is None, "nothing half-changed"
    for a, b in zip(E0, _E(model)):
        assert torch.equal(a, b)


def test_state_dict_round_trip_gives_same_masks():
    steps_a, steps_b = range(1, 5), range(5, 13)
    # uninterrupted
    full = _model(seed=7)
    opt = torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.05)
    patterns = {}
    for s in list(steps_a) + list(steps_b):
        _train_step(full, opt, s)
        patterns[s] = full.rank_pattern
    # interrupted after step 4, resumed in a fresh model
    first = _model(seed=7)
    opt1 = torch.optim.SGD([p for p in first.parameters() if p.requires_grad], lr=0.05)
    for s in steps_a:
        _train_step(first, opt1, s)
        assert first.rank_pattern == patterns[s]
    msd = {k: v.clone() for k, v in first.state_dict().items()}
    asd = {k: v.clone() for k, v in first.rankallocator.state_dict().items()}
    resumed = _model(seed=123)  # different init: everything must come from the state dicts
    resumed.load_state_dict(msd)
    resumed.rankallocator.load_state_dict(asd)
    assert torch.equal(resumed.rankallocator.m1, first.rankallocator.m1)
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    for s in steps_b:
        _train_step(resumed, opt2, s)
        assert resumed.rank_pattern == patterns[s], f"step {s}"
    for a, b in zip(_E(full), _E(resumed)):
        torch.testing.assert_close(a, b)
    # a state for other ranks is refused
    other = _model(init_r=5)
    with pytest.raises(ValueError, match="ranks"):
        other.rankallocator.load_state_dict(asd)


def test_update_and_allocate_makes_no_host_sync(monkeypatch):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for s in (1, 2, 3):
        _train_step(model, opt, s)

    def boom(*a, **k):
        raise AssertionError("host sync (.item()/.tolist()/bool()) inside update_and_allocate")

    x, y = _batch(4)
    for s in (4, 5, 6):  # masking steps of the budgeting phase (deltaT = 1), and 6 also with deltaT
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        with monkeypatch.context() as mp:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                mp.setattr(torch.Tensor, name, boom)
            model.update_and_allocate(s)
        opt.zero_grad(set_to_none=False)
    # it did mask (the patch did not make the step a no-op)
    assert sum(sum(v) for v in model.rank_pattern.values()) == model.rankallocator.budget_schedule(6)[0]


def test_update_and_allocate_rejects_bad_step():
    model = _model()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="global_step"):
            model.update_and_allocate(bad)


def test_importance_update_reads_param_grads_when_grads_is_none(use_backend):
    """grads=None (what the allocator passes) means each parameter's .grad: same state and scores
    as the explicit list, on every backend; a missing .grad raises and changes nothing."""
    gen = torch.Generator().manual_seed(11)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = [nn.Parameter(t) for t in _params(LAYOUT_SHAPES, gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    for b in ("torch", "reference"):
        use_backend(b)
        out = []
        for grads in ([p.grad for p in params], None):
            st = torch.Generator().manual_seed(1)
            m1, m2 = torch.rand(layout.numel, generator=st), torch.rand(layout.numel, generator=st)
            s = ops.importance_update(layout, params, grads, m1, m2, 0.85, 0.8, want_scores=True)
            out.append((m1, m2, s))
        for x, y in zip(*out):
            assert torch.equal(x, y), b
        params[4].grad = None
        m1, m2 = torch.rand(layout.numel), torch.rand(layout.numel)
        before = (m1.clone(), m2.clone())
        with pytest.raises((RuntimeError, ValueError), match="gradient"):
            ops.importance_update(layout, params, None, m1, m2, 0.85, 0.8, want_scores=False)
        assert torch.equal(m1, before[0]) and torch.equal(m2, before[1]), b
        params[4].grad = torch.randn(params[4].shape, generator=gen)


def test_importance_update_takes_non_contiguous_grads():
    gen = torch.Generator().manual_seed(9)
    layout = FlatLayout(LAYOUT_SHAPES)
    params = _params(LAYOUT_SHAPES, gen)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    strided = [g.t().contiguous().t() if g.dim() == 2 and min(g.shape) > 1 else g for g in grads]
    assert any(not g.is_contiguous() for g in strided)
    out = []
    for gs in (grads, strided):
        m1, m2 = torch.zeros(layout.numel), torch.zeros(layout.numel)
        s = ops.importance_update(layout, params, gs, m1, m2, 0.85, 0.85, want_scores=True)
        out.append((m1, m2, s))
    for a, b in zip(*out):
        assert torch.equal(a, b)
