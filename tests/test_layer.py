"""AdaLoraLinear, the module around the op: init is the base layer, forward and gradients match
``reference.adapter_linear``, merge/unmerge round trip, disabled adapters, resize, non-linear
bases refused. Every test that runs the op runs once per real implementation (the ``impl``
fixture); the op itself is tested in ``test_linear.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device_for
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_fast import reference
from adalora_fast.layer import AdaLoraLinear
from tolerances import assert_close


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


@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_adalora_linear_init_is_identity_of_base(impl, kind, bias):
    base = _base(kind, 13, 11, bias, seed=20)
    layer = AdaLoraLinear(base, r=12, lora_alpha=8)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert (layer.in_features, layer.out_features) == (13, 11)
    assert torch.all(layer.lora_E["default"] == 0)
    assert layer.lora_A["default"].shape == (12, 13) and layer.lora_B["default"].shape == (11, 12)
    assert layer.ranknum["default"].item() == 12.0 and not layer.ranknum["default"].requires_grad
    assert not base.weight.requires_grad
    x = torch.randn(2, 3, 13, generator=torch.Generator().manual_seed(21))
    # E = 0 adds exactly zero to the op's base product: bit for bit the base layer, run on the same
    # device (on a GPU, "triton" runs there: the layer, its base and x move to CUDA)
    dev = device_for(impl)
    layer.to(dev)
    x = x.to(dev)
    assert base.weight.device.type == dev.type
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def _randomise_adapter(layer, seed, a="default"):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pd in (layer.lora_A, layer.lora_B, layer.lora_E):
            pd[a].copy_(torch.randn(pd[a].shape, generator=g) * 0.5)


@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_adalora_linear_forward_and_grads_match_reference(impl, kind, bias):
    base = _base(kind, 15, 10, bias, seed=22)
    layer = AdaLoraLinear(base, r=6, lora_alpha=16)
    _randomise_adapter(layer, 23)
    g = torch.Generator().manual_seed(24)
    x = torch.randn(4, 15, generator=g, requires_grad=True)
    go = torch.randn(4, 10, generator=g)
    out = layer(x)
    (out * go).sum().backward()
    a = "default"
    A, E, B = (
        layer.lora_A[a].detach().clone().requires_grad_(),
        layer.lora_E[a].detach().clone().requires_grad_(),
        layer.lora_B[a].detach().clone().requires_grad_(),
    )
    x2 = x.detach().clone().requires_grad_()
    rout = reference.adapter_linear(x2, base.weight, base.bias, A, E, B, 16, layer.ranknum[a], 0.0, kind == "conv1d")
    (rout * go).sum().backward()
    assert_close(out, rout, what="forward")
    assert_close(x.grad, x2.grad, what="dx")
    assert_close(layer.lora_A[a].grad, A.grad, what="dA")
    assert_close(layer.lora_E[a].grad, E.grad, what="dE")
    assert_close(layer.lora_B[a].grad, B.grad, what="dB")
    assert base.weight.grad is None


@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_merge_unmerge_round_trip(impl, kind, bias):
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
        assert_close(merged, unmerged, what="merged layer")
        assert_close(base(x), unmerged, what="merged base")
        layer.unmerge()
        assert not layer.merged
        assert_close(base.weight, w0, what="unmerged weight")
        assert_close(layer(x), unmerged, what="unmerged layer")


@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_disable_adapters_gives_base(impl, kind, bias):
    base = _base(kind, 12, 9, bias, seed=28)
    layer = AdaLoraLinear(base, r=5)
    _randomise_adapter(layer, 29)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(30))
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        adapted = layer(x)
        layer.disable_adapters = True
        assert torch.equal(layer(x), base(x))
        layer.disable_adapters = False
        assert torch.equal(layer(x), adapted)
        # disabling a merged layer unmerges it
        layer.merge()
        layer.disable_adapters = True
        out = layer(x)
        assert not layer.merged
        assert_close(base.weight, w0, what="unmerged weight")
        expect = x @ (w0.t() if kind == "linear" else w0)
        if base.bias is not None:
            expect = expect + base.bias
        assert_close(out, expect, what="disabled merged layer")


@pytest.mark.parametrize("kind,bias", LAYER_CASES)
def test_resize_to_rank_zero_gives_base(impl, kind, bias):
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
    assert torch.equal(out, base(x))
    out.sum().backward()
    assert x.grad is not None


def test_partial_resize_equals_masking_E(impl):
    """Dropping triplets equals zeroing their E: ranknum keeps its value (PEFT's resize)."""
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
        assert_close(layer(x), masked, what="resized layer")
    with pytest.raises(ValueError, match="rank"):
        layer.resize("default", torch.ones(5, dtype=torch.bool))


def test_layer_rejects_non_linear_base():
    with pytest.raises(ValueError, match="Embedding"):
        AdaLoraLinear(nn.Embedding(10, 4))


def test_the_forward_reads_parametrized_and_replaced_adapters(impl):
    """The layer reads its tensors from the modules' parameter dicts (no nn.Module.__getattr__ per
    read); a tensor that is not there, as a parametrization makes it, is read through getattr, and
    a replaced parameter is the one used."""
    from torch.nn.utils import parametrize

    layer = AdaLoraLinear(_base("linear", 13, 11, True, seed=30), r=4, lora_alpha=8)
    _randomise_adapter(layer, 31)
    dev = device_for(impl)
    layer.to(dev).eval()
    x = torch.randn(5, 13, generator=torch.Generator().manual_seed(32)).to(dev)

    def want():
        a = "default"
        return reference.adapter_linear(
            x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A[a], layer.lora_E[a], layer.lora_B[a],
            layer.scaling[a], layer.ranknum[a], 0.0, False, None,
        )  # fmt: skip

    class Doubled(nn.Module):
        def forward(self, v):
            return 2 * v

    parametrize.register_parametrization(layer.lora_B, "default", Doubled())
    assert "default" not in layer.lora_B._parameters
    with torch.no_grad():
        assert_close(layer(x), want(), what="parametrized lora_B")
    parametrize.remove_parametrizations(layer.lora_B, "default", leave_parametrized=True)
    layer.lora_A["default"] = nn.Parameter(torch.randn(4, 13, device=dev))
    with torch.no_grad():
        assert_close(layer(x), want(), what="replaced lora_A")


def test_an_inactive_or_empty_adapter_runs_the_base_layer(impl):
    base = _base("linear", 13, 11, True, seed=33)
    layer = AdaLoraLinear(base, r=4, lora_alpha=8)
    _randomise_adapter(layer, 34)
    dev = device_for(impl)
    layer.to(dev)
    x = torch.randn(3, 13, generator=torch.Generator().manual_seed(35)).to(dev)
    with torch.no_grad():
        assert not torch.equal(layer(x), base(x))
        layer.active_adapter = "other"  # no adapter of that name
        assert torch.equal(layer(x), base(x))
        layer.active_adapter = "default"
        layer.resize("default", torch.zeros(4, dtype=torch.bool))  # rank 0
        assert torch.equal(layer(x), base(x))
    with pytest.raises(TypeError, match="takes the input tensor only"):
        layer(x, 1)
