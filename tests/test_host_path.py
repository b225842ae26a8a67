"""The eager host path of the adapted layer (``ops/adapter_linear.py``), checked on the CPU.

* which way a call goes: plain tensors take the eager autograd node (no dispatcher hop); a
  dispatch mode, functorch or a tensor subclass takes the registered op; both give the same numbers;
* the dropout seed: a [1] int64 tensor on x's device, drawn there from torch's generator (no CPU
  tensor in or out of the layer on a GPU, no host read of it), so two calls draw different masks and
  ``torch.manual_seed`` repeats them, eagerly and through the op alike;
* the scale: formed inside the kernels from ranknum in device memory, so a changed ranknum is seen
  by the next call without any host work;
* device launches per layer step on the Triton path (forced, under the interpreter), counted from
  the profiler's op tree as ``python -m bench.host_path`` counts them: no more than PEFT LoRA's.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adalora_fast import ops
from tolerances import assert_close

AL = sys.modules["adalora_fast.ops.adapter_linear"]


def _eager_node() -> str:
    """The name of the eager layer's node, as picked at the process's first eager call: the C++ node
    (tests/test_autograd_node.py), or the Python Function where it is off."""
    return "AdapterLinearBackward" if AL._apply is AL._node_apply else "_AdapterLinearFnBackward"


def _layer(N=24, k=40, d=32, r=12, dtype=torch.float32, adapter_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, k, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(d, k, generator=g) / k**0.5).to(dtype)
    A, E, B = (
        torch.randn(*s, generator=g).mul(0.5).to(adapter_dtype).requires_grad_() for s in ((r, k), (r, 1), (d, r))
    )
    return x, W, A, E, B, torch.tensor([float(r)])


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_eager_takes_the_function_a_dispatch_mode_the_op(use_backend, monkeypatch, name):
    use_backend(name)
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")
    x, W, A, E, B, rk = _layer()
    out = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.1, True, seed=5)
    assert out.grad_fn.name() == _eager_node()
    xs = [v.detach().clone().requires_grad_() for v in (x, A, E, B)]
    with _Passthrough():
        out2 = ops.adapter_linear(xs[0], W, None, *xs[1:], 2.0, rk, 0.1, True, seed=5)
    assert type(out2.grad_fn).__name__ == "_AdapterLinearAutogradBackward"
    assert torch.equal(out, out2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, A, E, B), g)
    grads2 = torch.autograd.grad(out2, xs, g)
    for n, a, b in zip(("dx", "dA", "dE", "dB"), grads, grads2):
        assert_close(a, b, what=n)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_autocast_casts_inside_the_one_node(use_backend, monkeypatch, name):
    """Under autocast the eager layer casts x, the weight and the adapters inside its one autograd
    node (no cast node per input) and its gradients come back in the inputs' dtypes. Against the
    layer run on inputs cast beforehand: the same output and dx, bitwise; the adapter gradients the
    same too on the torch path, and on the Triton path its fp32 accumulators unrounded (rounded to
    bf16, they are the cast-first run's, bitwise)."""
    use_backend(name)
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")
    bf = torch.bfloat16
    x, W, A, E, B, rk = _layer()
    with torch.autocast("cpu", dtype=bf):
        out = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.1, True, seed=5)
    assert out.grad_fn.name() == _eager_node() and out.dtype == bf
    inputs = [type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None]
    assert inputs == ["AccumulateGrad"] * 4, inputs  # x, A, E, B: no ToCopyBackward
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(bf)
    grads = torch.autograd.grad(out, (x, A, E, B), g)
    assert all(v.dtype == torch.float32 for v in grads)
    cast = [v.detach().to(bf).requires_grad_() for v in (x, A, E, B)]
    ref = ops.adapter_linear(cast[0], W.to(bf), None, *cast[1:], 2.0, rk, 0.1, True, seed=5)
    assert torch.equal(out, ref)
    ref_grads = torch.autograd.grad(ref, cast, g)
    assert torch.equal(grads[0], ref_grads[0].float())
    for n, a, b in zip(("dA", "dE", "dB"), grads[1:], ref_grads[1:]):
        assert torch.equal(a.to(bf), b), n
        if name == "torch":
            assert torch.equal(a, b.float()), n


def test_adapter_grads_are_views_of_one_buffer_with_the_params_layout(use_backend):
    """Triton: dA, dB, dE come from one zeroed fp32 buffer (one memset); autograd keeps the views as
    .grad (strides as the parameters'), and accumulating a second backward adds into them."""
    use_backend("triton")
    x, W, A, E, B, rk = _layer()
    ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.0, True).sum().backward()
    first = [p.grad.clone() for p in (A, E, B)]
    assert (
        A.grad.untyped_storage().data_ptr()
        == B.grad.untyped_storage().data_ptr()
        == E.grad.untyped_storage().data_ptr()
    )
    for p in (A, E, B):
        assert p.grad.shape == p.shape and p.grad.stride() == p.stride()
    ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.0, True).sum().backward()
    for p, f in zip((A, E, B), first):
        assert_close(p.grad, 2 * f, what="accumulated grad")


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_seed_lives_on_the_device_draws_differ_and_manual_seed_repeats(use_backend, monkeypatch, name):
    use_backend(name)
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")
    x, W, A, E, B, rk = _layer(N=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.3, True)
    seeds = [t for t in saved if t.dtype == torch.int64]
    assert len(seeds) == 1 and seeds[0].shape == (1,) and seeds[0].device == x.device
    with torch.no_grad():
        torch.manual_seed(7)
        a = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.3, True)
        b = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.3, True)
        torch.manual_seed(7)
        a2 = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.3, True)
        with _Passthrough():  # the registered op draws the same way
            torch.manual_seed(7)
            a3 = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.3, True)
    assert not torch.equal(a, b), "two calls draw two masks"
    assert torch.equal(a, a2) and torch.equal(a, a3), "torch.manual_seed repeats the masks"
    assert out.requires_grad


def test_op_returns_the_seed_on_the_device(use_backend):
    use_backend("triton")
    x, W, A, E, B, rk = _layer()
    xd, Ad, Ed, Bd = (v.detach() for v in (x, A, E, B))
    _, _, seed = torch.ops.adalora_fast.adapter_linear(xd, W, None, Ad, Ed, Bd, 2.0, rk, 0.2, False, None)
    assert seed.dtype == torch.int64 and seed.shape == (1,) and seed.device == xd.device
    given = torch.tensor([42])
    _, _, seed2 = torch.ops.adalora_fast.adapter_linear(xd, W, None, Ad, Ed, Bd, 2.0, rk, 0.2, False, given)
    assert seed2.item() == 42 and seed2.data_ptr() != given.data_ptr(), "an op's output may not alias its input"


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_ranknum_changed_in_place_is_seen_by_the_next_call(use_backend, monkeypatch, name):
    use_backend(name)
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")
    x, W, A, E, B, rk = _layer()
    with torch.no_grad():
        before = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.0, True)
        rk.fill_(3.0)
        after = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.0, True)
    base = x.detach() @ W.t()
    assert_close(after - base, (before - base) * (12.0 + 1e-5) / (3.0 + 1e-5), what="adapter term scaled by 12/3")


def test_one_launch_plan_per_layer_step_keyed_by_what_picks_the_binaries(use_backend, monkeypatch):
    """The forward looks its launch plan up once (kernels/triton_ops/adapter_linear.layer_plan) and hands
    it to the backward; the plan follows the things that pick binaries or grids: the token count, the
    dropout rate, torch's fp32 matmul precision and a forced split factor."""
    use_backend("triton")
    ka = AL._kernels()
    calls = []
    real = ka.layer_plan

    def counted(*a):
        calls.append(a)
        return real(*a)

    monkeypatch.setattr(ka, "layer_plan", counted)
    x, W, A, E, B, rk = _layer(N=16, k=64, d=64)
    out = ops.adapter_linear(x, W, None, A, E, B, 2.0, rk, 0.1, True)
    out.backward(torch.randn_like(out))
    assert len(calls) == 1, "the backward reuses the forward's plan"
    lp = real(16, 64, 64, 12, torch.float32, torch.float32, 0.1, x.device)
    assert real(16, 64, 64, 12, torch.float32, torch.float32, 0.1, x.device) is lp
    assert real(17, 64, 64, 12, torch.float32, torch.float32, 0.1, x.device) is not lp
    no_dropout = real(16, 64, 64, 12, torch.float32, torch.float32, 0.0, x.device)
    assert (no_dropout.has_dropout, lp.has_dropout) == (0, 1)
    monkeypatch.setattr(ka, "FORCE_SPLIT", 2)
    split = real(16, 64, 64, 12, torch.float32, torch.float32, 0.1, x.device)
    assert (split.fwd_split, split.bwd_split, lp.fwd_split) == (1, 1, 1)  # one 64-wide tile: nothing to split
    wide = real(16, 256, 256, 12, torch.float32, torch.float32, 0.1, x.device)
    assert (wide.fwd_split, wide.bwd_split) == (2, 2) and wide.fwd_grid == (1, 2)
    monkeypatch.setattr(ka, "FORCE_SPLIT", None)
    assert real(16, 256, 256, 12, torch.float32, torch.float32, 0.1, x.device).fwd_split == 1
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        tf32 = real(16, 64, 64, 12, torch.float32, torch.float32, 0.1, x.device)
    finally:
        torch.set_float32_matmul_precision(prec)
    assert tf32 is not lp and tf32.shrink_kw["DOT_PREC"] == "tf32" and lp.shrink_kw["DOT_PREC"] == "ieee"


def test_kernel_eps_is_the_layouts():
    from adalora_fast.kernels import adapter_linear as ka
    from adalora_fast.ops.layout import RANKNUM_EPS

    assert ka.RANKNUM_EPS == RANKNUM_EPS


# ----------------------------------------------------------------------------- launches per layer step
@pytest.fixture
def host_path_env(monkeypatch):
    """What ``python -m bench.host_path`` sets (TRITON_INTERPRET=1 is conftest's on a CPU machine)."""
    from adalora_fast.kernels import _launch

    if not _launch.INTERPRET:
        pytest.skip("needs Triton's interpreter (a CPU machine): the bench forces the Triton path on CPU tensors")
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")


@pytest.mark.parametrize("setting", ["bf16", "fp32_adapters", "autocast"])
def test_launches_per_layer_step_at_most_peft_lora(host_path_env, setting):
    hp = pytest.importorskip("bench.host_path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = hp.measure((setting,), repeats=1, warmup=1, sample_s=1e-3)
    r = rows[0]
    ours = r["launch_detail"]["ours"]
    # forward: base GEMM, the seed draw, shrink, expand-add; backward: dx GEMM, one memset of the
    # flat gradient, grad_rank, dA_dx (+ one cast of it for half adapters); autocast adds its casts
    assert ours["triton_kernels"] == ["_shrink_kernel", "_expand_add_kernel", "_grad_rank_kernel", "_dA_dx_kernel"]
    expected = {"bf16": 9, "fp32_adapters": 8}.get(setting)
    if expected is not None:
        assert ours["total"] == expected, ours
    assert r["launches_ours"] <= r["launches_peft_lora"], (ours, r["launch_detail"]["peft_lora"])


def test_bench_targets_from_rows():
    hp = pytest.importorskip("bench.host_path")
    rows = [
        {
            "section": hp.SECTION,
            "setting": "bf16",
            "metric": "adapter host overhead us (minus base)",
            "ours": 40.0,
            "peft_lora": 100.0,
        },
        {
            "section": hp.SECTION,
            "setting": "bf16",
            "metric": "device launches per layer step",
            "ours": 9,
            "peft_lora": 14,
        },
        {
            "section": hp.SECTION,
            "setting": "fp32_adapters",
            "metric": "adapter host overhead us (minus base)",
            "ours": 60.0,
            "peft_lora": 100.0,
        },
        {"section": "layer", "setting": None, "metric": "forward", "ours": 1.0, "peft_lora": 1.0},
    ]
    ts = hp.targets(rows)
    assert [(t["target"].split(": ")[1], t["met"]) for t in ts] == [
        ("ours / PEFT LoRA host overhead", True),
        ("launches ours / PEFT LoRA", True),
        ("ours / PEFT LoRA host overhead", False),
    ]
