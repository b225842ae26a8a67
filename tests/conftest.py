"""Test set-up: Triton runs in its CPU interpreter without a GPU, on CUDA tensors with one.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection time.

Without a CUDA GPU (CPU-only machines, CI): ``TRITON_INTERPRET=1`` and the "triton" implementation runs
the kernels on CPU tensors in the interpreter (every half-precision load upcast to fp32).

With a CUDA GPU (``torch.cuda.is_available()``; ``ADALORA_FAST_TEST_DEVICE=cpu`` keeps the CPU
set-up): the interpreter stays off, and wherever a test selects the "triton" implementation
(``impl`` or ``use_backend``) the public ops of ``adalora_fast.ops`` are wrapped by
:func:`_on_cuda`: the test's CPU tensors go to the GPU (``.to``, differentiable, so gradients
come back to the CPU leaves), the compiled kernels run there, half-precision branches included,
and results come back to the CPU, where the test compares them with ``reference.py`` as it does
here. Tensors an op changes in place (the importance state, ``lora_E``) are copied back. CPU
autocast in a test becomes CUDA autocast of the same dtype for the call. The ops that do not
differentiate through their inputs (the allocator's: importance, scores, masks) get detached
copies that carry each tensor's ``.grad`` along (``importance_update(grads=None)`` reads
``p.grad``). A call whose tensors are all on CUDA already is passed through untouched: tests that
check what happens on the device itself (registered ops under opcheck, kernel launchers, launch
counts, saved tensors, bitwise equality with a base layer run there) build their tensors on
:data:`TRITON_DEVICE` (:func:`device_for`). The fp32 tolerance (``tests/tolerances.py``) stays
1e-5: the kernels' fp32 dots are full fp32 unless torch's TF32 switch is on
(``kernels/triton_ops/_launch.dot_precision``). GPU-only tests are in ``tests/test_triton_gpu.py``.

Fixtures:
* ``use_backend(name)`` forces one implementation ("reference", "torch" or "triton") for the test;
* ``impl`` runs a test once per real implementation of the ops on the CPU: "torch" (torch ops
  only, ``ADALORA_FAST_CPU_EXT=0``), "cpp" (torch with the C++ kernels, which must build), and
  "triton" (the Triton kernels under the interpreter, or on the GPU). Compare each with
  ``reference.py``, never the reference with itself.
"""

import functools
import os
import tempfile

# torch.compile's on-disk caches (inductor's FX graph and AOT autograd caches) do not key on a
# custom op's fake implementation or the number of its backward outputs: a cache written by another
# revision of our ops replays a graph built for them. The suite compiles into a cache of its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="adalora_fast_inductor_")

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("ADALORA_FAST_TEST_DEVICE", "cuda") != "cpu"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# where the "triton" implementation runs: the GPU, or the CPU under the interpreter
TRITON_DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")

REAL_IMPLS = ("torch", "cpp", "triton")
# the public ops a test calls through ``adalora_fast.ops`` (wrapped on a GPU machine)
_PUBLIC_OPS = (
    "adapter_linear",
    "dropout_keep_mask",
    "importance_update",
    "triplet_scores",
    "keep_mask_to_budget",
    "apply_mask",
    "orth_penalty",
)
# the ops autograd differentiates through (their inputs move with a differentiable ``.to``); the
# others get detached copies that carry ``.grad``
_DIFFERENTIABLE_OPS = ("adapter_linear", "orth_penalty")


def device_for(impl: str) -> torch.device:
    """Where a test builds the tensors it hands to implementation ``impl`` itself (registered ops,
    kernels, a layer compared bit for bit): :data:`TRITON_DEVICE` for "triton", else the CPU."""
    return TRITON_DEVICE if impl == "triton" else torch.device("cpu")


def _holds(v, kind: str) -> bool:
    """Whether a call argument is (or holds) a tensor on a ``kind`` device, or names one."""
    if torch.is_tensor(v):
        return v.device.type == kind
    if isinstance(v, torch.device):
        return v.type == kind
    if isinstance(v, str):
        return v == kind
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return any(_holds(x, kind) for x in v)
    return False


def _on_cuda(fn, differentiable: bool):
    """``fn`` run on the GPU for CPU callers (see the module docstring); CUDA callers call ``fn``."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        every = list(args) + list(kwargs.values())
        if _holds(every, "cuda") or not _holds(every, "cpu"):
            # a caller on the GPU already (a CPU seed tensor beside CUDA inputs included): no copies,
            # the caller's autocast as it is
            return fn(*args, **kwargs)
        moved = []

        def to_dev(v):
            if torch.is_tensor(v) and v.device.type == "cpu":
                if differentiable:
                    c = v.to("cuda")  # gradients flow back to the CPU leaf
                else:
                    c = v.detach().to("cuda")
                    g = v.grad if v.is_leaf or v.retains_grad else None  # (a non-leaf's .grad warns)
                    if g is not None:  # importance_update(grads=None) reads p.grad
                        c.grad = g.detach().to("cuda")
                moved.append((v, c))
                return c
            if (isinstance(v, torch.device) and v.type == "cpu") or (isinstance(v, str) and v == "cpu"):
                return torch.device("cuda")
            if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
                return type(v)(to_dev(x) for x in v)
            return v

        def to_cpu(v):
            if torch.is_tensor(v):
                return v.to("cpu") if v.device.type == "cuda" else v
            if isinstance(v, tuple):
                return type(v)(*map(to_cpu, v)) if hasattr(v, "_fields") else tuple(map(to_cpu, v))
            if isinstance(v, list):
                return [to_cpu(x) for x in v]
            return v

        dargs = [to_dev(a) for a in args]
        dkw = {k: to_dev(v) for k, v in kwargs.items()}
        ctx = (
            torch.autocast("cuda", dtype=torch.get_autocast_dtype("cpu"))
            if torch.is_autocast_enabled("cpu")
            else torch.autocast("cuda", enabled=False)
        )
        with ctx:
            out = fn(*dargs, **dkw)
        with torch.no_grad():
            for cpu_t, dev_t in moved:  # in-place results (importance state, lora_E masking)
                back = dev_t.to("cpu")
                if back.shape == cpu_t.shape and not torch.equal(back, cpu_t):
                    cpu_t.copy_(back)
        return to_cpu(out)

    return wrapped


def _select(monkeypatch, name: str) -> None:
    monkeypatch.setenv("ADALORA_FAST_BACKEND", name)
    if ON_GPU and name == "triton":
        from adalora_fast import ops

        for op in _PUBLIC_OPS:
            monkeypatch.setattr(ops, op, _on_cuda(getattr(ops, op), op in _DIFFERENTIABLE_OPS))


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    # Each test chooses its backend explicitly; an ADALORA_FAST_BACKEND from the shell must not leak in.
    monkeypatch.delenv("ADALORA_FAST_BACKEND", raising=False)
    yield


@pytest.fixture
def use_backend(monkeypatch):
    def _set(name: str):
        _select(monkeypatch, name)

    return _set


def set_impl(monkeypatch, name: str) -> None:
    """Force one real implementation ("torch", "cpp" or "triton") for the rest of the test."""
    from adalora_fast.ops import cpu_ext

    if name == "cpp":
        monkeypatch.setenv("ADALORA_FAST_BACKEND", "torch")
        monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "1")
        assert cpu_ext.available(), f"the C++ CPU kernels did not build: {cpu_ext._state['error']}"
    else:
        _select(monkeypatch, name)
        monkeypatch.setenv("ADALORA_FAST_CPU_EXT", "0")


@pytest.fixture(params=REAL_IMPLS)
def impl(request, monkeypatch):
    set_impl(monkeypatch, request.param)
    return request.param
