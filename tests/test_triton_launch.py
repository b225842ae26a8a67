"""How the Triton kernels are launched, checked on the CPU (the interpreter): one device per launch,
the dot precision following torch's TF32 switch, what is specialised, dropout p = 1, and the
deterministic-algorithms switch. What needs a GPU is in ``tests/test_triton_gpu.py``.

The tests that call a kernel launcher themselves build its tensors on ``TRITON_DEVICE`` (conftest):
the CPU here, CUDA on a GPU machine (without the interpreter a launch takes device tensors only)."""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE

from adalora_fast import ops
from adalora_fast.kernels import _launch
from adalora_fast.kernels import adapter_linear as ka
from adalora_fast.kernels import orth as ko
from tolerances import assert_close


def test_launch_refuses_tensors_on_two_devices():
    a, b = torch.zeros(4), torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        _launch.launch_device([a, 3, b])
    assert _launch.launch_device([a, 1.0, torch.ones(2)]) == torch.device("cpu")


def test_orth_tables_refuse_matrices_on_two_devices():
    with pytest.raises(ValueError, match="one device"):
        ko._tables([torch.zeros(2, 8)], [torch.zeros(8, 2, device="meta")])


@pytest.fixture
def restore_matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old)


def test_dot_precision_follows_torch_tf32_switch(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")  # torch's default: full fp32
    assert _launch.dot_precision(torch.float32) == "ieee"
    torch.set_float32_matmul_precision("high")  # = torch.backends.cuda.matmul.allow_tf32 = True
    assert _launch.dot_precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert _launch.dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert _launch.dot_precision(torch.float32) == "ieee"
    for half in (torch.bfloat16, torch.float16):  # tensor cores always
        assert _launch.dot_precision(half) == "tf32"
    assert set(_launch.dot_precisions(torch.float32)) == {"ieee", "tf32"}


def _no_spec(fn):
    """Arguments in ``do_not_specialize`` (a JITFunction, or the interpreter's InterpretedFunction)."""
    if hasattr(fn, "params"):
        return {p.name for p in fn.params if p.do_not_specialize}
    return set(fn.kwargs["do_not_specialize"])


@pytest.mark.parametrize("kernel", [ka._shrink_kernel, ka._dA_dx_kernel, ka._dropout_keep_mask_kernel])
def test_seed_and_batch_size_do_not_pick_binaries_widths_do(kernel):
    """A new seed tensor every step, a new N every batch: neither may compile a second binary (N's
    value %16, the seed pointer's alignment would pick one); the fixed widths K / D keep their
    divisibility (128-bit loads)."""
    names = set(kernel.arg_names)
    assert {"SEED", "N"} <= _no_spec(kernel)
    assert "K" in names and "K" not in _no_spec(kernel)


@pytest.mark.parametrize("kernel", [ka._grad_rank_kernel, ka._expand_add_kernel])
def test_width_d_specialised(kernel):
    assert "N" in _no_spec(kernel) and "D" not in _no_spec(kernel)


def test_split_arguments_specialisation():
    """The partial count of the split consumers picks no binary (one for every S); the chunk widths
    of the split producers keep Triton's %16 specialisation: they are multiples of the 64-column
    tile (0 unsplit), so they always fall in one key, and their divisibility reaches the chunk
    starts (128-bit loads, tests/test_triton_compile.py)."""
    for kernel in (ka._expand_add_kernel, ka._dA_dx_kernel):
        assert "n_split" in _no_spec(kernel)
    for kernel, chunk in ((ka._shrink_kernel, "k_chunk"), (ka._grad_rank_kernel, "d_chunk")):
        assert chunk in set(kernel.arg_names) and chunk not in _no_spec(kernel)
    for rows, width, force in [(8192, 4096, None), (8192, 11008, None), (70, 300, 3), (5, 4100, 7)]:
        chunk = ka.split_plan(rows, width, 64, 132 * 4, force)[1]
        assert chunk % 64 == 0 and chunk % 16 == 0 and chunk != 1


def test_dropout_p_one_drops_everything():
    dev = TRITON_DEVICE
    torch.manual_seed(0)
    x, A = torch.randn(70, 24).to(dev), torch.randn(12, 24).to(dev)
    t = ka.shrink(x, A, 1.0, seed=5)
    assert t.device.type == dev.type
    assert torch.equal(t, torch.zeros_like(t))
    assert not ka.dropout_keep_mask(5, 70, 24, 1.0, dev).any()
    assert ka.dropout_keep_mask(5, 70, 24, 0.0, dev).all()
    with pytest.raises(ValueError, match="dropout_p"):
        ka.shrink(x, A, 1.5, seed=5)


def test_strided_x_with_a_large_column_stride():
    """x read through a column stride (x = xt.T): the column offset is computed in int64."""
    torch.manual_seed(1)
    xt = torch.randn(24, 70).to(TRITON_DEVICE)
    x = xt.t()  # [70, 24], strides (1, 70)
    assert x.stride() == (1, 70)
    A = torch.randn(12, 24).to(TRITON_DEVICE)
    assert_close(ka.shrink(x, A, 0.0, seed=0), x @ A.t(), what="t")


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _layer():
    torch.manual_seed(2)
    x = torch.randn(9, 24, requires_grad=True)
    W = torch.randn(20, 24)
    A, E, B = (torch.randn(*s, requires_grad=True) for s in ((6, 24), (6, 1), (20, 6)))
    return x, W, A, E, B


def test_deterministic_switch_refuses_the_atomic_backward(use_backend, deterministic):
    """Forced triton under torch.use_deterministic_algorithms(True): the forward (no atomics) runs,
    the backward (fp32 atomics into dA, dB, dE) raises, naming the switch and the way out."""
    use_backend("triton")
    x, W, A, E, B = _layer()
    out = ops.adapter_linear(x, W, None, A, E, B, 2.0, 6, dropout_p=0.1, training=True, seed=3)
    with pytest.raises(RuntimeError, match="use_deterministic_algorithms.*ADALORA_FAST_BACKEND=torch"):
        out.sum().backward()


def test_deterministic_warn_only_warns(use_backend):
    use_backend("triton")
    x, W, A, E, B = _layer()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = ops.adapter_linear(x, W, None, A, E, B, 2.0, 6, dropout_p=0.0, training=True)
        with pytest.warns(UserWarning, match="not deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert A.grad is not None


def test_orth_penalty_has_no_atomics_and_repeats_bit_for_bit(use_backend, deterministic):
    use_backend("triton")
    torch.manual_seed(4)
    lora_A = [torch.randn(6, 40) for _ in range(5)]
    lora_B = [torch.randn(24, 6) for _ in range(5)]
    dev_A, dev_B = [a.to(TRITON_DEVICE) for a in lora_A], [b.to(TRITON_DEVICE) for b in lora_B]
    first = ko.forward(dev_A, dev_B)[0]
    again = ko.forward(dev_A, dev_B)[0]
    assert first.device.type == TRITON_DEVICE.type
    assert torch.equal(first, again)
    # the expected loss from the CPU matrices (no cuBLAS under the deterministic switch)
    norms = [torch.linalg.norm(a @ a.t() - torch.eye(6)) for a in lora_A]
    norms += [torch.linalg.norm(b.t() @ b - torch.eye(6)) for b in lora_B]
    assert_close(first.cpu(), torch.stack(norms).mean(), what="loss")


# ----------------------------------------------------------------------------- direct launches (CUDA)
class _Param:
    def __init__(self, name, constexpr):
        self.name, self.is_constexpr = name, constexpr


class _FakeCompiled:
    packed_metadata, function = "packed", "function"

    def __init__(self, calls):
        self.calls = calls

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid)

    def run(self, *args):
        self.calls.append(("direct", args))


class _FakeKernel:
    """A JITFunction's interface as _launch uses it: params, and kernel[grid](...) -> compiled kernel."""

    params = [_Param("X", False), _Param("N", False), _Param("s", False), _Param("BLOCK", True), _Param("FLAG", True)]

    def __init__(self):
        self.calls = []
        self.compiled = _FakeCompiled(self.calls)

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled

        return jit


def test_direct_launch_binds_every_parameter_as_the_jit_and_keys_its_specialisation(monkeypatch):
    """The second launch of one specialisation calls the compiled kernel's launcher with the grid as
    three dims, the stream, and every parameter in order (constexprs included, options not), as
    Triton's JIT does; a new specialisation (an integer's divisibility by 16, a tensor's 16-byte
    alignment, another dtype, another constexpr) goes back through the JIT. No GPU needed: the
    compiled kernel is a stand-in."""
    monkeypatch.setattr(_launch, "DIRECT", True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    monkeypatch.setattr(_launch, "_compiled", {})
    k = _FakeKernel()
    x = torch.zeros(64)
    kw = {"BLOCK": 64, "FLAG": True, "num_warps": 4}
    _launch._launch_cuda(k, (3,), 0, (x, 32, 1.5), kw)
    assert [c[0] for c in k.calls] == ["jit"]
    _launch._launch_cuda(k, (3,), 0, (x, 48, 2.5), kw)  # same specialisation (48 % 16 == 0), new values
    kind, args = k.calls[-1]
    assert kind == "direct"
    hooks = _launch._runtime_hooks()
    enter = hooks.launch_enter_hook
    meta = None if not getattr(enter, "calls", True) else ("metadata", (3,))
    assert args == (3, 1, 1, 1234, "function", "packed", meta, enter, hooks.launch_exit_hook, x, 48, 2.5, 64, True)
    n_jit = 1
    for call in [
        ((x, 33, 1.5), kw),  # 33: not a multiple of 16
        ((x, 1, 1.5), kw),  # 1: Triton's constexpr-1 specialisation
        ((x[1:], 32, 1.5), kw),  # 4-byte offset: not 16-byte aligned
        ((x.to(torch.float64), 32, 1.5), kw),  # another pointer dtype
        ((x, 2**40, 1.5), kw),  # an int64 argument
        ((x, 32, 1.5), dict(kw, BLOCK=128)),  # another constexpr
        ((x, 32, 1.5), dict(kw, num_warps=8)),
    ]:  # another option
        _launch._launch_cuda(k, (3,), 0, *call)
        n_jit += 1
        assert sum(c[0] == "jit" for c in k.calls) == n_jit, call
    _launch._launch_cuda(k, (5, 2), 1, (x, 32, 1.5), kw)  # another device: its own binary
    assert k.calls[-1][0] == "jit"
    _launch._launch_cuda(k, (5, 2), 1, (x, 32, 1.5), kw)
    assert k.calls[-1][0] == "direct" and k.calls[-1][1][:3] == (5, 2, 1)


def test_direct_launch_off_and_unkeyable_arguments_use_the_jit(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setattr(_launch, "_compiled", {})
    k = _FakeKernel()
    x = torch.zeros(16)
    for _ in range(2):
        _launch._launch_cuda(k, (1,), 0, (x, None, 1.5), {"BLOCK": 64, "FLAG": True})  # None: not keyed
    monkeypatch.setattr(_launch, "DIRECT", False)
    for _ in range(2):
        _launch._launch_cuda(k, (1,), 0, (x, 32, 1.5), {"BLOCK": 64, "FLAG": True})
    assert [c[0] for c in k.calls] == ["jit"] * 4
    assert _launch.arg_key((x, 1, 17, 2**33, 0.5)) == (torch.float32, True, 1, 0, 4 | 2, -1)


def test_layer_kernels_take_constexprs_after_their_runtime_arguments():
    """What the direct launch relies on: each layer kernel's constexprs come after every runtime
    argument, and the launchers pass exactly the runtime ones positionally."""
    for kern in (ka._shrink_kernel, ka._expand_add_kernel, ka._grad_rank_kernel, ka._dA_dx_kernel):
        fn = getattr(kern, "fn", kern)
        import inspect

        names = list(inspect.signature(fn).parameters)
        flags = [getattr(fn, "__annotations__", {}).get(n) is not None for n in names]
        first = flags.index(True)
        assert all(flags[first:]), f"{fn.__name__}: a runtime argument after a constexpr"
