"""RankAllocator / AdaLoraModel schedule behaviour: the flat state, rank_pattern, exact budgets,
finalisation, state_dict round trip, no host sync. Every test runs once per real implementation of
the ops (torch, torch + C++ kernels, Triton under the interpreter: conftest's ``impl`` fixture). The
ops themselves are tested in test_importance.py, test_mask.py and test_orth.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adalora_fast as af

# every test runs once per implementation of the allocator's ops (conftest's impl fixture)
pytestmark = pytest.mark.usefixtures("impl")


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
    for name, m in model.adapted_layers():
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
        int((m.lora_E["default"][~torch.tensor(final[f"{n}.lora_E.default"])] != 0).sum())
        for n, m in model.adapted_layers()
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


def _nan_into(model, module: str, kind: str, n: int, value=float("nan")):
    layer = dict(model.adapted_layers())[module]
    g = getattr(layer, f"lora_{kind}")["default"].grad.view(-1)
    g[:n] = value


def test_non_finite_gradient_is_skipped_with_one_warning():
    """A NaN or inf gradient element never enters the importance state: the state and every score
    stay finite, the step is counted per tensor and warned about once, naming the tensor; later
    bad steps are counted without a second warning; the counts survive state_dict()."""
    model = _model()
    alloc = model.rankallocator
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for s in (1, 2):
        _train_step(model, opt, s)
    m1_before = alloc.m1.clone()
    x, y = _batch(3)
    (model(x) - y).pow(2).mean().backward()
    _nan_into(model, "b", "A", 2)
    _nan_into(model, "c", "B", 1, float("inf"))
    with pytest.warns(RuntimeWarning, match=r"3 gradient element\(s\) of 2 adapter tensor\(s\).*b\.lora_A\.default: 2"):
        model.update_and_allocate(3)
    opt.zero_grad(set_to_none=False)
    assert alloc.nonfinite_skipped == {"b.lora_A.default": 2, "c.lora_B.default": 1}
    assert torch.isfinite(alloc.m1).all() and torch.isfinite(alloc.m2).all()
    o = alloc.layout.offsets[3]  # layer b's A: its first two elements kept their state
    assert torch.equal(alloc.m1[o : o + 2], m1_before[o : o + 2])
    assert not torch.equal(alloc.m1[o + 2 : o + 4], m1_before[o + 2 : o + 4])

    for s in (4, 5):  # masking steps: the scores are finite, a later bad step warns no more
        (model(x) - y).pow(2).mean().backward()
        _nan_into(model, "a", "E", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.update_and_allocate(s)
        opt.zero_grad(set_to_none=False)
    assert alloc.nonfinite_skipped["a.lora_E.default"] == 2
    assert sum(sum(v) for v in model.rank_pattern.values()) == alloc.budget_schedule(5)[0]
    # resumed: the counts go on, and what was warned about before is not warned again
    fresh = _model()
    fresh.rankallocator.load_state_dict(alloc.state_dict())
    assert fresh.rankallocator.nonfinite_skipped == alloc.nonfinite_skipped


def test_non_finite_gradients_do_not_decide_the_ranks():
    """PEFT lets a NaN into the averages, where it makes its triplets' scores NaN (sorted last:
    never pruned) until the final phase. Here a NaN gradient in every lora_E of one layer at every
    step leaves those elements' averages at their initial zero, exactly as a zero gradient does:
    the two runs prune the same triplets at every step and end with the same state."""
    runs = []
    for poisoned, bad in ((True, float("nan")), (False, 0.0)):
        model = _model(seed=3)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        patterns = []
        for step in range(1, 13):
            x, y = _batch(step)
            (model(x) - y).pow(2).mean().backward()
            opt.step()
            _nan_into(model, "b", "E", 4, bad)  # all of layer b's E, after the optimizer step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore" if poisoned else "error")
                model.update_and_allocate(step)
            opt.zero_grad(set_to_none=False)
            patterns.append(model.rank_pattern)
            if step == 8:
                state = (model.rankallocator.m1.clone(), model.rankallocator.m2.clone())
        runs.append((patterns, state, _E(model)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1][0], runs[1][1][0]) and torch.equal(runs[0][1][1], runs[1][1][1])
    assert torch.isfinite(runs[0][1][0]).all()
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)
