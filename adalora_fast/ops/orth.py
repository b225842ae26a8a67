"""AdaLoRA's orthogonal regulariser as registered operators.

    adalora_fast::orth_penalty(Tensor[] lora_A, Tensor[] lora_B) -> (Tensor loss, Tensor gram, Tensor norms)
    adalora_fast::orth_penalty_backward(Tensor grad, Tensor[] lora_A, Tensor[] lora_B, Tensor gram,
                                        Tensor norms) -> Tensor[]

loss = mean over every A [r, k] and B [d, r] of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (not squared, PEFT's
form; r = 0 matrices count with a norm of 0), an fp32 scalar computed in fp32 whatever the
parameters' dtype and under autocast too. ``gram`` (every D = G − I, flat) and ``norms`` are saved
for the backward op; their layout is the implementation's own. The gradient of each matrix comes
back in its dtype.

Implementations by device (``ADALORA_FAST_BACKEND`` forces one):

* CPU, "torch": per (kind, shape) group one stack, one bmm and one norm forward; one bmm and one
  unbind backward (an autograd graph of the same ops would add ~10 nodes per group).
* CUDA, "triton": ``kernels/triton_ops/orth.py``, one launch forward, one backward (r <= 64; larger ranks run
  the torch implementation, the same math).
* "reference" (forced, tests only): ``reference.orth_penalty``, its gradient by autograd.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .registry import LIB, autograd_inside_op, define_op, forced_impl, impl_for, no_autocast

# ---------------------------------------------------------------------------------- torch (CPU)
_PLANS: dict = {}  # ids of the matrices -> their plan: a training step passes the same parameters every time


def _plan(lora_A, lora_B) -> list:
    """[(is_A, [positions in the A-then-B list])] per (kind, shape) group, in first-seen order
    (cached for the very tensors it was built for: a training step passes the same matrices every
    time, and at hundreds of layers their shape reads in Python outweigh the penalty's own work)."""
    return _cached(lora_A, lora_B)[0]


def _max_rank(lora_A, lora_B) -> int:
    return _cached(lora_A, lora_B)[2]


def _cached(lora_A, lora_B) -> tuple:
    """(plan, first shapes, largest rank) of these matrices, checked (:func:`_check`) when built."""
    key = (tuple(map(id, lora_A)), tuple(map(id, lora_B)))
    hit = _PLANS.get(key)
    if hit is not None and all(tuple(m.shape) == shape for m, shape in zip((lora_A[0], lora_B[0]), hit[1])):
        return hit
    _check(lora_A, lora_B)
    plan = _build_plan(lora_A, lora_B)
    if len(_PLANS) >= 8:
        _PLANS.pop(next(iter(_PLANS)))
    max_r = max([int(a.shape[0]) for a in lora_A] + [int(b.shape[1]) for b in lora_B])
    hit = _PLANS[key] = (plan, (tuple(lora_A[0].shape), tuple(lora_B[0].shape)), max_r)
    return hit


def _build_plan(lora_A, lora_B) -> list:
    # int(): adapter shapes are static; under dynamic-shape tracing this pins them (a SymInt is unhashable)
    groups: dict = {}
    for i, a in enumerate(lora_A):
        groups.setdefault((True, tuple(int(v) for v in a.shape)), []).append(i)
    n_A = len(lora_A)
    for i, b in enumerate(lora_B):
        groups.setdefault((False, tuple(int(v) for v in b.shape)), []).append(n_A + i)
    return [(is_A, idx) for (is_A, _), idx in groups.items()]


def _forward_torch(lora_A, lora_B):
    mats = [m.detach().float() for m in list(lora_A) + list(lora_B)]
    total = torch.zeros((), dtype=torch.float32, device=mats[0].device)
    grams, norms = [], []
    for is_A, idx in _plan(lora_A, lora_B):
        S = torch.stack([mats[i] for i in idx])  # [L, r, k] (A) or [L, d, r] (B)
        D = S @ S.mT if is_A else S.mT @ S  # [L, r, r]
        D.diagonal(dim1=1, dim2=2).sub_(1.0)
        nrm = torch.linalg.matrix_norm(D)  # [L]
        total = total + nrm.sum()
        grams.append(D.reshape(-1))
        norms.append(nrm)
    return total / len(mats), torch.cat(grams), torch.cat(norms)


def _flat_order(lora_A, lora_B) -> list:
    """Positions (A then B) in the order their gradients follow each other in the backward op's
    flat output: group by group, so each group's gradient is one [L, r, c] block."""
    return [i for _, idx in _plan(lora_A, lora_B) for i in idx]


def _backward_torch(grad, lora_A, lora_B, gram, norms):
    mats = list(lora_A) + list(lora_B)
    n = len(mats)
    flat = torch.empty(sum(m.numel() for m in mats), dtype=torch.float32, device=grad.device)
    g_off = n_off = f_off = 0
    for is_A, idx in _plan(lora_A, lora_B):
        shape = mats[idx[0]].shape
        r = shape[0] if is_A else shape[1]
        L = len(idx)
        D = gram[g_off : g_off + L * r * r].view(L, r, r)
        nrm = norms[n_off : n_off + L]
        g_off += L * r * r
        n_off += L
        S = torch.stack([mats[i].detach().float() for i in idx])
        # d||D||/dD = D/||D|| (0 where ||D|| = 0, as torch.norm); D symmetric: dS = 2 c D S or 2 c S D
        coef = torch.where(nrm > 0, (2.0 / n) * grad / nrm.clamp_min(1e-30), torch.zeros_like(nrm))
        Dc = D * coef[:, None, None]
        out = flat[f_off : f_off + S.numel()].view(S.shape)
        torch.bmm(Dc, S, out=out) if is_A else torch.bmm(S, Dc, out=out)
        f_off += S.numel()
    return flat


# ---------------------------------------------------------------------------------- triton (CUDA)
def _forward_triton(lora_A, lora_B):
    from ..kernels import orth as _ko

    return _ko.forward(lora_A, lora_B)


def _backward_triton(grad, lora_A, lora_B, gram, norms):
    from ..kernels import orth as _ko

    return _ko.backward(grad, lora_A, lora_B, gram, norms, _flat_order(lora_A, lora_B))


# ---------------------------------------------------------------------------------- reference (forced)
def _forward_reference(lora_A, lora_B):
    from .. import reference as ref

    loss = ref.orth_penalty([a.detach().float() for a in lora_A], [b.detach().float() for b in lora_B])
    dev = loss.device
    return loss.float(), torch.zeros(0, device=dev), torch.zeros(0, device=dev)


def _backward_reference(grad, lora_A, lora_B, gram, norms):
    from .. import reference as ref

    mats = list(lora_A) + list(lora_B)
    leaves = [m.detach().float().requires_grad_() for m in mats]
    with autograd_inside_op(), torch.enable_grad():
        loss = ref.orth_penalty(leaves[: len(lora_A)], leaves[len(lora_A) :])
        grads = torch.autograd.grad(loss, leaves, grad, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    order = _flat_order(lora_A, lora_B)
    return torch.cat([grads[i].reshape(-1) for i in order]) if order else grad.new_zeros(0)


_IMPLS = {
    "torch": (_forward_torch, _backward_torch),
    "triton": (_forward_triton, _backward_triton),
    "reference": (_forward_reference, _backward_reference),
}


def _impl(lora_A, lora_B):
    dev = (list(lora_A) + list(lora_B))[0].device
    name = impl_for(dev)
    if name == "triton" and dev.type == "cuda" and not forced_impl():
        from ..kernels import orth as _ko

        if _max_rank(lora_A, lora_B) > _ko.MAX_RANK:
            name = "torch"  # the kernels are built for r <= 64; the same math in torch ops
    return _IMPLS[name]


# ---------------------------------------------------------------------------------- the operators
def _check(lora_A, lora_B):
    if len(lora_A) != len(lora_B):
        raise ValueError(f"orth_penalty: {len(lora_A)} lora_A but {len(lora_B)} lora_B")
    for a, b in zip(lora_A, lora_B):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"orth_penalty: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, k] and [d, r]"
            )


def _orth_penalty_kernel(lora_A, lora_B):
    _cached(lora_A, lora_B)  # checks the matrices the first time these are passed
    fwd, _ = _impl(lora_A, lora_B)
    with no_autocast(lora_A[0].device):
        return fwd(lora_A, lora_B)


def _orth_penalty_fake(lora_A, lora_B):
    ranks = [a.shape[0] for a in lora_A] + [b.shape[1] for b in lora_B]
    dev = lora_A[0].device
    return (torch.empty((), dtype=torch.float32, device=dev),
            torch.empty(sum(r * r for r in ranks), dtype=torch.float32, device=dev),
            torch.empty(len(ranks), dtype=torch.float32, device=dev))  # fmt: skip


def _orth_penalty_backward_kernel(grad, lora_A, lora_B, gram, norms):
    """The gradient of every matrix, fp32, one after the other in ``_flat_order`` (one flat buffer:
    an op's outputs may not alias, so the per-matrix views are taken outside, by the caller)."""
    _, bwd = _impl(lora_A, lora_B)
    with no_autocast(lora_A[0].device):
        return bwd(grad, lora_A, lora_B, gram, norms)


orth_penalty_op = define_op(
    "orth_penalty(Tensor[] lora_A, Tensor[] lora_B) -> (Tensor, Tensor, Tensor)", _orth_penalty_kernel,
    _orth_penalty_fake,
)  # fmt: skip
orth_penalty_backward_op = define_op(
    "orth_penalty_backward(Tensor grad, Tensor[] lora_A, Tensor[] lora_B, Tensor gram, Tensor norms) -> Tensor",
    _orth_penalty_backward_kernel,
    lambda grad, lora_A, lora_B, gram, norms: grad.new_empty(sum(m.numel() for m in list(lora_A) + list(lora_B)),
                                                             dtype=torch.float32),
)  # fmt: skip


def _split(flat: torch.Tensor, lora_A, lora_B) -> list:
    """Per-matrix gradient views of the flat buffer, in A-then-B order, each in its matrix's dtype:
    one view and one (C++) unbind per shape group."""
    mats = list(lora_A) + list(lora_B)
    out = [None] * len(mats)
    off = 0
    for _, idx in _plan(lora_A, lora_B):
        first = mats[idx[0]]
        n = first.numel() * len(idx)
        block = flat[off : off + n].view(len(idx), *first.shape)
        if block.dtype != first.dtype:
            block = block.to(first.dtype)
        for i, g in zip(idx, block.unbind(0)):
            out[i] = g
        off += n
    return out


class _OrthPenaltyAutograd(torch.autograd.Function):
    """The op's autograd (its Tensor[] arguments flattened here, so autograd tracks each matrix)."""

    @staticmethod
    def forward(ctx, n_A, *mats):
        lora_A, lora_B = list(mats[:n_A]), list(mats[n_A:])
        with torch._C._AutoDispatchBelowAutograd():
            loss, gram, norms = orth_penalty_op(lora_A, lora_B)
        ctx.n_A = n_A
        ctx.save_for_backward(gram, norms, *mats)
        ctx.mark_non_differentiable(gram, norms)
        ctx.set_materialize_grads(False)
        return loss, gram, norms

    @staticmethod
    def backward(ctx, grad, _grad_gram, _grad_norms):
        if grad is None:
            return (None,) * (1 + len(ctx.saved_tensors) - 2)
        gram, norms, *mats = ctx.saved_tensors
        lora_A, lora_B = mats[: ctx.n_A], mats[ctx.n_A :]
        return (None, *_split(orth_penalty_backward_op(grad, lora_A, lora_B, gram, norms), lora_A, lora_B))


LIB.impl("orth_penalty", lambda lora_A, lora_B: _OrthPenaltyAutograd.apply(len(lora_A), *lora_A, *lora_B), "Autograd")


def orth_penalty(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F over every lora_A and lora_B (differentiable fp32 scalar)."""
    if not lora_A:
        return torch.zeros(())
    return orth_penalty_op(list(lora_A), list(lora_B))[0]
