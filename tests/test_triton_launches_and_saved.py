"""What the Triton path saves for backward and how many kernels it launches (TRITON_INTERPRET=1).

Launches are counted two ways: Triton launches through ``adalora_fast.kernels._launch.launch``
(every kernel of the package goes through it), and every other device op with a
TorchDispatchMode that records each ATen call that launches work (views, aliases and bare
allocations excluded). The dispatch mode is switched off inside a Triton launch, so the
interpreter's own host-side copies are not counted.

The ops are ``torch.library`` custom operators (``adalora_fast::*``): the mode sees each as one
call, and its implementation runs below the mode. The counter records the custom op's name in
``custom`` and redispatches it to its device's implementation with the mode pushed again, so
what runs inside it (the base GEMM, the Triton launches, any small torch op) is counted too.
(Re-entering the mode and calling the op again would dispatch back into the mode: recursion.)

Pointer tables the kernels' launchers upload (``_launch.to_device_table``) are counted apart, in
``tables``: free on the CPU, one pinned host-to-device copy each on CUDA.

The inputs are built on ``TRITON_DEVICE`` (conftest): the CPU here; on a GPU machine CUDA, so that
conftest's wrapper passes the calls straight through and what is counted is what runs on the GPU
(not the wrapper's copies between the CPU and the GPU).
"""

from __future__ import annotations

import torch
from conftest import TRITON_DEVICE
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from adalora_fast import ops
from adalora_fast.kernels import _launch
from adalora_fast.ops import FlatLayout

# no kernel: allocations, aliases and metadata; "item"/"_local_scalar_dense" read a value
_NO_KERNEL = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "detach",
    "detach_",
    "alias",
    "lift_fresh",
    "_local_scalar_dense",
    "item",
    "is_same_size",
    "size",
    "stride",
    "sym_size",
    "sym_stride",
    "numel",
    "dim",
}


def _device_key(args, kwargs):
    tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
    tensors += [
        t for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)
    ]
    cuda = any(t.device.type == "cuda" for t in tensors)
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if cuda else torch._C.DispatchKey.CPU)


class Counter(TorchDispatchMode):
    def __init__(self, monkeypatch):
        super().__init__()
        self.ops: list = []
        self.triton: list = []
        self.custom: list = []
        self.tables: list = []
        real = _launch.launch
        real_table = _launch.to_device_table

        def counted(kernel, grid, *a, **kw):
            self.triton.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
            with _disable_current_modes():
                return real(kernel, grid, *a, **kw)

        def table(vals, device):
            self.tables.append(len(vals))
            with _disable_current_modes():
                return real_table(vals, device)

        monkeypatch.setattr(_launch, "launch", counted)
        monkeypatch.setattr(_launch, "to_device_table", table)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "adalora_fast":
            # one of our ops: count it once, then count what its implementation runs
            self.custom.append(name)
            with self:
                return func.redispatch(_device_key(args, kwargs), *args, **kwargs)
        if not (func.is_view or name in _NO_KERNEL):
            self.ops.append(name)
        return func(*args, **kwargs)

    def reset(self):
        self.ops.clear()
        self.triton.clear()
        self.custom.clear()
        self.tables.clear()

    @property
    def total(self):
        return len(self.ops) + len(self.triton)


def _dev(t, requires_grad=False):
    """t drawn on the CPU, on TRITON_DEVICE (a leaf there when it requires grad)."""
    return t.to(TRITON_DEVICE).requires_grad_(requires_grad)


def _layer(N=64, k=48, d=40, r=12, dtype=torch.float32):
    x = _dev(torch.randn(N, k, dtype=dtype), requires_grad=True)
    W, b = _dev(torch.randn(d, k, dtype=dtype)), _dev(torch.randn(d, dtype=dtype))
    A, E, B = (_dev(torch.randn(*s), requires_grad=True) for s in ((r, k), (r, 1), (d, r)))
    return x, W, b, A, E, B, _dev(torch.tensor([float(r)]))


def test_saved_for_backward_nothing_of_size_Nk_but_x(use_backend):
    use_backend("triton")
    torch.manual_seed(0)
    N, k, d, r = 64, 48, 40, 12
    x, W, b, A, E, B, rk = _layer(N, k, d, r)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.adapter_linear(x, W, b, A, E, B, 2.0, rk, dropout_p=0.1, training=True, seed=7)
    assert out.device.type == TRITON_DEVICE.type
    big = [t for t in saved if t.numel() >= N * min(k, d)]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].shape == x.shape
    total = sum(t.numel() * t.element_size() for t in saved)
    x_bytes = x.numel() * x.element_size()
    t_bytes = N * r * 4
    weights = sum(t.numel() * t.element_size() for t in (W, A, E, B, rk))
    seed_bytes = 8  # the [1] int64 seed on x's device, saved as a tensor
    assert total <= x_bytes + t_bytes + weights + seed_bytes, (total, [tuple(t.shape) for t in saved])
    out.sum().backward()  # what was saved is enough for backward
    assert x.grad is not None and A.grad is not None


def test_launches_per_layer_forward_backward(use_backend, monkeypatch):
    """One op each way (the dispatch mode takes the registered ops; the eager path runs the same
    implementation, counted in tests/test_host_path.py), and what it runs. Forward: the base GEMM, 2
    Triton launches (the scale s = scaling/(ranknum+eps) is formed inside them from ranknum in device
    memory: no torch op), and the seed: drawn on x's device, or here the given seed copied there
    (an op's output may not alias its input). Backward: the base dx GEMM, three zeroed fp32
    accumulators (dA, dB, dE: the op's outputs may not alias one another; the eager path's one flat
    buffer is counted in tests/test_host_path.py) and 2 Triton launches (+ the casts of half adapters)."""
    use_backend("triton")
    torch.manual_seed(1)
    for dtype, autocast in ((torch.float32, None), (torch.float32, torch.bfloat16)):
        x, W, b, A, E, B, rk = _layer()
        c = Counter(monkeypatch)
        with torch.autocast(TRITON_DEVICE.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            # under autocast the dispatcher's casts of the inputs are not the layer's: take them out
            xa, Wa, ba, Aa, Ea, Ba = (t.to(autocast) if autocast else t for t in (x, W, b, A, E, B))
            with c:
                out = ops.adapter_linear(xa, Wa, ba, Aa, Ea, Ba, 2.0, rk, dropout_p=0.1, training=True, seed=3)
        assert c.custom == ["adapter_linear"], c.custom
        assert c.triton == ["_shrink_kernel", "_expand_add_kernel"]
        assert c.tables == []
        assert c.total <= 4, (c.ops, c.triton)
        g = torch.randn_like(out)
        c.reset()
        with c:
            torch.autograd.grad(out, (xa, Aa, Ea, Ba), g)
        assert c.custom == ["adapter_linear_backward"], c.custom
        assert c.triton == ["_grad_rank_kernel", "_dA_dx_kernel"]
        assert c.tables == []
        assert c.total <= 6 + 3 * (autocast is not None), (c.ops, c.triton)


def test_launches_importance_and_mask_all_layers(use_backend, monkeypatch):
    use_backend("triton")
    torch.manual_seed(2)
    shapes = [(12, 40, 24)] * 5 + [(6, 24, 70)] * 3 + [(0, 16, 16)]
    L = FlatLayout(shapes)
    params, grads = [], []
    for r, k, d in shapes:
        params += [_dev(torch.randn(r, k)), _dev(torch.randn(d, r)), _dev(torch.randn(r, 1))]
    grads = [torch.randn_like(p) for p in params]
    m1, m2 = _dev(torch.zeros(L.numel)), _dev(torch.zeros(L.numel))
    skipped = _dev(torch.zeros(len(L.tensor_shapes), dtype=torch.int64))  # the allocator's persistent counter
    ops.importance_update(L, params, grads, m1, m2, 0.85, 0.85, want_scores=True, skipped=skipped)  # the tables
    c = Counter(monkeypatch)
    with c:
        scores = ops.importance_update(L, params, grads, m1, m2, 0.85, 0.85, want_scores=True, skipped=skipped)
    with _disable_current_modes():
        keep = ops.keep_mask_to_budget(scores, 10)  # the k-th value selection, not counted
    with c:
        ops.apply_mask(params[2::3], keep)
    assert c.custom == ["importance_update", "apply_mask"], c.custom
    assert c.triton == ["_importance_kernel", "_apply_mask_kernel"]
    # importance_update's tables are cached (built by the first call); apply_mask uploads its
    # [layers x 3] pointer table each call (on CUDA one pinned host-to-device copy, not a kernel)
    assert c.tables == [3 * (len(shapes) - 1)], c.tables
    # + the memset of the score vector
    assert c.total <= 3, (c.ops, c.triton)


def test_launches_orth_penalty(use_backend, monkeypatch):
    use_backend("triton")
    torch.manual_seed(3)
    shapes = [(12, 40, 24)] * 4 + [(6, 24, 70)] * 2
    lora_A = [_dev(torch.randn(r, k), requires_grad=True) for r, k, _ in shapes]
    lora_B = [_dev(torch.randn(d, r), requires_grad=True) for r, _, d in shapes]
    ops.orth_penalty(lora_A, lora_B)  # builds the pointer tables once
    c = Counter(monkeypatch)
    with c:
        loss = ops.orth_penalty(lora_A, lora_B)
        torch.autograd.grad(loss, lora_A + lora_B)
    assert c.custom == ["orth_penalty", "orth_penalty_backward"], c.custom
    assert c.triton == ["_orth_fwd_kernel", "_orth_bwd_kernel"]
    assert c.tables == [], "the forward's and the backward's tables come from the first call's cache"
    # + the zeroed scalar of the loss, autograd's ones_like seed of the backward, and the zero
    # gradients autograd makes for the op's two other outputs (gram and norms, saved for backward)
    assert c.total <= 6, (c.ops, c.triton)
