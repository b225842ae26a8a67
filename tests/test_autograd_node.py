"""The eager layer's C++ autograd node (``csrc/adapter_linear_node.cpp``, ``ops/autograd_node.py``)
against the Python ``torch.autograd.Function`` it stands in for (``_AdapterLinearFn``, the path when
the node is off or cannot be built): the same output and gradients, bit for bit, on every
implementation, with dropout, autocast, ``fan_in_fan_out``, a bias and every mix of inputs that
need gradients; and the autograd contract a Python Function gives: saved-tensor hooks, version
checks, ``retain_graph``, activation checkpointing, errors raised by the backward, no node without
grad mode, a backward from another thread, references released, forward-mode AD refused. The build failing, or
``ADALORA_FAST_NODE=0``, leaves the Python Function in place (a warning says so for the former).
"""

from __future__ import annotations

import gc
import sys
import threading
import warnings
import weakref

import pytest
import torch
from conftest import device_for, set_impl

from adalora_fast import ops

AL = sys.modules["adalora_fast.ops.adapter_linear"]
NODE = sys.modules["adalora_fast.ops.autograd_node"]


@pytest.fixture
def paths(monkeypatch):
    """Returns use(path) that makes the eager layer take the C++ node ("cpp") or the Python
    Function ("python") for the rest of the test."""
    attach = NODE.attach_fn()
    assert attach is not None, f"the C++ autograd node did not build: {NODE._state['error']}"
    monkeypatch.setattr(AL, "_attach", attach)

    def use(path: str):
        monkeypatch.setattr(AL, "_apply", AL._node_apply if path == "cpp" else AL._function_apply)

    return use


def _tensors(N=24, k=40, d=32, r=12, bias=False, fifo=False, seed=0, device="cpu"):
    """x, W, b, A, E, B, ranknum on ``device`` (``device_for(impl)``: on a GPU machine the "triton"
    tests build CUDA tensors, so the layer's own node is what they see, not conftest's copies)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, k, generator=g)
    W = torch.randn(d, k, generator=g) / k**0.5
    W = W.t().contiguous() if fifo else W
    b = torch.randn(d, generator=g) if bias else None
    A, E, B = (torch.randn(*s, generator=g).mul(0.5) for s in ((r, k), (r, 1), (d, r)))
    out = (x, W, b, A, E, B, torch.tensor([float(r)]))
    return tuple(v.to(device) if v is not None else None for v in out)


# (dropout, fan_in_fan_out, bias, autocast, which inputs need gradients)
CASES = [
    (0.2, False, False, False, "x lora"),
    (0.0, True, True, False, "x lora base"),
    (0.2, False, True, True, "x lora"),
    (0.2, False, False, False, "x"),
    (0.0, False, False, False, "lora"),
    (0.2, True, True, False, "base"),
]


def _call(tensors, p, fifo, autocast, needs, seed):
    x, W, b, A, E, B, rk = (v.clone() if v is not None else None for v in tensors)
    leaves = {"x": [x], "lora": [A, E, B], "base": [W] + ([b] if b is not None else [])}
    wanted = [v for name in needs.split() for v in leaves[name]]
    for v in wanted:
        v.requires_grad_()
    torch.manual_seed(seed)  # the seed is drawn from torch's generator
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, p, True, fifo)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, wanted, g)
    return out, out.grad_fn.name(), grads


@pytest.mark.parametrize("p, fifo, bias, autocast, needs", CASES)
@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_node_equals_the_python_function(paths, monkeypatch, name, p, fifo, bias, autocast, needs):
    set_impl(monkeypatch, name)
    tensors = _tensors(bias=bias, fifo=fifo, device=device_for(name))
    results = {}
    for path in ("cpp", "python"):
        paths(path)
        results[path] = _call(tensors, p, fifo, autocast, needs, seed=3)
    (out, node, grads), (out_py, node_py, grads_py) = results["cpp"], results["python"]
    assert (node, node_py) == ("AdapterLinearBackward", "_AdapterLinearFnBackward")
    assert torch.equal(out, out_py)
    for a, b in zip(grads, grads_py):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_graph_structure_and_grads_as_the_functions(paths, use_backend, name):
    """The same next functions (x, weight, bias, A, E, B in order), and on the Triton path the
    adapter gradients kept as views of one buffer with the parameters' strides."""
    use_backend(name)
    x, W, b, A, E, B, rk = _tensors(bias=True, device=device_for(name))
    for v in (x, A, E, B):
        v.requires_grad_()
    kinds = {}
    for path in ("cpp", "python"):
        paths(path)
        out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.1, True)
        kinds[path] = [type(f).__name__ if f is not None else None for f, _ in out.grad_fn.next_functions]
        for v in (x, A, E, B):
            v.grad = None
        out.sum().backward()
        for v in (A, E, B):
            assert v.grad.shape == v.shape and v.grad.stride() == v.stride()
        if name == "triton":
            assert len({v.grad.untyped_storage().data_ptr() for v in (A, E, B)}) == 1
    # the Function has a seventh input, ranknum (a tensor argument, never differentiated)
    assert kinds["cpp"] == kinds["python"][:6] == ["AccumulateGrad", None, None, "AccumulateGrad", "AccumulateGrad", "AccumulateGrad"]  # fmt: skip
    assert kinds["python"][6:] == [None]


def test_no_node_without_grad_mode_or_without_inputs_that_need_grads(paths):
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors()
    assert ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.1, True).grad_fn is None
    A.requires_grad_()
    with torch.no_grad():
        assert ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.1, True).grad_fn is None
    with torch.inference_mode():
        assert not ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.1, True).requires_grad
    assert ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.1, True).grad_fn.name() == "AdapterLinearBackward"


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_retain_graph_and_backward_twice(paths, use_backend, name):
    use_backend(name)
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors(device=device_for(name))
    A.requires_grad_()
    out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    out.sum().backward(retain_graph=True)
    first = A.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(A.grad, 2 * first)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()


def test_a_saved_tensor_changed_in_place_is_refused(paths):
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors()
    A.requires_grad_()
    out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    with torch.no_grad():
        A.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_saved_tensor_hooks_see_what_the_function_saves(paths, use_backend, name):
    """x, t, A, E, B and the seed go through the hooks (activation offloading, checkpointing), and
    what unpack returns is what the backward uses."""
    use_backend(name)
    saved = {}
    grads = {}
    for path in ("cpp", "python"):
        paths(path)
        x, W, b, A, E, B, rk = _tensors(device=device_for(name))
        for v in (x, A, E, B):
            v.requires_grad_()
        seen = saved[path] = []

        def pack(t):
            seen.append((tuple(t.shape), t.dtype))
            return t.clone()  # a copy, as an offloading hook would hand back

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.manual_seed(1)
            out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
        grads[path] = torch.autograd.grad(out.sum(), (x, A, E, B))
    assert saved["cpp"] == saved["python"] and len(saved["cpp"]) == 6
    assert [dt for _, dt in saved["cpp"]].count(torch.int64) == 1
    for a, b in zip(grads["cpp"], grads["python"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_activation_checkpointing_gives_the_plain_gradients(paths, use_backend, name, reentrant):
    """torch.utils.checkpoint (what gradient_checkpointing=True runs): the recomputed forward draws
    the same seed (checkpoint restores the RNG state), so the gradients are the plain run's, bit for
    bit, through the C++ node and the Python Function alike."""
    use_backend(name)
    x0, W, b, A0, E0, B0, rk = _tensors(bias=True, device=device_for(name))

    def layer(x, A, E, B):
        return torch.tanh(ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True))

    grads = {}
    for path in ("cpp", "python"):
        paths(path)
        for ckpt in (False, True):
            leaves = [v.clone().requires_grad_() for v in (x0, A0, E0, B0)]
            torch.manual_seed(4)
            if ckpt:
                out = torch.utils.checkpoint.checkpoint(layer, *leaves, use_reentrant=reentrant)
            else:
                out = layer(*leaves)
            out.sum().backward()
            grads[path, ckpt] = [v.grad for v in leaves]
    for key, got in grads.items():
        for a, b_ in zip(got, grads["cpp", False]):
            assert torch.equal(a, b_), key


def test_an_error_in_the_backward_reaches_the_caller(paths, use_backend, monkeypatch):
    use_backend("triton")
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors()
    A.requires_grad_()
    out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    monkeypatch.setattr(torch._C, "_get_deterministic_algorithms", lambda: True)
    with pytest.raises(RuntimeError, match="fp32 atomics"):
        out.sum().backward()


def test_a_malformed_backward_result_is_refused(paths, use_backend, monkeypatch):
    """The node checks what an implementation's backward hands back before reading it."""
    use_backend("torch")
    paths("cpp")
    fwd, _, op_bwd = AL._IMPLS["torch"]
    monkeypatch.setattr(AL, "_PLANS", {})
    monkeypatch.setitem(AL._IMPLS, "torch", (fwd, lambda *a: ([1.0], None), op_bwd))
    x, W, b, A, E, B, rk = _tensors()
    A.requires_grad_()
    out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.0, True)
    with pytest.raises(RuntimeError, match="must return"):
        out.sum().backward()


def test_a_cuda_backward_under_the_deterministic_switch_runs_torch_ops(monkeypatch):
    """What the node asks Python for when torch.use_deterministic_algorithms was turned on between a
    CUDA forward and its backward (it asks only then): the torch implementation, no Triton plan."""
    triton, torch_impl = ("triton", *AL._IMPLS["triton"]), ("torch", *AL._IMPLS["torch"])
    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    aux = object()
    assert AL._swap_if_deterministic(triton, aux) == (torch_impl, None)
    assert AL._swap_if_deterministic(torch_impl, aux) == (torch_impl, aux)
    monkeypatch.setenv("ADALORA_FAST_BACKEND", "triton")  # a forced Triton raises in its backward instead
    assert AL._swap_if_deterministic(triton, aux) == (triton, aux)


def test_backward_from_another_thread(paths):
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors()
    A.requires_grad_()
    torch.manual_seed(0)
    out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    errors = []

    def run():
        try:
            out.sum().backward()
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    th.join()
    assert not errors, errors
    got = A.grad.clone()
    A.grad = None
    paths("python")
    torch.manual_seed(0)
    ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True).sum().backward()
    assert torch.equal(got, A.grad)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_the_node_lets_go_of_what_it_holds(paths, use_backend, name):
    """After a backward (no retain_graph) the saved tensors are freed; a graph dropped without a
    backward frees them too; the Python objects it refers to (the plans) are not leaked."""
    use_backend(name)
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors(device=device_for(name))
    A.requires_grad_()

    def forward():  # (out, a weak reference to the t its node saved)
        refs = []

        def pack(t):
            if t.dtype == torch.float32 and t.shape == (24, 12):
                refs.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
        assert len(refs) == 1
        return out, refs[0]

    out, ref = forward()
    out.sum().backward()
    del out
    gc.collect()
    assert ref() is None, "t outlived the backward"
    out, ref = forward()
    del out
    gc.collect()
    assert ref() is None, "t outlived its graph"
    plan = AL._plan(x, W, A, E, B, rk)
    before = sys.getrefcount(plan)
    for _ in range(20):
        ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True).sum().backward()
        ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    gc.collect()
    assert sys.getrefcount(plan) == before


def test_forward_mode_ad_is_refused_as_by_the_function(paths):
    paths("cpp")
    x, W, b, A, E, B, rk = _tensors()
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="jvp"):
            ops.adapter_linear(xd, W, b, A, E, B, 2.0, rk, 0.0, True)


def test_a_failed_build_warns_once_and_keeps_the_function(monkeypatch):
    from adalora_fast.ops import cpu_ext

    def fail(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpu_ext, "build", fail)
    monkeypatch.setattr(NODE, "_state", {"module": None, "error": None})
    monkeypatch.setattr(AL, "_apply", AL._first_apply)
    x, W, b, A, E, B, rk = _tensors()
    A.requires_grad_()
    with pytest.warns(RuntimeWarning, match="C\\+\\+ autograd node is unavailable .*no C\\+\\+ compiler here"):
        out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    assert out.grad_fn.name() == "_AdapterLinearFnBackward" and AL._apply is AL._function_apply
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True).sum().backward()


def test_switched_off_builds_nothing(monkeypatch):
    from adalora_fast.ops import cpu_ext

    monkeypatch.setenv("ADALORA_FAST_NODE", "0")
    monkeypatch.setattr(cpu_ext, "build", lambda *a, **k: pytest.fail("built although switched off"))
    monkeypatch.setattr(NODE, "_state", {"module": None, "error": None})
    monkeypatch.setattr(AL, "_apply", AL._first_apply)
    x, W, b, A, E, B, rk = _tensors()
    A.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, 0.2, True)
    assert out.grad_fn.name() == "_AdapterLinearFnBackward"
