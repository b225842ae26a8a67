"""The adapted layer as registered operators: ``adalora_fast::adapter_linear`` and its backward.

    out = x Wᵀ + b + ((dropout(x) Aᵀ) ⊙ e) Bᵀ,   e = E · scaling / (ranknum + RANKNUM_EPS)

One op owns the whole layer (base matmul, bias, dropout, adapter), forward and backward, so the
adapter's dx is added in place into the base dx and nothing of size N×k but x is saved.

Schema (one argument order and one set of names at every level, the kernels' included)::

    adapter_linear(x [N, k], weight [d, k] ([k, d] if fan_in_fan_out), bias [d]?, lora_A [r, k],
                   lora_E [r, 1], lora_B [d, r], scaling, ranknum [1], dropout_p, fan_in_fan_out,
                   seed [1] int64?) -> (out [N, d] base dtype, t [N, r] fp32, seed [1] int64 CPU)

``t = dropout(x) Aᵀ`` and the seed are saved for backward. With ``seed=None`` and dropout on, the
op draws its seed from torch's default CPU generator inside the op (so ``torch.manual_seed``
makes dropout reproducible, eagerly and compiled alike, without a graph break or a recompile).

Implementations by device (PyTorch's dispatcher picks; ``ADALORA_FAST_BACKEND`` forces one):

* CPU, "torch": torch ops; fp32 adapters with dropout use the C++ kernel ``dropout_shrink``
  (``csrc/adapter_linear_cpu.cpp``: the keep mask hashed from the seed, fused into the shrink, one
  pass over x each way), other dtypes a seeded ``bernoulli_`` (two more passes each way).
* CUDA, "triton": ``kernels/triton_ops/adapter_linear.py``: shrink with in-kernel Philox dropout, expand-add in
  place; backward one pass over g and one over x (ranks above 64 run the torch implementation:
  the same math). On CPU tensors it runs under Triton's interpreter when forced.
* "reference" (forced, tests only): ``reference.adapter_linear``, its gradients by autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_ext
from .layout import RANKNUM_EPS
from .registry import AUTOCAST_DEVICES, LIB, autograd_inside_op, define_op, forced_impl, impl_for, no_autocast


# ---------------------------------------------------------------------------------- dropout masks
def dropout_keep_mask(seed: int, shape, p: float, device, dtype=torch.float32,
                      impl: Optional[str] = None) -> torch.Tensor:
    """The bool keep mask implementation ``impl`` (default: the one that runs on ``device``) draws for
    ``seed`` on a 2-D input of ``shape`` [N, k] with adapters of ``dtype``: Triton's Philox stream,
    the C++ kernel's hash (fp32 CPU with the extension), or torch's seeded ``bernoulli_``."""
    impl = impl or impl_for(torch.device(device))
    if impl == "triton":
        from ..kernels import adapter_linear as _ka

        return _ka.dropout_keep_mask(int(seed), int(shape[0]), int(shape[1]), p, device)
    if cpu_ext.usable(device, dtype, p):
        return torch.ops.adalora_fast_cpu.dropout_keep_mask(int(shape[0]), int(shape[1]), int(seed), float(p))
    return _keep_float(shape, dtype, device, seed, p).bool()


def _keep_float(shape, dtype, device, seed: int, p: float) -> torch.Tensor:
    # The same seeded draw in forward and backward: same shape, dtype, device and generator state.
    if torch.device(device).type == "cuda" and len(shape) == 2:
        # on CUDA the torch implementation draws the Triton kernels' Philox mask: a layer whose forward
        # ran one implementation and backward the other (the deterministic switch flipped in between,
        # see _impl) still sees one mask
        from ..kernels import adapter_linear as _ka

        return _ka.dropout_keep_mask(int(seed), int(shape[0]), int(shape[1]), p, device).to(dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)


def _scale(scaling, ranknum) -> torch.Tensor:
    """s = scaling/(ranknum+eps), a [1] tensor on ranknum's device (no host read of ranknum).

    Written as torch evaluates ``scaling / tensor`` (``Tensor.__rdiv__``: reciprocal, then multiply;
    bitwise the same) without that Python wrapper, whose cost shows at two calls per layer step;
    in place on the fresh sum."""
    return (ranknum + RANKNUM_EPS).reciprocal_().mul_(scaling)


def _fold_e(lora_E, scaling, ranknum, dtype):
    """(s, e = E·s as an r-vector in ``dtype``): never an A*E tensor."""
    s = _scale(scaling, ranknum)
    return s, (lora_E.view(-1) * s).to(dtype)


# ---------------------------------------------------------------------------------- torch (CPU)
_KERNEL_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_x(x, lora_A):
    """x as the C++ dropout kernels take it: a half base layer's x is read as is (fp32 arithmetic,
    no N x k fp32 copy: PEFT's x.to(lora_A.dtype)), any other dtype cast to lora_A's."""
    xk = x if x.dtype in _KERNEL_X_DTYPES else x.to(lora_A.dtype)
    return xk if xk.is_contiguous() else xk.contiguous()


def _f32(t):
    """t as the C++ kernels take it: contiguous fp32 (a copy only for half adapters, [r, k] or [N, r])."""
    return t.contiguous() if t.dtype == torch.float32 else t.float().contiguous()


def _forward_torch(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    w = weight.t() if fan_in_fan_out else weight  # [d, k]
    out = F.linear(x, w, bias)
    _, e = _fold_e(lora_E, scaling, ranknum, lora_A.dtype)
    if cpu_ext.usable(x.device, lora_A.dtype, dropout_p):
        t = torch.ops.adalora_fast_cpu.dropout_shrink(_kernel_x(x, lora_A), _f32(lora_A), seed, dropout_p)
        t = t.to(lora_A.dtype)  # half adapters: fp32 sums rounded once, as a half matmul rounds its output
    else:
        xa = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
        if dropout_p > 0.0:
            xa = _keep_float(xa.shape, xa.dtype, xa.device, seed, dropout_p).mul_(xa).mul_(1.0 / (1.0 - dropout_p))
        t = xa @ lora_A.t()  # [N, r]
    u = t * e
    if out.dtype == u.dtype:
        out.addmm_(u, lora_B.t())
    else:
        out += u @ lora_B.t()
    return out, t.float()


def _backward_torch(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora
):
    s, e = _fold_e(lora_E, scaling, ranknum, lora_A.dtype)
    t = t.to(lora_A.dtype)
    w = weight.t() if fan_in_fan_out else weight  # [d, k]
    ga = g if g.dtype == lora_A.dtype else g.to(lora_A.dtype)
    gB = ga @ lora_B  # [N, r]
    dB = dE = dA = None
    if need_lora:
        dB = ga.t() @ (t * e)
        dE = ((gB * t).sum(0) * s).view_as(lora_E).to(lora_E.dtype)
    ge = gB * e
    dx = g @ w if need_x else None  # [N, k], base dtype
    if cpu_ext.usable(x.device, lora_A.dtype, dropout_p):
        xk = _kernel_x(x, lora_A)
        # the kernel adds into dx in fp32 and rounds once to dx's dtype (fp32 or x's)
        in_place = dx is not None and dx.dtype in (torch.float32, xk.dtype) and dx.is_contiguous()
        lora_dx = dx if in_place else (torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None)
        dA = torch.ops.adalora_fast_cpu.dropout_shrink_backward(
            xk, _f32(lora_A), _f32(ge), lora_dx, seed, dropout_p, bool(need_lora)
        ).to(lora_A.dtype)
        if need_x and not in_place:
            dx += lora_dx
        return dx, (dA if need_lora else None), dE, dB
    keep = _keep_float(x.shape, lora_A.dtype, x.device, seed, dropout_p) if dropout_p > 0.0 else None
    if need_lora:
        xa = x if x.dtype == lora_A.dtype else x.to(lora_A.dtype)
        dA = ge.t() @ (xa * keep * (1.0 / (1.0 - dropout_p)) if keep is not None else xa)
    if dx is not None:
        if keep is not None:
            dx += (ge @ lora_A).mul_(keep).mul_(1.0 / (1.0 - dropout_p))
        elif dx.dtype == ge.dtype:
            dx.addmm_(ge, lora_A)
        else:
            dx += ge @ lora_A
    return dx, dA, dE, dB


# ---------------------------------------------------------------------------------- triton (CUDA)
def _forward_triton(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    from ..kernels import adapter_linear as _ka

    _ka.check_dtypes(x.dtype, lora_A.dtype)
    if weight.dtype != x.dtype:
        raise TypeError(f"adapter_linear (triton): x ({x.dtype}) and weight ({weight.dtype}) must share the base dtype")
    if not (lora_A.dtype == lora_E.dtype == lora_B.dtype):
        raise TypeError(
            f"adapter_linear (triton): lora_A/E/B dtypes differ ({lora_A.dtype}, {lora_E.dtype}, {lora_B.dtype})"
        )
    w = weight.t() if fan_in_fan_out else weight
    out = F.linear(x, w, bias)  # contiguous [N, d], base dtype
    n, r = x.shape[0], lora_A.shape[0]
    if r == 0 or n == 0:
        return out, out.new_zeros((n, r), dtype=torch.float32)
    t = _ka.shrink(x, lora_A.contiguous(), dropout_p, seed)
    _ka.expand_add(out, t, lora_E.contiguous(), _scale(scaling, ranknum).float().contiguous(), lora_B.contiguous())
    return out, t


def _backward_triton(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora
):
    from ..kernels import adapter_linear as _ka

    w = weight.t() if fan_in_fan_out else weight  # [d, k]
    n, k = x.shape
    r, d = lora_A.shape[0], lora_B.shape[0]
    dx = g @ w if need_x else None  # base term (cuBLAS), [N, k] contiguous
    if r == 0 or n == 0:
        if not need_lora:
            return dx, None, None, None
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_E), torch.zeros_like(lora_B)
    # three fp32 accumulators (outputs of an op may not alias each other), zeroed for the atomics
    dA32, dB32, dE32 = (torch.zeros(shape, dtype=torch.float32, device=x.device) for shape in ((r, k), (d, r), (r,)))
    ge = torch.empty((n, r), dtype=torch.float32, device=x.device)
    lora_A, lora_E, lora_B = lora_A.contiguous(), lora_E.contiguous(), lora_B.contiguous()
    _ka.grad_rank(g, t, lora_E, _scale(scaling, ranknum).float().contiguous(), lora_B, ge, dB32, dE32)
    _ka.dA_dx(x, ge, lora_A, dx, dA32, dropout_p, seed)
    if not need_lora:
        return dx, None, None, None
    return dx, dA32.to(lora_A.dtype), dE32.view(r, 1).to(lora_E.dtype), dB32.to(lora_B.dtype)


# ---------------------------------------------------------------------------------- reference (forced)
def _forward_reference(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    from .. import reference as ref

    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device, lora_A.dtype, impl="torch") if dropout_p else None
    out = ref.adapter_linear(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, keep)
    xa = x.to(lora_A.dtype)
    if keep is not None:
        xa = xa * keep.to(xa.dtype) / (1.0 - dropout_p)
    return out, (xa @ lora_A.t()).float()


def _backward_reference(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora
):
    from .. import reference as ref

    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device, lora_A.dtype, impl="torch") if dropout_p else None
    leaves = [v.detach().requires_grad_() for v in (x, lora_A, lora_E, lora_B)]
    with autograd_inside_op(), torch.enable_grad():
        out = ref.adapter_linear(
            leaves[0], weight, None, *leaves[1:], scaling, ranknum, dropout_p, fan_in_fan_out, keep
        )
        dx, dA, dE, dB = torch.autograd.grad(out, leaves, g)
    return (dx if need_x else None), *((dA, dE, dB) if need_lora else (None, None, None))


_IMPLS = {
    "torch": (_forward_torch, _backward_torch),
    "triton": (_forward_triton, _backward_triton),
    "reference": (_forward_reference, _backward_reference),
}


def _impl(device: torch.device, rank: int, dtype: torch.dtype):
    name = impl_for(device)
    if name == "triton":
        from ..kernels import _launch

        if rank > _launch.RANK_PADS[-1]:
            if device.type == "cuda" and not forced_impl():
                name = "torch"  # the kernels are built for r <= 64; the same math in torch ops
            else:
                _launch.pad_rank(rank)  # raises: a forced triton never falls back
        elif device.type == "cuda" and not forced_impl() and torch.are_deterministic_algorithms_enabled():
            # the Triton backward sums dA/dB/dE with fp32 atomics: under torch.use_deterministic_algorithms
            # the same math runs in torch ops (the same Philox dropout mask, see _keep_float); a forced
            # triton raises in the backward instead (kernels/triton_ops/_launch.check_deterministic)
            name = "torch"
        elif device.type == "cuda" and not forced_impl() and _launch.dot_precision(dtype) == "ieee":
            # fp32 adapter products under torch's full-fp32 default (no TF32): cuBLAS SGEMM in the torch
            # implementation (the same Philox dropout mask); the Triton kernels' FMA dots at these tiles
            # spill (bench/compile_check.py). With TF32 allowed, or half adapters, Triton runs.
            name = "torch"
    return _IMPLS[name]


# ---------------------------------------------------------------------------------- the operators
# Registered through registry.define_op (torch.library.Library: schema, one kernel for CPU and CUDA,
# a fake) plus an Autograd kernel, not through torch.library.custom_op: this op runs once per
# adapted layer per step, and on a small layer custom_op's Python shims cost several times the
# torch implementation's own host overhead.


def _adapter_linear_kernel(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"adapter_linear: dropout_p={dropout_p} must lie in [0, 1)")
    if dropout_p > 0.0 and x.is_cuda and torch.cuda.is_current_stream_capturing():
        # the seed is a host value: a captured graph would replay one dropout mask at every step
        raise RuntimeError(
            "adapter_linear: dropout under CUDA graph capture is not supported (the dropout seed is drawn on "
            "the host, so every replay would reuse one mask); capture with lora_dropout=0 or run eagerly"
        )
    if seed is None:
        # torch's default CPU generator: torch.manual_seed reproduces it; no device sync
        seed_t = torch.randint(0, 2**62, (1,)) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    else:
        seed_t = seed.detach().to("cpu", torch.int64).clone().view(1)
    fwd, _ = _impl(x.device, lora_A.shape[0], lora_A.dtype)
    with no_autocast(x.device):
        seed = seed_t.item() if dropout_p > 0.0 else 0
        out, t = fwd(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed)
    return out, t, seed_t


def _adapter_linear_backward_kernel(
    grad_out, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora
):
    """(dx [N, k], dA, dE, dB): a gradient not asked for comes back as an empty tensor of its own."""
    _, bwd = _impl(x.device, lora_A.shape[0], lora_A.dtype)
    g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # a .sum() gradient has stride 0
    with no_autocast(x.device):
        seed = seed.item() if dropout_p > 0.0 else 0
        grads = bwd(g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed,
                    need_x, need_lora)
    return tuple(v if v is not None else like.new_empty(0) for v, like in zip(grads, (x, lora_A, lora_E, lora_B)))


def _adapter_linear_fake(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    d = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    out = x.new_empty((x.shape[0], d))
    t = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)
    return out, t, torch.empty(1, dtype=torch.int64, device="cpu")


def _adapter_linear_backward_fake(
    grad_out, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora
):
    return (  # one empty tensor per gradient not asked for: outputs never alias each other
        x.new_empty(x.shape if need_x else 0),
        lora_A.new_empty(lora_A.shape if need_lora else 0),
        lora_E.new_empty(lora_E.shape if need_lora else 0),
        lora_B.new_empty(lora_B.shape if need_lora else 0),
    )


adapter_linear_op = define_op(
    "adapter_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_E, Tensor lora_B, "
    "float scaling, Tensor ranknum, float dropout_p, bool fan_in_fan_out, Tensor? seed) -> (Tensor, Tensor, Tensor)",
    _adapter_linear_kernel, _adapter_linear_fake, tags=(torch.Tag.nondeterministic_seeded,),
)  # fmt: skip
adapter_linear_backward_op = define_op(
    "adapter_linear_backward(Tensor grad_out, Tensor x, Tensor t, Tensor weight, Tensor lora_A, Tensor lora_E, "
    "Tensor lora_B, float scaling, Tensor ranknum, float dropout_p, bool fan_in_fan_out, Tensor seed, bool need_x, "
    "bool need_lora) -> (Tensor, Tensor, Tensor, Tensor)",
    _adapter_linear_backward_kernel, _adapter_linear_backward_fake,
)  # fmt: skip


class _AdapterLinearAutograd(torch.autograd.Function):
    """The op's autograd: forward runs the op below the Autograd key; backward is the backward op
    (dx, dA, dE, dB in one call) plus dW / db by torch ops if someone unfroze the base layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
        with torch._C._AutoDispatchBelowAutograd():
            out, t, seed_t = adapter_linear_op(
                x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed
            )
        ctx.save_for_backward(x, t, weight, lora_A, lora_E, lora_B, ranknum, seed_t)
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(t, seed_t)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of t and the seed
        return out, t, seed_t

    @staticmethod
    def backward(ctx, grad_out, _grad_t, _grad_seed):
        if grad_out is None:  # the output took no part in the loss
            return (None,) * 11
        x, t, weight, lora_A, lora_E, lora_B, ranknum, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_lora = need[3] or need[4] or need[5]
        dx, dA, dE, dB = adapter_linear_backward_op(
            grad_out, x, t, weight, lora_A, lora_E, lora_B, ctx.scaling, ranknum, ctx.dropout_p, ctx.fan_in_fan_out,
            seed, need[0], need_lora,
        )  # fmt: skip
        dw = db = None
        if need[1]:  # the frozen W normally needs none; computed only if someone unfroze it
            gw = grad_out.t() @ x
            dw = gw.t() if ctx.fan_in_fan_out else gw
        if need[2] and ctx.has_bias:
            db = grad_out.sum(0)
        return (dx if need[0] else None, dw, db, dA if need[3] else None, dE if need[4] else None,
                dB if need[5] else None, None, None, None, None, None)  # fmt: skip


LIB.impl("adapter_linear", _AdapterLinearAutograd.apply, "Autograd")


# ---------------------------------------------------------------------------------- compiled, no dropout
def _plain_under_compile(x, lora_A, dropout_p) -> bool:
    """While torch.compile traces a CPU layer without dropout (adapters in x's dtype), the layer goes
    to the compiler as the torch implementation's plain ops, which inductor fuses and
    differentiates itself: the op's kernel would otherwise run from Python twice per layer per
    step, what kept the compiled step behind compiled PEFT LoRA. With dropout (the C++ hashed
    mask), on CUDA (Triton), and eagerly, the registered op runs. The math is the same (compiled
    equals eager, tests/test_compile.py). ADALORA_FAST_BACKEND, read here only while compiling, is
    read when the graph is traced: a forced implementation keeps the op."""
    return (
        torch.compiler.is_compiling()
        and dropout_p == 0.0
        and x.device.type == "cpu"
        and x.dtype == lora_A.dtype
        and not forced_impl()
    )


# ---------------------------------------------------------------------------------- the public call
def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum,
    dropout_p: float = 0.0,
    training: bool = True,
    fan_in_fan_out: bool = False,
    seed=None,
) -> torch.Tensor:
    """``x Wᵀ + b + ((dropout(x) Aᵀ) * E*scaling/(ranknum+1e-5)) Bᵀ`` with PEFT's dtype rules.

    x [..., k] (any leading shape); weight [d, k] ([k, d] if ``fan_in_fan_out``); bias [d] or
    None; lora_A [r, k]; lora_E [r, 1]; lora_B [d, r]; ranknum a [1] tensor or a number; seed an
    int or [1] int64 tensor (None: drawn inside the op). Dropout applies in training only.
    Returns [..., d] in the base layer's dtype (autocast's dtype under autocast). Under autocast
    everything runs in the autocast dtype; without it, the adapter term runs in lora_A's dtype.
    """
    p = float(dropout_p) if training else 0.0
    if not torch.is_tensor(ranknum):
        ranknum = torch.tensor([float(ranknum)], dtype=torch.float32, device=x.device)
    if seed is not None and not torch.is_tensor(seed):
        seed = torch.tensor([int(seed)], dtype=torch.int64)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dev = x.device.type

    def run(x2, weight, bias, lora_A, lora_E, lora_B):
        args = (x2, weight, bias, lora_A, lora_E, lora_B, float(scaling), ranknum.detach())
        if _plain_under_compile(x2, lora_A, p):
            return _forward_torch(*args, 0.0, bool(fan_in_fan_out), 0)[0]
        return adapter_linear_op(*args, p, bool(fan_in_fan_out), seed)[0]

    if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            out = run(*(v.to(cdt) if v is not None else None for v in (x2, weight, bias, lora_A, lora_E, lora_B)))
    else:
        out = run(x2, weight, bias, lora_A, lora_E, lora_B)
    return out.view(*lead, out.shape[-1])
