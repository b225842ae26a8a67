"""The Triton backend: the default on CUDA tensors; under ``TRITON_INTERPRET=1`` it also runs on CPU
tensors (Triton's interpreter, how CI checks it). Same functions and semantics as
``torch_backend.py``; every kernel lives in ``adalora_fast/kernels`` (``kernels/`` in the repo).

* ``adapter_linear``: one autograd Function owns the whole adapted layer. Forward: cuBLAS for
  ``x Wᵀ + b``, then 2 Triton launches (shrink with in-kernel Philox dropout, expand-add in place).
  Backward: cuBLAS for ``g W``, a memset of one fp32 accumulator, 2 Triton launches (one pass over
  g, one over x adding the adapter's dx in place), + 1 cast when the adapter dtype is half.
  Saved for backward: x, t = dropout(x) Aᵀ [N, r] fp32, W, A, E, B, ranknum and the seed.
* ``importance_update`` / ``triplet_scores``: 1 Triton launch over every adapter tensor of every
  layer (pointer tables), + 1 memset of the [Σr] score vector.
* ``apply_mask``: 1 Triton launch over every ``lora_E``.
* ``orth_penalty``: 1 Triton launch forward (+ 1 memset of the scalar), 1 launch backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..kernels import _launch as _kl  # noqa: F401  (re-exported for tests that count launches)
from ..kernels import adapter as _ka
from ..kernels import importance as _ki
from ..kernels import orth as _ko
from ..reference import keep_mask_to_budget  # noqa: F401  (a torch.sort of sum(r) scores: one sort on the GPU)
from .layout import FlatLayout, grads_of


def dropout_keep_mask(seed: int, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The bool keep mask the kernels draw for ``seed`` over a tensor of ``shape`` (last dim = k).

    ``dtype`` is accepted for signature parity with the torch backend; the mask does not depend on it.
    """
    shape = tuple(int(s) for s in shape)
    k = shape[-1] if shape else 1
    n = 1
    for s in shape[:-1]:
        n *= s
    return _ka.keep_mask(seed, n, k, p, device).view(shape)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class _AdapterLinear(torch.autograd.Function):
    """out = x Wᵀ + b + ((dropout(x) Aᵀ) ⊙ e) Bᵀ, e = E·scaling/(ranknum+1e-5), for 2-D x [N, k]."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, E, B, ranknum, scaling, p, seed, fan_in_fan_out):
        w = weight.t() if fan_in_fan_out else weight  # [d, k]
        out = F.linear(x, w, bias)  # contiguous [N, d], base dtype
        n, k = x.shape
        r = A.shape[0]
        t = None
        if r > 0 and n > 0:
            t = _ka.shrink(x, A, p, seed)
            _ka.expand_add(out, t, E, ranknum, scaling, B)
        ctx.save_for_backward(x, t, weight, A, E, B, ranknum)
        ctx.p, ctx.seed, ctx.fifo, ctx.scaling = p, seed, fan_in_fan_out, scaling
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, t, weight, A, E, B, ranknum = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_E, need_B = ctx.needs_input_grad[:6]
        w = weight.t() if ctx.fifo else weight  # [d, k]
        n, k = x.shape
        r, d = A.shape[0], B.shape[0]
        dx = dw = db = dA = dE = dB = None
        if need_x:
            dx = g @ w  # base term (cuBLAS), [N, k] contiguous
        if r > 0 and n > 0 and (need_x or need_A or need_E or need_B):
            acc = torch.zeros(r * k + d * r + r, dtype=torch.float32, device=x.device)
            dA32, dB32, dE32 = acc[: r * k].view(r, k), acc[r * k : r * k + d * r].view(d, r), acc[r * k + d * r :]
            ge = torch.empty((n, r), dtype=torch.float32, device=x.device)
            _ka.grad_rank(g, t, E, ranknum, ctx.scaling, B, ge, dB32, dE32)
            _ka.dA_dx(x, ge, A, dx, dA32, ctx.p, ctx.seed)
            if A.dtype != torch.float32:
                acc = acc.to(A.dtype)
                dA32, dB32, dE32 = acc[: r * k].view(r, k), acc[r * k : r * k + d * r].view(d, r), acc[r * k + d * r :]
            dA = dA32 if need_A else None
            dB = dB32 if need_B else None
            dE = dE32.view(r, 1).to(E.dtype) if need_E else None
        elif r == 0 or n == 0:
            dA = torch.zeros_like(A) if need_A else None
            dB = torch.zeros_like(B) if need_B else None
            dE = torch.zeros_like(E) if need_E else None
        if need_w:  # the frozen W normally needs none; computed only if someone unfroze it
            gw = g.t() @ x
            dw = gw.t() if ctx.fifo else gw
        if need_b and ctx.has_bias:
            db = g.sum(0)
        return dx, dw, db, dA, dE, dB, None, None, None, None, None


def adapter_linear(x, weight, bias, A, E, B, scaling, ranknum, dropout_p, seed, fan_in_fan_out):
    """See ``ops.adapter_linear``; x is 2-D [N, k] here (any strides), ranknum a [1] tensor."""
    _ka.check_dtypes(x.dtype, A.dtype)
    if weight.dtype != x.dtype:
        raise TypeError(f"triton backend: x ({x.dtype}) and weight ({weight.dtype}) must share the base dtype")
    if not (A.dtype == E.dtype == B.dtype):
        raise TypeError(f"triton backend: lora_A/E/B dtypes differ ({A.dtype}, {E.dtype}, {B.dtype})")
    if A.shape[0] > 0:
        _ka.pad_rank(A.shape[0])  # raises a clear error for r > 64
    p = float(dropout_p)
    if p > 0.0 and seed is None:
        raise ValueError("triton backend: dropout_p > 0 needs a seed")
    return _AdapterLinear.apply(
        x, weight, bias, _contig(A), _contig(E), _contig(B), ranknum.detach(), float(scaling), p, seed, fan_in_fan_out
    )


def importance_update(
    layout: FlatLayout,
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[Optional[torch.Tensor]]],
    m1: torch.Tensor,
    m2: torch.Tensor,
    beta1: float,
    beta2: float,
    want_scores: bool,
) -> Optional[torch.Tensor]:
    """Update m1, m2 in place for every adapter tensor in one launch; scores reduced in the same pass."""
    return _ki.importance_update(layout, params, grads_of(params, grads), m1, m2, float(beta1), float(beta2), bool(want_scores))


def triplet_scores(layout: FlatLayout, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """[sum(r)] triplet scores E + mean_row(A) + mean_col(B) of m1 ⊙ m2, one launch."""
    return _ki.triplet_scores(layout, m1, m2)


def apply_mask(E_params: Sequence[torch.Tensor], keep: torch.Tensor, ranks: Sequence[int]) -> None:
    """Zero every pruned ``lora_E`` entry in place, one launch per E dtype (normally one)."""
    _ki.apply_mask(E_params, keep, ranks)


def orth_penalty(layout: FlatLayout, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F over all matrices: 1 launch forward, 1 backward."""
    return _ko.orth_penalty(layout, params)
