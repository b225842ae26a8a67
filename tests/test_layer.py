"""The adapted linear layer: every CPU backend against ``reference.adapter_linear``, and AdaLoraLinear.

Each backend ("torch", "reference") runs through the dispatcher ``ops.adapter_linear`` and is
compared, forward and every gradient, with ``reference.adapter_linear`` on fresh random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_fast import ops, reference
from adalora_fast.layer import AdaLoraLinear
from adalora_fast.ops import torch_backend

CPU_BACKENDS = ["torch", "reference"]


# ----------------------------------------------------------------------------- helpers
def _close(actual, expected, rtol, what=""):
    """assert_close with an absolute tolerance scaled by the magnitude of ``expected``."""
    assert actual is not None, f"{what}: gradient missing"
    assert expected is not None, f"{what}: reference gradient missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    scale = expected.detach().float().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().float(), expected.detach().float(), rtol=rtol, atol=rtol * max(scale, 1e-6), msg=what or None
    )


def _make(
    N_shape,
    k,
    d,
    r,
    *,
    bias=True,
    bias_grad=False,
    fifo=False,
    base_dtype=torch.float32,
    weight_grad=False,
    seed=0,
):
    """Fresh random inputs for one adapted layer (E non-zero so the adapter term matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*N_shape, k, generator=g).to(base_dtype)
    w = (torch.randn(k, d, generator=g) if fifo else torch.randn(d, k, generator=g)) / math.sqrt(k)
    w = w.to(base_dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(base_dtype) if bias else None
    A = torch.randn(r, k, generator=g) * 0.5
    E = torch.randn(r, 1, generator=g)
    B = torch.randn(d, r, generator=g) * 0.5
    ranknum = torch.full((1,), float(max(r, 1)))
    scaling = 8.0
    go = torch.randn(*N_shape, d, generator=g)
    t = dict(x=x, w=w, b=b, A=A, E=E, B=B)
    t["x"].requires_grad_(True)
    for n in ("A", "E", "B"):
        t[n].requires_grad_(True)
    if b is not None and bias_grad:
        t["b"].requires_grad_(True)
    if weight_grad:
        t["w"].requires_grad_(True)
    return t, ranknum, scaling, go


def _clone(t):
    out = {}
    for n, v in t.items():
        out[n] = None if v is None else v.detach().clone().requires_grad_(v.requires_grad)
    return out


def _grads(t):
    return {n: (v.grad if v is not None and v.requires_grad else None) for n, v in t.items()}


def _run_ops(t, ranknum, scaling, go, *, fifo=False, p=0.0, training=True, seed=None, reduce="dot"):
    out = ops.adapter_linear(
        t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, p, training, fifo, seed=seed
    )
    loss = out.float().sum() if reduce == "sum" else (out.float() * go).sum()
    loss.backward()
    return out, _grads(t)


def _run_ref(t, ranknum, scaling, go, *, fifo=False, keep=None, p=0.0, reduce="dot"):
    out = reference.adapter_linear(t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, keep, p, fifo)
    loss = out.float().sum() if reduce == "sum" else (out.float() * go).sum()
    loss.backward()
    return out, _grads(t)


def _compare(out, grads, rout, rgrads, rtol):
    _close(out, rout, rtol, "forward")
    for n in ("x", "A", "E", "B", "b", "w"):
        if rgrads[n] is None:
            assert grads[n] is None, f"d{n} should be None"
            continue
        _close(grads[n], rgrads[n], rtol, f"d{n}")


# ----------------------------------------------------------------------------- fp32, shapes
SHAPES = [
    # (leading shape of x, k, d, r)
    ((7,), 16, 24, 12),
    ((1,), 13, 9, 12),  # N = 1, k and d not multiples of 16, k != d
    ((2, 5), 19, 11, 1),  # 3-D input, r = 1
    ((9,), 37, 21, 64),  # r = 64 > k, d
    ((3, 1, 4), 8, 8, 12),  # 4-D input
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-k{s[1]}-d{s[2]}-r{s[3]}")
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
def test_fp32_forward_and_grads_match_reference(use_backend, backend, shape, bias):
    use_backend(backend)
    lead, k, d, r = shape
    t, ranknum, scaling, go = _make(lead, k, d, r, bias=bias != "none", bias_grad=bias == "trainable", seed=1)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    assert out.shape == (*lead, d)
    _compare(out, grads, rout, rgrads, 1e-5)
    if bias == "trainable":
        assert grads["b"] is not None
    # the adapter term is not negligible: without it the output is clearly different
    base = torch.nn.functional.linear(t["x"].detach(), t["w"], None if t["b"] is None else t["b"].detach())
    assert (out.detach() - base).abs().max() > 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_weight_grad_when_base_trainable(use_backend, backend):
    use_backend(backend)
    t, ranknum, scaling, go = _make((6,), 10, 7, 4, bias=True, bias_grad=True, weight_grad=True, seed=2)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, grads, rout, rgrads, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_conv1d_fan_in_fan_out_matches_reference(use_backend, backend, bias):
    use_backend(backend)
    t, ranknum, scaling, go = _make((2, 3), 13, 10, 12, bias=bias, bias_grad=bias, fifo=True, seed=3)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, fifo=True)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, fifo=True)
    _compare(out, grads, rout, rgrads, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rank_zero_tensors(use_backend, backend):
    use_backend(backend)
    t, _, scaling, go = _make((5,), 12, 9, 0, seed=4)
    ranknum = torch.zeros(1)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, grads, rout, rgrads, 1e-5)
    base = torch.nn.functional.linear(t["x"].detach(), t["w"], t["b"])
    torch.testing.assert_close(out.detach(), base)


# ----------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [((7,), 16, 24, 12), ((2, 3), 19, 11, 1), ((1,), 21, 13, 64)])
def test_bf16_autocast_matches_reference_under_autocast(use_backend, backend, shape):
    use_backend(backend)
    lead, k, d, r = shape
    t, ranknum, scaling, go = _make(lead, k, d, r, bias=True, bias_grad=True, seed=5)
    t2 = _clone(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.adapter_linear(t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, 0.0, True, False)
        rout = reference.adapter_linear(t2["x"], t2["w"], t2["b"], t2["A"], t2["E"], t2["B"], scaling, ranknum)
    assert out.dtype == torch.bfloat16
    assert rout.dtype == torch.bfloat16
    (out.float() * go).sum().backward()
    (rout.float() * go).sum().backward()
    _compare(out, _grads(t), rout, _grads(t2), 2e-2)
    # parameters keep their fp32 gradients
    for n in ("A", "E", "B", "b", "x"):
        assert t[n].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_base_fp32_adapters_without_autocast(use_backend, backend):
    use_backend(backend)
    t, ranknum, scaling, go = _make((2, 4), 24, 20, 12, bias=True, base_dtype=torch.bfloat16, seed=6)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go)
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    assert out.dtype == torch.bfloat16, "the output stays in the base layer's dtype"
    assert grads["x"].dtype == torch.bfloat16
    for n in ("A", "E", "B"):
        assert grads[n].dtype == torch.float32
    _compare(out, grads, rout, rgrads, 2e-2)


# ----------------------------------------------------------------------------- dropout
def _keep_for(seed, shape, p, dtype=torch.float32):
    """The keep mask the torch backend draws, for an x of leading shape ``shape[:-1]``."""
    n = 1
    for v in shape[:-1]:
        n *= v
    return torch_backend.dropout_keep_mask(seed, (n, shape[-1]), p, torch.device("cpu"), dtype).view(shape)


@pytest.fixture(params=["ext", "no-ext"])
def cpu_ext_mode(request, monkeypatch):
    """Run with the C++ CPU dropout kernel (when it builds) and with the pure-torch dropout path."""
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "1" if request.param == "ext" else "0")
    return request.param


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "lead,fifo,base_dtype",
    [
        ((33,), False, torch.float32),
        ((3, 11), True, torch.float32),
        ((1,), False, torch.float32),
        ((3, 11), False, torch.bfloat16),
        ((33,), True, torch.bfloat16),
    ],
    ids=["N33", "3d-conv1d", "N1", "3d-bf16-base", "N33-conv1d-bf16-base"],
)
def test_dropout_matches_reference_with_same_mask(use_backend, cpu_ext_mode, backend, lead, fifo, base_dtype):
    use_backend(backend)
    p, seed = 0.1, 1234
    k, d, r = 17, 12, 12
    t, ranknum, scaling, go = _make(lead, k, d, r, bias=True, bias_grad=True, fifo=fifo, seed=7, base_dtype=base_dtype)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, fifo=fifo, p=p, seed=seed)
    keep = _keep_for(seed, (*lead, k), p)
    if lead != (1,):
        assert not keep.all(), "with p=0.1 some elements must be dropped"
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, fifo=fifo, keep=keep, p=p)
    assert out.dtype == base_dtype
    _compare(out, grads, rout, rgrads, 1e-5 if base_dtype == torch.float32 else 2e-2)
    # and it is not the no-dropout result
    t3 = _clone(t)
    nout, _ = _run_ref(t3, ranknum, scaling, go, fifo=fifo)
    if not keep.all():
        assert (nout.detach() - out.detach()).abs().max() > 1e-3


def test_dropout_keep_rate_within_three_sigma(cpu_ext_mode):
    p = 0.1
    shape = (200, 150)
    n = shape[0] * shape[1]
    sigma = math.sqrt(p * (1 - p) / n)
    for seed in (0, 1, 987654321):
        keep = torch_backend.dropout_keep_mask(seed, shape, p, torch.device("cpu"))
        assert keep.dtype == torch.bool and keep.shape == shape
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 3 * sigma, f"seed {seed}: keep rate {rate}, expected {1 - p} ± {3 * sigma}"


def test_dropout_seeds_differ_and_repeat(use_backend, cpu_ext_mode):
    use_backend("torch")
    shape = (64, 32)
    m1 = torch_backend.dropout_keep_mask(1, shape, 0.1, torch.device("cpu"))
    m1b = torch_backend.dropout_keep_mask(1, shape, 0.1, torch.device("cpu"))
    m2 = torch_backend.dropout_keep_mask(2, shape, 0.1, torch.device("cpu"))
    assert torch.equal(m1, m1b), "same seed, same mask"
    assert not torch.equal(m1, m2), "different seeds give different masks"
    t, ranknum, scaling, _ = _make((64,), 32, 16, 8, seed=8)
    args = (t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, 0.1, True, False)
    with torch.no_grad():
        o1 = ops.adapter_linear(*args, seed=1)
        o1b = ops.adapter_linear(*args, seed=1)
        o2 = ops.adapter_linear(*args, seed=2)
    assert torch.equal(o1, o1b)
    assert not torch.allclose(o1, o2)


def test_dropout_without_seed_follows_torch_manual_seed(use_backend, cpu_ext_mode):
    use_backend("torch")
    t, ranknum, scaling, _ = _make((20,), 16, 8, 4, seed=9)
    args = (t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, 0.3, True, False)
    with torch.no_grad():
        torch.manual_seed(5)
        a = ops.adapter_linear(*args)
        torch.manual_seed(5)
        b = ops.adapter_linear(*args)
        c = ops.adapter_linear(*args)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["p0", "eval"])
def test_dropout_off_equals_no_dropout(use_backend, backend, case):
    use_backend(backend)
    t, ranknum, scaling, go = _make((10,), 14, 9, 6, bias=True, bias_grad=True, seed=10)
    t2 = _clone(t)
    p, training = (0.0, True) if case == "p0" else (0.5, False)
    out = ops.adapter_linear(t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, p, training, False, seed=3)
    (out * go).sum().backward()
    rout, rgrads = _run_ref(t2, ranknum, scaling, go)
    _compare(out, _grads(t), rout, rgrads, 1e-5)


# ----------------------------------------------------------------------------- strides
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(use_backend, backend):
    use_backend(backend)
    t, ranknum, scaling, go = _make((4, 6), 10, 8, 5, bias=True, seed=11)
    g = torch.Generator().manual_seed(12)
    big = torch.randn(4, 12, 20, generator=g)
    for xnc in (big[:, ::2, ::2], torch.randn(10, 24, generator=g).t()):
        assert not xnc.is_contiguous()
        xa = xnc.clone().requires_grad_(True)
        xb = xnc.contiguous().requires_grad_(True)
        ta, tb = _clone(t), _clone(t)
        ta["x"], tb["x"] = xa, xb
        goo = torch.randn(*xnc.shape[:-1], 8, generator=g)
        out, grads = _run_ops(ta, ranknum, scaling, goo)
        rout, rgrads = _run_ref(tb, ranknum, scaling, goo)
        _compare(out, grads, rout, rgrads, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_stride_zero_gradient_from_sum(use_backend, cpu_ext_mode, backend, p):
    use_backend(backend)
    lead, k = (3, 5), 12
    t, ranknum, scaling, go = _make(lead, k, 9, 7, bias=True, bias_grad=True, seed=13)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, seed=77, reduce="sum")
    keep = _keep_for(77, (*lead, k), p) if p > 0 else None
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, keep=keep, p=p, reduce="sum")
    _compare(out, grads, rout, rgrads, 1e-5)


# ----------------------------------------------------------------------------- AdaLoraLinear
def _base(kind, k, d, bias, seed):
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(k, d, bias=bias)
    layer = Conv1D(d, k)  # weight [k, d]
    if not bias:
        # Conv1D always has a bias; zero it (and keep it) so the bias-free path still is exercised via Linear
        nn.init.zeros_(layer.bias)
    return layer


LAYER_CASES = [("linear", True), ("linear", False), ("conv1d", True)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_adalora_linear_init_is_identity_of_base(use_backend, backend, kind, bias):
    use_backend(backend)
    base = _base(kind, 13, 11, bias, seed=20)
    layer = AdaLoraLinear(base, r=12, lora_alpha=8)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert (layer.in_features, layer.out_features) == (13, 11)
    assert torch.all(layer.lora_E["default"] == 0)
    assert layer.lora_A["default"].shape == (12, 13) and layer.lora_B["default"].shape == (11, 12)
    assert layer.ranknum["default"].item() == 12.0 and not layer.ranknum["default"].requires_grad
    assert not base.weight.requires_grad
    x = torch.randn(2, 3, 13, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def _randomise_adapter(layer, seed, a="default"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pd in (layer.lora_A, layer.lora_B, layer.lora_E):
            pd[a].copy_(torch.randn(pd[a].shape, generator=g) * 0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_adalora_linear_forward_and_grads_match_reference(use_backend, backend, kind, bias):
    use_backend(backend)
    base = _base(kind, 15, 10, bias, seed=22)
    layer = AdaLoraLinear(base, r=6, lora_alpha=16)
    _randomise_adapter(layer, 23)
    g = torch.Generator().manual_seed(24)
    x = torch.randn(4, 15, generator=g, requires_grad=True)
    go = torch.randn(4, 10, generator=g)
    out = layer(x)
    (out * go).sum().backward()
    a = "default"
    A, E, B = (layer.lora_A[a].detach().clone().requires_grad_(), layer.lora_E[a].detach().clone().requires_grad_(),
               layer.lora_B[a].detach().clone().requires_grad_())
    x2 = x.detach().clone().requires_grad_()
    rout = reference.adapter_linear(x2, base.weight, base.bias, A, E, B, 16, layer.ranknum[a], None, 0.0, kind == "conv1d")
    (rout * go).sum().backward()
    _close(out, rout, 1e-5, "forward")
    _close(x.grad, x2.grad, 1e-5, "dx")
    _close(layer.lora_A[a].grad, A.grad, 1e-5, "dA")
    _close(layer.lora_E[a].grad, E.grad, 1e-5, "dE")
    _close(layer.lora_B[a].grad, B.grad, 1e-5, "dB")
    assert base.weight.grad is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_merge_unmerge_round_trip(use_backend, backend, kind, bias):
    use_backend(backend)
    base = _base(kind, 12, 9, bias, seed=25)
    layer = AdaLoraLinear(base, r=5)
    _randomise_adapter(layer, 26)
    layer.eval()
    w0 = base.weight.detach().clone()
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(27))
    with torch.no_grad():
        unmerged = layer(x)
        plain = base(x)
        assert (unmerged - plain).abs().max() > 1e-2
        layer.merge()
        assert layer.merged
        assert not torch.allclose(base.weight, w0)
        merged = layer(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_disable_adapters_gives_base(kind, bias):
    base = _base(kind, 12, 9, bias, seed=28)
    layer = AdaLoraLinear(base, r=5)
    _randomise_adapter(layer, 29)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(30))
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        adapted = layer(x)
        layer.disable_adapters = True
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
        layer.disable_adapters = False
        torch.testing.assert_close(layer(x), adapted, rtol=0, atol=0)
        # disabling a merged layer unmerges it
        layer.merge()
        layer.disable_adapters = True
        out = layer(x)
        assert not layer.merged
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
        expect = x @ (w0.t() if kind == "linear" else w0)
        if base.bias is not None:
            expect = expect + base.bias
        torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_resize_to_rank_zero_gives_base(use_backend, backend, kind, bias):
    use_backend(backend)
    base = _base(kind, 10, 7, bias, seed=31)
    layer = AdaLoraLinear(base, r=4)
    _randomise_adapter(layer, 32)
    x = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(33), requires_grad=True)
    layer.resize("default", torch.zeros(4, dtype=torch.bool))
    assert layer.r["default"] == 0
    assert layer.lora_A["default"].shape == (0, 10)
    assert layer.lora_B["default"].shape == (7, 0)
    assert layer.lora_E["default"].shape == (0, 1)
    out = layer(x)
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_partial_resize_equals_masking_E(use_backend, backend):
    """Dropping triplets equals zeroing their E: ranknum keeps its value (PEFT's resize)."""
    use_backend(backend)
    base = _base("linear", 10, 7, True, seed=34)
    layer = AdaLoraLinear(base, r=6)
    _randomise_adapter(layer, 35)
    keep = torch.tensor([True, False, True, True, False, False])
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(36))
    with torch.no_grad():
        layer.lora_E["default"].mul_(keep.view(-1, 1).float())
        masked = layer(x)
        layer.resize("default", keep)
        assert layer.r["default"] == 3 and layer.ranknum["default"].item() == 6.0
        torch.testing.assert_close(layer(x), masked, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        layer.resize("default", torch.ones(5, dtype=torch.bool))


def test_layer_rejects_non_linear_base():
    with pytest.raises(ValueError, match="Embedding"):
        AdaLoraLinear(nn.Embedding(10, 4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_under_bf16_autocast_matches_reference(use_backend, backend):
    use_backend(backend)
    p, seed = 0.1, 42
    lead, k = (2, 9), 20
    t, ranknum, scaling, go = _make(lead, k, 12, 8, bias=True, bias_grad=True, seed=40)
    t2 = _clone(t)
    keep = _keep_for(seed, (*lead, k), p, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.adapter_linear(t["x"], t["w"], t["b"], t["A"], t["E"], t["B"], scaling, ranknum, p, True, False, seed=seed)
        rout = reference.adapter_linear(t2["x"], t2["w"], t2["b"], t2["A"], t2["E"], t2["B"], scaling, ranknum, keep, p)
    (out.float() * go).sum().backward()
    (rout.float() * go).sum().backward()
    _compare(out, _grads(t), rout, _grads(t2), 2e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_partial_requires_grad(use_backend, cpu_ext_mode, backend, p):
    """Only A and B train (x and E frozen): the gradients that exist still match the reference."""
    use_backend(backend)
    t, ranknum, scaling, go = _make((6,), 11, 7, 5, bias=True, seed=41)
    t["x"].requires_grad_(False)
    t["E"].requires_grad_(False)
    t2 = _clone(t)
    out, grads = _run_ops(t, ranknum, scaling, go, p=p, seed=9)
    keep = _keep_for(9, (6, 11), p) if p > 0 else None
    rout, rgrads = _run_ref(t2, ranknum, scaling, go, keep=keep, p=p)
    _compare(out, grads, rout, rgrads, 1e-5)
    assert grads["A"] is not None and grads["B"] is not None
