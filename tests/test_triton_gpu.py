"""What only a CUDA GPU can check (skipped without one; the CPU suite checks the rest):

* the half-precision branches of the kernels (``UPCAST=False``: bf16/fp16 operands straight to the
  tensor cores; the interpreter always upcasts), forward and every gradient, against the
  reference computed in fp32 on the CPU from the same inputs and keep mask;
* fp32 adapters follow torch's TF32 switch (full fp32 by default: the torch implementation runs;
  TF32 allowed: the Triton kernels run, within the TF32 tolerance);
* a layer on a second GPU runs there, with the current device elsewhere (the launch guard);
* under ``torch.use_deterministic_algorithms(True)`` two backward passes agree bit for bit; turned
  on between a forward and its backward, the backward runs torch ops on the same mask;
* fp32 adapters on a bf16 or fp16 base (r = 12 and 40) run the Triton kernels with "bf16x3" products at torch's
  full-fp32 default: dA, dE, dB within 10x of the torch fp32 path's error against fp64, the output as
  that path rounds it but in under 1 % of places;
* a launch after the first of its specialisation goes straight to the compiled kernel
  (``kernels/triton_ops/_launch._launch_cuda``) and gives what Triton's JIT launch gives.
"""

from __future__ import annotations

import math

import pytest
import torch

from adalora_fast import ops, reference
from tolerances import RTOL, TF32_RTOL, assert_close

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compiled Triton kernels (no GPU on this machine)"
)


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
    out = ops.adapter_linear(
        leaves[0], W, None, *leaves[1:], 8.0, torch.tensor([12.0], device=x.device), p, True, False, seed
    )
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
    out = reference.adapter_linear(cpu[0], W.cpu().float(), None, *cpu[1:], 8.0, torch.tensor([12.0]), p, False, keep)
    out.backward(go.cpu().float())
    want = [out] + [v.grad for v in cpu]
    for name, a, b in zip(("out", "dx", "dA", "dE", "dB"), got, want):
        assert_close(
            a.float().cpu(),
            b,
            dtype,
            what=f"{name} {dtype} p={p} {shape}",
            rtol=RTOL[dtype],
            scale=max(b.abs().max().item(), 1e-3),
        )


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
    monkeypatch.setattr(
        _launch, "launch", lambda k, grid, *a, **kw: (launched.append(kw.get("DOT_PREC")), real(k, grid, *a, **kw))
    )
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


def test_deterministic_switch_turned_on_between_forward_and_backward():
    """A Triton forward whose backward runs after torch.use_deterministic_algorithms(True): the eager
    node (C++ or Python) runs that backward in torch ops (no atomics, so no error) on the same
    dropout mask, within bf16 tolerance of the Triton backward."""
    x, W, A, E, B, go = _inputs(512, 256, 192, 12, torch.bfloat16, "cuda", seed=8)
    want = _run(x, W, A, E, B, go, 0.1, seed=2)
    leaves = [v.detach().clone().requires_grad_() for v in (x, A, E, B)]
    out = ops.adapter_linear(leaves[0], W, None, *leaves[1:], 8.0, torch.tensor([12.0], device="cuda"), 0.1, True, False, 2)  # fmt: skip
    torch.use_deterministic_algorithms(True)
    try:
        out.backward(go)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(out, want[0])
    for name, a, b in zip(("dx", "dA", "dE", "dB"), [v.grad for v in leaves], want[1:]):
        assert_close(a.float(), b.float(), what=name, dtype=torch.bfloat16)


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", [12, 40], ids=lambda r: f"r{r}")  # R_PAD 16 and 64 (narrower tiles)
def test_fp32_adapters_on_a_half_base_run_bf16x3_kernels(base_dtype, r, restore_precision, monkeypatch):
    from adalora_fast.kernels import _launch

    torch.set_float32_matmul_precision("highest")
    launched = []
    real = _launch.launch
    monkeypatch.setattr(
        _launch, "launch", lambda k, grid, *a, **kw: (launched.append(kw.get("DOT_PREC")), real(k, grid, *a, **kw))
    )
    n, k, d = 1024, 512, 384
    x, W, _, _, _, go = _inputs(n, k, d, r, base_dtype, "cuda", seed=4)
    _, _, A, E, B, _ = _inputs(n, k, d, r, torch.float32, "cuda", seed=4)
    got = _run(x, W, A, E, B, go, 0.1, seed=9)
    assert set(launched) == {"bf16x3"}, launched
    keep = ops.dropout_keep_mask(9, (n, k), 0.1, "cuda", torch.float32)

    def peft(dtype):  # the reference (PEFT's op order) in ``dtype`` on the GPU: fp32 is PEFT's own path
        leaves = [
            v.detach().to(dtype if v.dtype == torch.float32 or dtype == torch.float64 else v.dtype).requires_grad_()
            for v in (x, A, E, B)
        ]
        w = W.to(torch.float64) if dtype == torch.float64 else W
        out = reference.adapter_linear(
            leaves[0], w, None, *leaves[1:], 8.0, torch.tensor([12.0], device="cuda"), 0.1, False, keep
        )
        out.backward(go.to(out.dtype))
        return [out] + [v.grad for v in leaves]

    fp32, fp64 = peft(torch.float32), peft(torch.float64)
    for name, a, b, c in zip(("dA", "dE", "dB"), got[2:], fp32[2:], fp64[2:]):
        e_ours = ((a.double() - c).abs().max() / c.abs().max()).item()
        e_fp32 = ((b.double() - c).abs().max() / c.abs().max()).item()
        assert e_ours <= 10 * max(e_fp32, 1e-8), f"{name}: {e_ours:.3g} vs the fp32 path's {e_fp32:.3g}"
    differ = (got[0] != fp32[0]).float().mean().item()
    assert differ < 0.01, f"the output differs from the fp32 path's in {differ:.2%} of places"


def test_direct_launch_gives_the_jit_launch_result(monkeypatch):
    from adalora_fast.kernels import _launch

    x, W, A, E, B, go = _inputs(300, 192, 160, 12, torch.bfloat16, "cuda", seed=6)
    monkeypatch.setattr(_launch, "_compiled", {})
    monkeypatch.setattr(_launch, "DIRECT", False)
    jit = _run(x, W, A, E, B, go, 0.1, seed=3)
    monkeypatch.setattr(_launch, "DIRECT", True)
    _run(x, W, A, E, B, go, 0.1, seed=3)  # the first launches of each specialisation: the JIT, kept
    assert len(_launch._compiled) >= 4
    direct = _run(x, W, A, E, B, go, 0.1, seed=3)
    assert torch.equal(direct[0], jit[0]), "forward"
    for name, a, b in zip(("dx", "dA", "dE", "dB"), direct[1:], jit[1:]):  # fp32 atomics: order may differ
        assert_close(a, b, torch.bfloat16, what=name)
