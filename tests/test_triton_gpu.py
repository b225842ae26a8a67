"""What only a CUDA GPU can check (skipped without one; the CPU suite checks the rest):

* the half-precision branches of the kernels (``UPCAST=False``: bf16/fp16 operands straight to the
  tensor cores; the interpreter always upcasts), forward and every gradient, against the
  reference computed in fp32 on the CPU from the same inputs and keep mask;
* fp32 adapters follow torch's TF32 switch (full fp32 by default: the torch implementation runs;
  TF32 allowed: the Triton kernels run, within the TF32 tolerance);
* a layer on a second GPU runs there, with the current device elsewhere (the launch guard);
* under ``torch.use_deterministic_algorithms(True)`` two backward passes agree bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import RTOL, TF32_RTOL, assert_close

from adalora_fast import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: compiled Triton kernels (no GPU on this machine)")


def _inputs(n, k, d, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    W = torch.randn(d, k, generator=g) / math.sqrt(k)
    A = torch.randn(r, k, generator=g) * 0.5
    E = torch.randn(r, 1, generator=g)
    B = torch.randn(d, r, generator=g) * 0.5
    go = torch.randn(n, d, generator=g)
    return [v.to(device, dtype) for v in (x, W, A, E, B)] + [go.to(device, dtype)]


def _run(x, W, A, E, B, go, p, seed):
    leaves = [v.detach().clone().requires_grad_() for v in (x, A, E, B)]
    out = ops.adapter_linear(leaves[0], W, None, *leaves[1:], 8.0, torch.tensor([12.0], device=x.device), p,
                             True, False, seed)
    out.backward(go)
    return [out] + [v.grad for v in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(200, 96, 80, 12), (64, 4096, 4096, 12), (130, 64, 48, 64)])
def test_half_precision_branches_against_fp32_reference(dtype, p, shape):
    n, k, d, r = shape
    x, W, A, E, B, go = _inputs(n, k, d, r, dtype, "cuda")
    got = _run(x, W, A, E, B, go, p, seed=11)
    keep = ops.dropout_keep_mask(11, (n, k), p, "cuda", dtype).cpu() if p else None
    cpu = [v.detach().cpu().float().requires_grad_() for v in (x, A, E, B)]
    out = reference.adapter_linear(cpu[0], W.cpu().float(), None, *cpu[1:], 8.0, torch.tensor([12.0]), p, False,
                                   keep)
    out.backward(go.cpu().float())
    want = [out] + [v.grad for v in cpu]
    for name, a, b in zip(("out", "dx", "dA", "dE", "dB"), got, want):
        assert_close(a.float().cpu(), b, dtype, what=f"{name} {dtype} p={p} {shape}", rtol=RTOL[dtype],
                     scale=max(b.abs().max().item(), 1e-3))


@pytest.fixture
def restore_precision():
    old = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_adapters_follow_the_tf32_switch(tf32, restore_precision, monkeypatch):
    from adalora_fast.kernels import _launch

    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    launched = []
    real = _launch.launch
    monkeypatch.setattr(_launch, "launch", lambda k, grid, *a, **kw: (launched.append(kw.get("DOT_PREC")),
                                                                    real(k, grid, *a, **kw)))
    x, W, A, E, B, go = _inputs(96, 128, 80, 12, torch.float32, "cuda", seed=3)
    got = _run(x, W, A, E, B, go, 0.0, None)
    assert (set(launched) == {"tf32"}) if tf32 else ("tf32" not in launched)
    cpu = [v.detach().cpu().requires_grad_() for v in (x, A, E, B)]
    out = reference.adapter_linear(cpu[0], W.cpu(), None, *cpu[1:], 8.0, torch.tensor([12.0]), 0.0, False, None)
    out.backward(go.cpu())
    for name, a, b in zip(("out", "dx", "dA", "dE", "dB"), got, [out] + [v.grad for v in cpu]):
        assert_close(a.cpu(), b, what=name, rtol=TF32_RTOL if tf32 else 1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (a layer on cuda:1)")
def test_layer_on_second_gpu_runs_there():
    x, W, A, E, B, go = _inputs(128, 256, 96, 12, torch.bfloat16, "cuda:1")
    with torch.cuda.device(0):
        got = _run(x, W, A, E, B, go, 0.1, seed=5)
    with torch.cuda.device(1):
        want = _run(x, W, A, E, B, go, 0.1, seed=5)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        assert torch.equal(a, b)


def test_deterministic_switch_repeats_bit_for_bit():
    x, W, A, E, B, go = _inputs(512, 256, 192, 12, torch.bfloat16, "cuda", seed=8)
    torch.use_deterministic_algorithms(True)
    try:
        first = _run(x, W, A, E, B, go, 0.1, seed=2)
        again = _run(x, W, A, E, B, go, 0.1, seed=2)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
