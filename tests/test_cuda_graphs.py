"""CUDA graphs (skipped without a CUDA GPU): a layer's forward and backward without dropout capture
and replay to the eager results; dropout under capture, and a pointer-table upload under capture,
raise instead of baking a host value into the graph (the seed: one mask at every replay; the
table: a copy from freed host memory)."""

from __future__ import annotations

import math

import pytest
import torch
from adalora_fast.kernels import _launch

from adalora_fast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: CUDA graph capture (no GPU on this machine)")

N, K, D, R = 256, 192, 160, 12


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(D, K, generator=g) / math.sqrt(K)).to("cuda", dtype)
    A, E, B = (torch.randn(*s, generator=g).mul(0.5).to("cuda", dtype).requires_grad_() for s in ((R, K), (R, 1), (D, R)))
    return W, A, E, B


def _step(x, W, A, E, B, go, rank):
    out = ops.adapter_linear(x, W, None, A, E, B, 8.0, rank, 0.0, True)
    out.backward(go)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_without_dropout_replays_like_eager(dtype):
    W, A, E, B = _weights(dtype)
    rank = torch.tensor([12.0], device="cuda")
    x = torch.randn(N, K, device="cuda", dtype=dtype, requires_grad=True)
    go = torch.randn(N, D, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the caches
        for _ in range(2):
            _step(x, W, A, E, B, go, rank)
    torch.cuda.current_stream().wait_stream(side)
    for t in (x, A, E, B):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(x, W, A, E, B, go, rank)
    for i in range(3):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            go.copy_(torch.randn_like(go))
            E.mul_(0.5 + i)  # the adapter weights change between replays, as after optimizer steps
        graph.replay()
        torch.cuda.synchronize()
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, E, B)]
        want = _step(leaves[0], W, *leaves[1:], go, rank)
        assert torch.equal(out, want), f"replay {i}: forward differs from eager"
        for name, t, w in zip(("dx", "dA", "dE", "dB"), (x, A, E, B), leaves):
            # dA / dB / dE sum with fp32 atomics (order varies): equal up to rounding
            torch.testing.assert_close(t.grad, w.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-6 if dtype == torch.float32 else 1e-3, msg=f"replay {i}: {name}")


def test_dropout_under_capture_raises(monkeypatch):
    W, A, E, B = _weights(torch.bfloat16)
    x = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        ops.adapter_linear(x, W, None, A, E, B, 8.0, torch.tensor([12.0], device="cuda"), 0.1, True)


def test_table_upload_under_capture_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        _launch.to_device_table([1, 2, 3], "cuda")
    assert _launch.to_device_table([1, 2, 3], "cpu").tolist() == [1, 2, 3]  # CPU tables never check
