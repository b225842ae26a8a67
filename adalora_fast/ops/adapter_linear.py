"""The adapted layer: ``adalora_fast::adapter_linear`` and its backward, and the eager path beside them.

    out = x Wᵀ + b + ((dropout(x) Aᵀ) ⊙ e) Bᵀ,   e = E · scaling / (ranknum + RANKNUM_EPS)

One autograd node owns the whole layer (base matmul, bias, dropout, adapter), forward and backward,
so the adapter's dx is added in place into the base dx and nothing of size N×k but x is saved.

Schema (one argument order and one set of names at every level, the kernels' included)::

    adapter_linear(x [N, k], weight [d, k] ([k, d] if fan_in_fan_out), bias [d]?, lora_A [r, k],
                   lora_E [r, 1], lora_B [d, r], scaling, ranknum [1], dropout_p, fan_in_fan_out,
                   seed [1] int64?) -> (out [N, d] base dtype, t [N, r] fp32, seed [1] int64)
    adapter_linear_backward(grad_out, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum,
                   dropout_p, fan_in_fan_out, seed, need_x, need_lora) -> (dx, dA, dE, dB)

``t = dropout(x) Aᵀ`` and the seed are saved for backward. The seed is a [1] int64 tensor on x's
device: with ``seed=None`` and dropout on, it is drawn there with ``torch.randint`` from torch's
generator of that device, so ``torch.manual_seed`` makes dropout reproducible (eager, compiled and
under a CUDA graph alike: a captured draw is replayed by torch's graph-safe Philox state, a new seed
at every replay), with no host value, no CPU tensor and no host sync on the way.

Two ways in, one implementation:

* **eager** (the training step): :func:`adapter_linear` runs the implementation directly, not
  through the dispatcher (each dispatcher hop into a Python kernel costs host time of the order of
  a small layer's whole adapter work on a GPU), and gives the output its autograd node: the C++
  node of ``csrc/adapter_linear_node.cpp`` (:func:`_node_apply`, built on the first eager call,
  ``ops/autograd_node.py``), or where that is off or cannot be built the Python Function
  :class:`_AdapterLinearFn` (the same results, more host time);
* **the registered ops** whenever something must see them: ``torch.compile`` tracing, a
  ``TorchDispatchMode`` (FakeTensor, FlopCounter, the launch-counting tests), functorch
  transforms, tensor subclasses, meta tensors, and direct ``torch.ops.adalora_fast`` calls.

Implementations by device (picked once per layer configuration, :func:`_plan`; ``ADALORA_FAST_BACKEND``
forces one):

* CPU, "torch": torch ops; fp32 adapters with dropout use the C++ kernel ``dropout_shrink``
  (``csrc/adapter_linear_cpu.cpp``: the keep mask hashed from the seed, fused into the shrink, one
  pass over x each way), other dtypes a seeded ``bernoulli_`` (two more passes each way).
* CUDA, "triton": ``kernels/triton_ops/adapter_linear.py``: shrink with in-kernel Philox dropout,
  expand-add in place; backward one pass over g and one over x into one flat fp32 gradient buffer
  (ranks above 64 run the torch implementation: the same math). On CPU tensors it runs under
  Triton's interpreter when forced.
* "reference" (forced, tests only): ``reference.adapter_linear``, its gradients by autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import autograd_node, cpu_ext
from .layout import RANKNUM_EPS
from .registry import AUTOCAST_DEVICES, LIB, autograd_inside_op, define_op, forced_impl, impl_for, no_autocast

_SEED_HIGH = 2**62  # seeds are drawn in [0, 2**62)
_ka = None  # kernels/triton_ops/adapter_linear, imported on first use (it imports triton)


def _kernels():
    global _ka
    if _ka is None:
        from ..kernels import adapter_linear

        _ka = adapter_linear
    return _ka


# ---------------------------------------------------------------------------------- dropout seeds and masks
def _seed_for(seed, p: float, device: torch.device) -> Optional[torch.Tensor]:
    """The [1] int64 seed on ``device`` a call with dropout rate ``p`` uses (None at p = 0): drawn
    from torch's generator of ``device`` when not given (no host value), else the given int or
    tensor put there."""
    if p == 0.0:
        return None
    if seed is None:
        return torch.randint(_SEED_HIGH, (1,), device=device)
    if torch.is_tensor(seed):
        return seed.detach().reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def dropout_keep_mask(seed, shape, p: float, device, dtype=torch.float32, impl: Optional[str] = None) -> torch.Tensor:
    """The bool keep mask implementation ``impl`` (default: the one that runs on ``device``) draws for
    ``seed`` (an int or a [1] int64 tensor) on a 2-D input of ``shape`` [N, k] with adapters of
    ``dtype``: Triton's Philox stream, the C++ kernel's hash (fp32 CPU with the extension), or torch's
    seeded ``bernoulli_``."""
    device = torch.device(device)
    impl = impl or impl_for(device)
    if impl == "triton":
        return _kernels().dropout_keep_mask(seed, int(shape[0]), int(shape[1]), p, device)
    if cpu_ext.usable(device, dtype, p):
        return torch.ops.adalora_fast_cpu.dropout_keep_mask(int(shape[0]), int(shape[1]), int(seed), float(p))
    return _keep_float(shape, dtype, device, seed, p).bool()


def _keep_float(shape, dtype, device, seed, p: float) -> torch.Tensor:
    # The same seeded draw in forward and backward: same shape, dtype, device and generator state.
    if torch.device(device).type == "cuda" and len(shape) == 2:
        # on CUDA the torch implementation draws the Triton kernels' Philox mask from the seed tensor
        # (no host read of it): a layer whose forward ran one implementation and backward the other
        # (the deterministic switch flipped in between, see _plan) still sees one mask
        return _kernels().dropout_keep_mask(seed, int(shape[0]), int(shape[1]), p, device).to(dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)


def _scale(scaling, ranknum) -> torch.Tensor:
    """s = scaling/(ranknum+eps), a [1] tensor on ranknum's device (no host read of ranknum); the
    torch implementation's (the Triton kernels form it themselves from ranknum).

    Written as torch evaluates ``scaling / tensor`` (``Tensor.__rdiv__``: reciprocal, then multiply;
    bitwise the same) without that Python wrapper; in place on the fresh sum."""
    return (ranknum + RANKNUM_EPS).reciprocal_().mul_(scaling)


def _fold_e(lora_E, scaling, ranknum, dtype):
    """(s, e = E·s as an r-vector in ``dtype``): never an A*E tensor."""
    s = _scale(scaling, ranknum)
    return s, (lora_E.view(-1) * s).to(dtype)


# ---------------------------------------------------------------------------------- torch (CPU)
# Each implementation: forward(x, weight, bias, A, E, B, scaling, ranknum, p, fifo, seed) -> (out, t, plan) and
# backward(g, x, t, weight, A, E, B, scaling, ranknum, p, fifo, seed, need_x, need_lora, plan=None) -> (dx, grads),
# plan what the forward hands its backward on the eager path (Triton: the layer's launch plan; else None),
# grads a flat gradient buffer [dA | dB | dE] (Triton on the eager path: one memset, one cast), a tuple
# (dA, dE, dB) of tensors of their own (torch, reference, and Triton for the registered op, whose outputs
# may not alias), or None without need_lora; ``seed`` the [1] int64 seed tensor (None at p = 0).
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
        t = torch.ops.adalora_fast_cpu.dropout_shrink(_kernel_x(x, lora_A), _f32(lora_A), int(seed), dropout_p)
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
    return out, t.float(), None


def _backward_torch(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora, plan=None
):  # fmt: skip
    s, e = _fold_e(lora_E, scaling, ranknum, lora_A.dtype)
    t = t.to(lora_A.dtype)
    w = weight.t() if fan_in_fan_out else weight  # [d, k]
    ga = g if g.dtype == lora_A.dtype else g.to(lora_A.dtype)
    gB = ga @ lora_B  # [N, r]
    dB = dE = dA = None
    if need_lora:
        # as (teᵀ g)ᵀ, not gᵀ te: BLAS runs [r, N] @ [N, d] faster than [d, N] @ [N, r], several times at
        # small r (bench/cpu_matmul_ab.py); the [r, d] result is small to copy out
        dB = ((t * e).t() @ ga).t().contiguous()
        dE = ((gB * t).sum(0) * s).view_as(lora_E).to(lora_E.dtype)
    ge = gB * e
    dx = g @ w if need_x else None  # [N, k], base dtype
    if cpu_ext.usable(x.device, lora_A.dtype, dropout_p):
        xk = _kernel_x(x, lora_A)
        # the kernel adds into dx in fp32 and rounds once to dx's dtype (fp32 or x's)
        in_place = dx is not None and dx.dtype in (torch.float32, xk.dtype) and dx.is_contiguous()
        lora_dx = dx if in_place else (torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None)
        dA = torch.ops.adalora_fast_cpu.dropout_shrink_backward(
            xk, _f32(lora_A), _f32(ge), lora_dx, int(seed), dropout_p, bool(need_lora)
        ).to(lora_A.dtype)
        if need_x and not in_place:
            dx += lora_dx
        return dx, ((dA, dE, dB) if need_lora else None)
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
    return dx, ((dA, dE, dB) if need_lora else None)


# ---------------------------------------------------------------------------------- triton (CUDA)
def _forward_triton(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    ka = _ka  # loaded by _plan's checks
    out = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)  # contiguous [N, d], base dtype
    (n, k), r = x.shape, lora_A.shape[0]
    if r == 0 or n == 0:
        return out, out.new_zeros((n, r), dtype=torch.float32), None
    lp = ka.layer_plan(n, k, out.shape[1], r, lora_A.dtype, x.dtype, dropout_p, x.device)
    t = ka.forward(
        x, lora_A.contiguous(), lora_E.contiguous(), lora_B.contiguous(), ranknum, scaling, dropout_p, seed, out, lp
    )
    return out, t, lp


def _backward_triton(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora, plan=None
):  # fmt: skip
    ka = _ka
    dx = g @ (weight.t() if fan_in_fan_out else weight) if need_x else None  # base term (cuBLAS), [N, k] contiguous
    if plan is None:  # the forward's plan is None at r = 0 or N = 0 (and for a backward whose forward ran torch)
        (n, k), r, d = x.shape, lora_A.shape[0], lora_B.shape[0]
        if r == 0 or n == 0:
            size = ka.grad_offsets(r, k, d)[2]
            return dx, (torch.zeros(size, dtype=lora_A.dtype, device=x.device) if need_lora else None)
    # one fp32 accumulator for dA, dB and dE (one memset), zeroed for the atomics
    dlora = ka.backward(
        g, x, t, lora_A.contiguous(), lora_E.contiguous(), lora_B.contiguous(), ranknum, scaling, dropout_p, seed, dx,
        lp=plan,
    )  # fmt: skip
    return dx, (dlora if need_lora else None)  # fp32: the eager node casts it once to the parameters' dtype


def _backward_triton_op(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora, plan=None
):  # fmt: skip
    """The registered backward op's Triton implementation: dA, dE, dB in buffers of their own."""
    ka = _kernels()
    w = weight.t() if fan_in_fan_out else weight  # [d, k]
    n = x.shape[0]
    r = lora_A.shape[0]
    dx = g @ w if need_x else None
    if r == 0 or n == 0:
        return dx, (
            (torch.zeros_like(lora_A), torch.zeros_like(lora_E), torch.zeros_like(lora_B)) if need_lora else None
        )
    dA, dB, dE = ka.backward(
        g,
        x,
        t,
        lora_A.contiguous(),
        lora_E.contiguous(),
        lora_B.contiguous(),
        ranknum,
        scaling,
        dropout_p,
        seed,
        dx,
        separate=True,
    )
    if not need_lora:
        return dx, None
    return dx, (dA.to(lora_A.dtype), dE.view(r, 1).to(lora_E.dtype), dB.to(lora_B.dtype))


# ---------------------------------------------------------------------------------- reference (forced)
def _forward_reference(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    from .. import reference as ref

    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device, lora_A.dtype, impl="torch") if dropout_p else None
    out = ref.adapter_linear(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, keep)
    xa = x.to(lora_A.dtype)
    if keep is not None:
        xa = xa * keep.to(xa.dtype) / (1.0 - dropout_p)
    return out, (xa @ lora_A.t()).float(), None


def _backward_reference(
    g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora, plan=None
):  # fmt: skip
    from .. import reference as ref

    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device, lora_A.dtype, impl="torch") if dropout_p else None
    leaves = [v.detach().requires_grad_() for v in (x, lora_A, lora_E, lora_B)]
    with autograd_inside_op(), torch.enable_grad():
        out = ref.adapter_linear(
            leaves[0], weight, None, *leaves[1:], scaling, ranknum, dropout_p, fan_in_fan_out, keep
        )
        dx, dA, dE, dB = torch.autograd.grad(out, leaves, g)
    return (dx if need_x else None), ((dA, dE, dB) if need_lora else None)


_IMPLS = {  # (forward, eager backward, the registered backward op's)
    "torch": (_forward_torch, _backward_torch, _backward_torch),
    "triton": (_forward_triton, _backward_triton, _backward_triton_op),
    "reference": (_forward_reference, _backward_reference, _backward_reference),
}


# ---------------------------------------------------------------------------------- which implementation
_PLANS: dict = {}


def _pick(device: torch.device, rank: int, dtype: torch.dtype, x_dtype: torch.dtype, forced: str) -> str:
    name = impl_for(device)
    if name == "triton":
        from ..kernels import _launch

        if rank > _launch.RANK_PADS[-1]:
            if device.type == "cuda" and not forced:
                name = "torch"  # the kernels are built for r <= 64; the same math in torch ops
            else:
                _launch.pad_rank(rank)  # raises: a forced triton never falls back
        elif device.type == "cuda" and not forced and torch.are_deterministic_algorithms_enabled():
            # the Triton backward sums dA/dB/dE with fp32 atomics: under torch.use_deterministic_algorithms
            # the same math runs in torch ops (the same Philox dropout mask, see _keep_float); a forced
            # triton raises in the backward instead (kernels/triton_ops/_launch.check_deterministic)
            name = "torch"
        elif (
            device.type == "cuda"
            and not forced
            and _launch.dot_precision(dtype) == "ieee"
            and not (
                _kernels().layer_precision(x_dtype, dtype, rank) == "bf16x3"
                and torch.cuda.get_device_capability(device) >= (8, 0)
            )
        ):
            # fp32 adapters under torch's full-fp32 default (no TF32): on a bf16 or fp16 base the kernels
            # run with fp32-class "bf16x3" products (kernels/triton_ops/adapter_linear._dot; bf16 tensor
            # cores: sm_80 and later); any other such layer (an fp32 base, or an older GPU) runs cuBLAS
            # SGEMM in the torch implementation (the same Philox dropout mask): the kernels' FMA dots
            # spill at these tiles. With TF32 allowed, or half adapters, Triton runs.
            name = "torch"
    return name


def _check_triton(x, weight, lora_A, lora_E, lora_B) -> None:
    _kernels().check_dtypes(x.dtype, lora_A.dtype)
    if weight.dtype != x.dtype:
        raise TypeError(f"adapter_linear (triton): x ({x.dtype}) and weight ({weight.dtype}) must share the base dtype")
    if not (lora_A.dtype == lora_E.dtype == lora_B.dtype):
        raise TypeError(
            f"adapter_linear (triton): lora_A/E/B dtypes differ ({lora_A.dtype}, {lora_E.dtype}, {lora_B.dtype})"
        )


def _plan(x, weight, lora_A, lora_E, lora_B, ranknum) -> tuple:
    """(name, forward, eager backward, the backward op's) of the implementation a call runs, checked
    and cached once per layer configuration: devices, dtypes, rank, the forced backend, the
    deterministic switch and the fp32 matmul precision (the things the choice depends on)."""
    forced = forced_impl()
    key = (
        x.device,
        x.dtype,
        weight.dtype,
        lora_A.dtype,
        lora_E.dtype,
        lora_B.dtype,
        lora_A.shape[0],
        forced,
        # torch.are_deterministic_algorithms_enabled() and torch.get_float32_matmul_precision() without
        # their Python frames (this key is built on every layer call)
        torch._C._get_deterministic_algorithms(),
        torch._C._get_float32_matmul_precision(),
        lora_A.device,
        lora_E.device,
        lora_B.device,
        ranknum.device,
    )
    plan = _PLANS.get(key)
    if plan is None:
        devs = {str(v.device) for v in (x, weight, lora_A, lora_E, lora_B, ranknum)}
        if len(devs) != 1:  # the kernels' launches trust this check (kernels/triton_ops/_launch.launch)
            raise ValueError(
                f"adapter_linear: x, weight, lora_A/E/B and ranknum must be on one device, got {sorted(devs)}"
            )
        name = _pick(x.device, lora_A.shape[0], lora_A.dtype, x.dtype, forced)
        if name == "triton":
            _check_triton(x, weight, lora_A, lora_E, lora_B)
        plan = (name, *_IMPLS[name])
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _backward_plan(plan: tuple, device: torch.device) -> tuple:
    """The forward's implementation, unless the deterministic switch was turned on since (the torch
    implementation then computes the backward: the same math and the same dropout mask)."""
    if (
        plan[0] == "triton"
        and device.type == "cuda"
        and torch.are_deterministic_algorithms_enabled()
        and not forced_impl()
    ):
        return ("torch", *_IMPLS["torch"])
    return plan


def _swap_if_deterministic(plan: tuple, aux) -> tuple:
    """(plan, aux) a CUDA backward runs once ``torch.use_deterministic_algorithms`` is on (the eager
    node, C++ or Python, calls this only then): :func:`_backward_plan`'s choice, with the forward's
    launch plan dropped when the implementation changed."""
    swapped = _backward_plan(plan, torch.device("cuda"))
    return (plan, aux) if swapped is plan else (swapped, None)


def _split(grads, lora_A, lora_E, lora_B) -> tuple:
    """(dA, dE, dB) from an implementation's gradients: contiguous views of a flat [dA | dB | dE]
    buffer (no copy; ``as_strided`` costs a third of ``split`` + ``view`` on the host), or the tuple
    as it is. Autograd keeps such views as the parameters' ``.grad`` (their strides match)."""
    if not isinstance(grads, torch.Tensor):
        return grads
    (r, k), d, o = lora_A.shape, lora_B.shape[0], grads.storage_offset()
    return (
        grads.as_strided((r, k), (k, 1), o),
        grads.as_strided((r, 1), (1, 1), o + r * k + d * r),
        grads.as_strided((d, r), (r, 1), o + r * k),
    )


def _base_grads(grad_out, x, weight, need, fan_in_fan_out, has_bias) -> tuple:
    """dW / db by torch ops, if someone unfroze the base layer (the frozen W normally needs none)."""
    dw = db = None
    if need[1]:
        gw = grad_out.t() @ x
        dw = gw.t() if fan_in_fan_out else gw
    if need[2] and has_bias:
        db = grad_out.sum(0)
    return dw, db


# ---------------------------------------------------------------------------------- eager: the autograd Function
def _eager_forward(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, cast):
    """The eager layer's forward, run with grad mode off by its autograd node (C++ or Python):
    autocast's casts (``cast``: its dtype, or None), the implementation's plan, the seed, the
    implementation's forward. Returns (x, weight, bias, A, E, B as computed with, out, t, seed,
    plan, what the forward hands its backward)."""
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
        lora_A, lora_E, lora_B = lora_A.to(cast), lora_E.to(cast), lora_B.to(cast)
    plan = _plan(x, weight, lora_A, lora_E, lora_B, ranknum)
    if dropout_p and seed is None:  # the training step's case, without _seed_for's call
        # randint(high) draws what randint(0, high) draws, with one argument less to parse
        seed_t = torch.randint(_SEED_HIGH, (1,), device=x.device)
    else:
        seed_t = _seed_for(seed, dropout_p, x.device)
    out, t, aux = plan[1](x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed_t)
    return x, weight, bias, lora_A, lora_E, lora_B, out, t, seed_t, plan, aux


class _AdapterLinearFn(torch.autograd.Function):
    """The eager path where the C++ node (:func:`_node_apply`) is off or cannot be built: the
    implementation called directly (no dispatcher hop), the plan picked once in forward and kept for
    backward. Saved: x, t, A, E, B and the seed through ``save_for_backward`` (so
    saved-tensor hooks see x and autograd checks that the adapters were not changed in place); the
    frozen weight and ranknum as attributes.

    ``cast`` (autocast's dtype, or None): x, the weight, the bias and the adapters are cast to it
    here, outside autograd, and the layer computes in it, as the public wrapper's casts would have it;
    the gradients come back in the inputs' dtypes from this one node (the engine casts dx, dW, db
    and torch's adapter gradients; the Triton path's fp32 gradient buffer is handed out as it is,
    unrounded), with no cast node per input."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, cast=None
    ):
        grad_dtype = lora_A.dtype
        x, weight, bias, lora_A, lora_E, lora_B, out, t, seed_t, plan, aux = _eager_forward(
            x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, cast
        )
        ctx.save_for_backward(x, t, lora_A, lora_E, lora_B, seed_t)
        # one attribute
        ctx.state = (plan, aux, weight, ranknum, scaling, dropout_p, fan_in_fan_out, bias is not None, grad_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, t, lora_A, lora_E, lora_B, seed = ctx.saved_tensors
        plan, aux, weight, ranknum, scaling, dropout_p, fan_in_fan_out, has_bias, grad_dtype = ctx.state
        need = ctx.needs_input_grad
        need_lora = need[3] or need[4] or need[5]
        g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # a .sum() gradient has stride 0
        if x.is_cuda and torch._C._get_deterministic_algorithms():
            plan, aux = _swap_if_deterministic(plan, aux)
        args = (g, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need[0],
                need_lora, aux)  # fmt: skip
        if torch.is_autocast_enabled(x.device.type):  # a backward run inside an autocast region
            with no_autocast(x.device):
                dx, grads = plan[2](*args)
        else:
            dx, grads = plan[2](*args)
        if type(grads) is torch.Tensor and grads.dtype != grad_dtype:
            grads = grads.to(grad_dtype)  # the Triton path's flat fp32 buffer, for half adapters
        dA, dE, dB = _split(grads, lora_A, lora_E, lora_B) if need_lora else (None, None, None)
        dw, db = (
            _base_grads(grad_out, x, weight, need, fan_in_fan_out, has_bias) if need[1] or need[2] else (None, None)
        )
        return (dx if need[0] else None, dw, db, dA if need[3] else None, dE if need[4] else None,
                dB if need[5] else None, None, None, None, None, None, None)  # fmt: skip


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Function.apply's Python wrapper only unwraps dead functorch wrappers (tensors that escaped a
# transform) before the C++ apply: on the eager path (no functorch, plain tensors, see _eager) the
# C++ apply is called directly, a few microseconds less per layer step
_fn_apply = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
_function_apply = _fn_apply.__get__(None, _AdapterLinearFn) if _fn_apply is not None else _AdapterLinearFn.apply


# ---------------------------------------------------------------------------------- eager: the C++ autograd node
_attach = None  # adalora_fast_node.attach once built (autograd_node.attach_fn)
_is_grad_enabled, _set_grad_enabled = torch._C.is_grad_enabled, torch._C._set_grad_enabled
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_forward_ad = torch.autograd.forward_ad


def _node_apply(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, cast=None):
    """The eager layer with its autograd node in C++ (``csrc/adapter_linear_node.cpp``): the forward
    runs here with grad mode off, then ``attach`` makes the node (the same inputs, saved tensors and
    backward as :class:`_AdapterLinearFn`'s, a fraction of its host time). Under forward-mode AD the
    Python Function runs, which says it has no forward derivative."""
    if _forward_ad._current_level >= 0:
        return _function_apply(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, cast)  # fmt: skip
    prev = _is_grad_enabled()
    _set_grad_enabled(False)
    try:
        xc, wc, _, ac, ec, bc, out, t, seed_t, plan, aux = _eager_forward(
            x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, cast
        )
    finally:
        _set_grad_enabled(prev)
    return _attach(
        out, x, weight, bias, lora_A, lora_E, lora_B, xc, t, ac, ec, bc, seed_t, wc, ranknum, scaling, dropout_p,
        fan_in_fan_out, plan, aux, lora_A.dtype, _swap_if_deterministic,
    )  # fmt: skip


def _first_apply(*args):
    """``_apply`` until the first eager call, which picks it for the process: the C++ node (built
    now, once) or, when it is off or cannot be built, the Python Function."""
    global _apply, _attach
    attach = autograd_node.attach_fn()
    if attach is not None:
        _attach, _apply = attach, _node_apply
    else:
        _apply = _function_apply
    return _apply(*args)


_apply = _first_apply  # the eager entry: _node_apply or _function_apply once picked


def _eager(x, weight, lora_A, lora_E, lora_B) -> bool:
    """Whether a call may take the eager path: nothing traces it or intercepts dispatch (compile,
    jit tracing, a dispatch mode, functorch), plain tensors on the CPU or a GPU."""
    return (
        not torch.compiler.is_compiling()
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and type(lora_A) in _PLAIN
        and type(lora_E) in _PLAIN
        and type(lora_B) in _PLAIN
        and (x.is_cuda or x.is_cpu)
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._get_tracing_state()
    )


# ---------------------------------------------------------------------------------- the operators
# Registered through registry.define_op (torch.library.Library: schema, one kernel for CPU and CUDA,
# a fake) plus an Autograd kernel, not through torch.library.custom_op: custom_op's Python shims
# cost several times the torch implementation's own host overhead on a small layer.


def _adapter_linear_kernel(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"adapter_linear: dropout_p={dropout_p} must lie in [0, 1)")
    plan = _plan(x, weight, lora_A, lora_E, lora_B, ranknum)
    seed_t = _seed_for(seed, dropout_p, x.device)
    if seed_t is None:
        seed_t = torch.zeros(1, dtype=torch.int64, device=x.device)
    elif seed is not None and seed_t.data_ptr() == seed.data_ptr():
        seed_t = seed_t.clone()  # an op's output may not alias its input
    with no_autocast(x.device):
        out, t, _ = plan[1](
            x,
            weight,
            bias,
            lora_A,
            lora_E,
            lora_B,
            scaling,
            ranknum,
            dropout_p,
            fan_in_fan_out,
            seed_t if dropout_p > 0.0 else None,
        )
    return out, t, seed_t


def _adapter_linear_backward_kernel(
    grad_out, x, t, weight, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed, need_x, need_lora
):
    """(dx [N, k], dA, dE, dB); a gradient not asked for comes back as an empty tensor of its own."""
    plan = _backward_plan(_plan(x, weight, lora_A, lora_E, lora_B, ranknum), x.device)
    g = grad_out if grad_out.is_contiguous() else grad_out.contiguous()  # a .sum() gradient has stride 0
    with no_autocast(x.device):
        dx, grads = plan[3](
            g,
            x,
            t,
            weight,
            lora_A,
            lora_E,
            lora_B,
            scaling,
            ranknum,
            dropout_p,
            fan_in_fan_out,
            seed if dropout_p > 0.0 else None,
            need_x,
            need_lora,
        )
    grads = grads if grads is not None else (None, None, None)
    return tuple(
        v if v is not None else like.new_empty(0) for v, like in zip((dx, *grads), (x, lora_A, lora_E, lora_B))
    )


def _adapter_linear_fake(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, dropout_p, fan_in_fan_out, seed):
    d = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    out = x.new_empty((x.shape[0], d))
    t = x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)
    return out, t, x.new_empty(1, dtype=torch.int64)


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
    """The registered op's autograd: forward runs the op below the Autograd key; backward is the
    backward op (dx, dA, dE, dB in one call) plus dW / db by torch ops if someone unfroze the base
    layer."""

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
        dw, db = _base_grads(grad_out, x, weight, need, ctx.fan_in_fan_out, ctx.has_bias)
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
def _run(x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, p, fan_in_fan_out, seed):
    if _eager(x2, weight, lora_A, lora_E, lora_B):
        return _apply(x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, p, fan_in_fan_out, seed)
    args = (x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum.detach())
    if _plain_under_compile(x2, lora_A, p):
        return _forward_torch(*args, 0.0, fan_in_fan_out, None)[0]
    if seed is not None and not torch.is_tensor(seed):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=x2.device)
    return adapter_linear_op(*args, p, fan_in_fan_out, seed)[0]


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
    None; lora_A [r, k]; lora_E [r, 1]; lora_B [d, r]; ranknum a [1] tensor on x's device (or a
    number); seed an int or [1] int64 tensor (None: drawn on x's device from torch's generator).
    Dropout applies in training only. Returns [..., d] in the base layer's dtype (autocast's dtype
    under autocast). Under autocast everything runs in the autocast dtype; without it, the adapter
    term runs in lora_A's dtype. Eagerly, autocast's casts of x, the weight and the adapters happen
    inside the layer's one autograd node, so the gradients come back in the inputs' dtypes with no
    cast node per input; on the Triton path the fp32 adapter gradients are then the kernels' fp32
    sums, not rounded to the autocast dtype first (PEFT's, and the torch path's, are).
    """
    p = float(dropout_p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise ValueError(f"adapter_linear: dropout_p={dropout_p} must lie in [0, 1)")
    if not isinstance(ranknum, torch.Tensor):
        ranknum = torch.tensor([float(ranknum)], dtype=torch.float32, device=x.device)
    scaling, fan_in_fan_out = float(scaling), bool(fan_in_fan_out)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    # no autocast anywhere (one C call) before asking about x's device (a device object and a string)
    dev = x.device.type if _any_autocast() else None
    if not (dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)):
        if _eager(x2, weight, lora_A, lora_E, lora_B):  # the training step: _run's first branch, one call less
            out = _apply(x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, p, fan_in_fan_out, seed)
        else:
            out = _run(x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, p, fan_in_fan_out, seed)
    else:
        cdt = torch.get_autocast_dtype(dev)
        # autocast off while the layer runs on what it was cast to: only the switch (what
        # torch.autocast(enabled=False) does besides its bookkeeping, a few microseconds per call)
        torch.set_autocast_enabled(dev, False)
        try:
            if _eager(x2, weight, lora_A, lora_E, lora_B):  # the casts inside the one node
                out = _apply(x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, p, fan_in_fan_out, seed, cdt)
            else:
                args = [v.to(cdt) if v is not None else None for v in (x2, weight, bias, lora_A, lora_E, lora_B)]
                out = _run(*args, scaling, ranknum, p, fan_in_fan_out, seed)
        finally:
            torch.set_autocast_enabled(dev, True)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])
