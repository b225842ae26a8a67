"""One adapted layer, forward and forward+backward: adalora_fast vs PEFT AdaLoRA vs PEFT LoRA, and
PEFT AdaLoRA's layer under ``af.patch_peft()`` (our op behind PEFT's layer)."""

import pytest
import torch

from .cases import _one_layer
from .common import PATCHED, adapter_params, layer_fwd_bwd

N = 512
SHAPES = [(512, 512), (512, 1376)]
KINDS = ["ours", "peft_adalora", "peft_lora", PATCHED]


@pytest.fixture(autouse=True)
def _peft_unpatched_after():
    """The patched contender's build leaves PEFT patched; the next test's PEFT layers must be PEFT's own."""
    yield
    import adalora_fast as af

    af.unpatch_peft()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("k,d", SHAPES, ids=[f"k{k}-d{d}" for k, d in SHAPES])
def test_layer_forward(benchmark, device, kind, k, d, p):
    layer = _one_layer(kind, k, d, 12, p, device)
    x = torch.randn(N, k, device=device, requires_grad=True)
    benchmark.group = f"layer forward N={N} k={k} d={d} p={p}"
    benchmark.extra_info["contender"] = kind
    out = benchmark(lambda: layer(x))
    assert out.shape == (N, d)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("k,d", SHAPES, ids=[f"k{k}-d{d}" for k, d in SHAPES])
def test_layer_forward_backward(benchmark, device, kind, k, d, p):
    layer = _one_layer(kind, k, d, 12, p, device)
    x = torch.randn(N, k, device=device, requires_grad=True)
    g = torch.randn(N, d, device=device)
    ps = adapter_params(layer)
    step = layer_fwd_bwd(layer, x, g)
    benchmark.group = f"layer forward+backward N={N} k={k} d={d} p={p}"
    benchmark.extra_info["contender"] = kind
    benchmark(step)
    assert x.grad is not None and all(q.grad is not None for q in ps)
