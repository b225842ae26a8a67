"""The vectorised PyTorch backend: the CPU training path (and a fallback one can force on CUDA).

Every function here has a reference in ``adalora_fast/reference.py`` and a test against it. For
fp32 adapters on the CPU it calls the C++ kernels of ``csrc/`` (``cpu_ext.py``) where torch ops
fall short, and its own torch ops otherwise (other dtypes, or ``ADALORA_FAST_CPU_EXT=0``).

* ``adapter_linear``: one autograd Function owns the whole adapted layer. ``E * scaling /
  ranknum`` is folded into an r-vector ``e`` inside it (no ``A*E`` tensor), the adapter term is
  added in place into the base output (``addmm_``), and backward adds the adapter's dx in place
  into the base dx. Saved for backward: x, the [N, r] shrink output and the parameters, nothing
  else of size N x k or N x d. With dropout the keep mask is regenerated in backward from the
  seed: by the C++ kernel (hashed mask fused into the shrink, one pass over x each way) or by a
  seeded ``bernoulli_`` (two extra passes each way).
* ``importance_update``: all layers at once on two flat fp32 buffers: one C++ pass (which reads
  each ``.grad`` itself), or ~10 flat torch ops plus two ``torch.stack`` per (kind, shape) group,
  whatever the number of layers. ``keep_mask_to_budget`` and ``apply_mask``: one C++ call each
  (an O(n) selection; a loop over the E tensors), or a stable sort and one foreach multiply.
* ``orth_penalty``: one autograd node; one stack, bmm and norm per (kind, shape) group.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import cpu_ext
from .layout import FlatLayout, grads_of


def dropout_keep_mask(seed: int, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The bool keep mask this backend uses for ``seed`` on a 2-D input of ``shape``.

    ``dtype`` is the adapter's dtype: fp32 adapters on the CPU use the C++ kernel's hash mask when
    it is available, everything else torch's seeded ``bernoulli_``.
    """
    if cpu_ext.usable(device, dtype, p):
        return torch.ops.adalora_fast.dropout_keep_mask(int(shape[0]), int(shape[1]), int(seed), float(p))
    return _keep_float(shape, dtype, device, seed, p).bool()


def _keep_float(shape, dtype, device, seed: int, p: float) -> torch.Tensor:
    # The same seeded draw in forward and backward: same shape, dtype, device and generator state.
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)


class _AdapterLinear(torch.autograd.Function):
    """out = x Wᵀ + b + ((dropout(x) Aᵀ) * e) Bᵀ for 2-D x [N, k].

    x and weight share the base dtype; A [r, k], e [r], B [d, r] share the adapter dtype, in which
    the adapter term is computed (x is cast for it, as PEFT casts x to lora_A's dtype).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, E, B, ranknum, scaling, p, seed, fan_in_fan_out):
        # e is folded here, not by autograd outside: that would save an r-vector and a scalar.
        s = scaling / (ranknum + 1e-5)  # [1] tensor: no host read of ranknum
        e = (E.view(-1) * s).to(A.dtype)
        w = weight.t() if fan_in_fan_out else weight  # [d, k]
        out = F.linear(x, w, bias)
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        use_ext = cpu_ext.usable(x.device, A.dtype, p)
        if use_ext:
            t = torch.ops.adalora_fast.dropout_shrink(xa.contiguous(), A.contiguous(), seed, p)
        else:
            if p > 0.0:
                xa = _keep_float(xa.shape, xa.dtype, xa.device, seed, p).mul_(xa).mul_(1.0 / (1.0 - p))
            t = xa @ A.t()  # [N, r]
        u = t * e
        if out.dtype == u.dtype:
            out.addmm_(u, B.t())
        else:
            out += u @ B.t()
        ctx.save_for_backward(x, t, weight, A, E, B, ranknum)
        ctx.scaling = scaling
        ctx.p, ctx.seed, ctx.fifo, ctx.use_ext = p, seed, fan_in_fan_out, use_ext
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, t, weight, A, E, B, ranknum = ctx.saved_tensors
        p, seed, fifo = ctx.p, ctx.seed, ctx.fifo
        need_x, need_w, need_b, need_A, need_E, need_B = ctx.needs_input_grad[:6]
        s = ctx.scaling / (ranknum + 1e-5)
        e = (E.view(-1) * s).to(A.dtype)
        w = weight.t() if fifo else weight  # [d, k]
        ga = g if g.dtype == A.dtype else g.to(A.dtype)
        gB = ga @ B  # [N, r]
        dB = ga.t() @ (t * e) if need_B else None
        dE = ((gB * t).sum(0) * s).view_as(E).to(E.dtype) if need_E else None
        ge = gB * e
        dw = db = None
        base_dx = g @ w if need_x else None  # [N, k], base dtype
        if ctx.use_ext:
            dx, dA = _adapter_backward_ext(x, A, ge, base_dx, seed, p, need_A)
        else:
            dx, dA = _adapter_backward_torch(x, A, ge, base_dx, seed, p, need_A)
        if need_w:
            gw = g.t() @ x  # [d, k]
            dw = gw.t() if fifo else gw
        if need_b and ctx.has_bias:
            db = g.sum(0)
        return dx, dw, db, dA, dE, dB, None, None, None, None, None


def _adapter_backward_torch(x, A, ge, dx, seed, p, need_A):
    """dA = geᵀ dropout(x) and dx += dropout'(ge A), the keep mask redrawn from the seed."""
    keep = _keep_float(x.shape, A.dtype, x.device, seed, p) if p > 0.0 and (need_A or dx is not None) else None
    dA = None
    if need_A:
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        dA = ge.t() @ (xa * keep * (1.0 / (1.0 - p)) if keep is not None else xa)
    if dx is not None:
        if keep is not None:
            dx += (ge @ A).mul_(keep).mul_(1.0 / (1.0 - p))
        elif dx.dtype == ge.dtype:
            dx.addmm_(ge, A)
        else:
            dx += ge @ A
    return dx, dA


def _adapter_backward_ext(x, A, ge, dx, seed, p, need_A):
    """The same with the C++ kernel: one pass over x (and dx), the mask rehashed, never stored."""
    xa = x if x.dtype == A.dtype else x.to(A.dtype)
    in_place = dx is not None and dx.dtype == torch.float32 and dx.is_contiguous()
    lora_dx = dx if in_place else (torch.zeros(x.shape, dtype=torch.float32, device=x.device) if dx is not None else None)
    dA = torch.ops.adalora_fast.dropout_shrink_backward(
        xa.contiguous(), A.contiguous(), ge.contiguous(), lora_dx, seed, p, bool(need_A)
    )
    if dx is not None and not in_place:
        dx += lora_dx
    return dx, (dA if need_A else None)


def adapter_linear(x, weight, bias, A, E, B, scaling, ranknum, dropout_p, seed, fan_in_fan_out):
    """See ``ops.adapter_linear``; x is 2-D [N, k] here, ranknum a [1] tensor."""
    return _AdapterLinear.apply(
        x, weight, bias, A, E, B, ranknum.detach(), float(scaling), float(dropout_p), seed, fan_in_fan_out
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
    """Update the flat EMA state in place; return the [sum(r)] triplet scores if ``want_scores``.

    Reads every parameter and gradient once (``torch.stack`` into two temporaries), then runs ~10
    flat elementwise ops over all layers' state at once. At a masking step, one extra pass forms
    the element scores and each (kind, shape) group is reduced with one ``mean``.
    """
    if params and cpu_ext.usable_for(params[0]) and all(p.dtype == torch.float32 for p in params[1::3]):
        return _importance_update_ext(layout, params, grads, m1, m2, beta1, beta2, want_scores)
    grads = grads_of(params, grads)  # before the stacks: a failed call leaves the state as it was
    dev = m1.device
    P = torch.empty(layout.numel, dtype=torch.float32, device=dev)
    G = torch.empty(layout.numel, dtype=torch.float32, device=dev)
    for grp in layout.groups:
        if grp.numel == 0:
            continue
        view_shape = (len(grp.members),) + grp.shape
        torch.stack([params[t].detach() for t in grp.members], out=P[grp.slice].view(view_shape))
        torch.stack([grads[t] for t in grp.members], out=G[grp.slice].view(view_shape))
    ipt = P.mul_(G).abs_()  # |p * grad|, written over P
    torch.mul(ipt, 1 - beta1, out=G)
    m1.mul_(beta1).add_(G)
    torch.sub(ipt, m1, out=G).abs_().mul_(1 - beta2)
    m2.mul_(beta2).add_(G)
    if not want_scores:
        return None
    return triplet_scores(layout, m1, m2, out_buffer=P)


def _importance_update_ext(layout, params, grads, m1, m2, beta1, beta2, want_scores):
    """The same in one C++ pass: p, grad, m1, m2 read once, m1, m2 written once, means reduced.
    ``grads=None`` passes an empty list: the kernel reads each parameter's ``.grad`` itself."""
    meta = layout.cached(
        "cpu_meta",
        lambda: torch.tensor(
            [(layout.offsets[t], layout.triplet_offsets[t // 3]) for t in range(len(layout.tensor_shapes))],
            dtype=torch.int64,
        ).view(-1, 2),
    )
    parts = torch.zeros(3, layout.total_rank, dtype=torch.float32) if want_scores else None
    with torch.no_grad():  # the op has no autograd formula; no_grad lets it take the parameters as they are
        torch.ops.adalora_fast.importance_update(
            list(params), [] if grads is None else list(grads), m1, m2, meta, float(beta1), float(beta2), parts
        )
    if parts is None:
        return None
    return parts[2] + (parts[0] + parts[1])


def triplet_scores(layout: FlatLayout, m1: torch.Tensor, m2: torch.Tensor, out_buffer=None) -> torch.Tensor:
    """[sum(r)] triplet scores E + mean_row(A) + mean_col(B) of the element scores m1 * m2."""
    S = torch.mul(m1, m2, out=out_buffer) if out_buffer is not None else m1 * m2
    dev = m1.device
    parts = {k: torch.zeros(layout.total_rank, dtype=torch.float32, device=dev) for k in ("A", "B", "E")}
    for grp in layout.groups:
        if grp.numel == 0:
            continue
        block = S[grp.slice].view((len(grp.members),) + grp.shape)
        if grp.kind == "A":
            red = block.mean(dim=2)  # [L, r]
        elif grp.kind == "B":
            red = block.mean(dim=1)  # [L, r]
        else:
            red = block[..., 0]
        parts[grp.kind].index_copy_(0, layout.group_positions(grp, dev), red.reshape(-1))
    return parts["E"] + (parts["A"] + parts["B"])


def keep_mask_to_budget(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """``reference.keep_mask_to_budget``: an O(n) C++ selection for fp32 CPU scores, else the sort."""
    if cpu_ext.usable_for(scores) and scores.dim() == 1 and scores.is_contiguous():
        return torch.ops.adalora_fast.keep_mask_to_budget(scores, int(n_prune))
    return ref.keep_mask_to_budget(scores, n_prune)


def apply_mask(E_params: Sequence[torch.Tensor], keep: torch.Tensor, ranks: Sequence[int]) -> None:
    """Zero every pruned ``lora_E`` entry in place (``keep``: [sum(r)] bool, layer order): one
    C++ call for fp32 CPU parameters, else a split and one foreach multiply."""
    if not E_params:
        return
    if keep.device.type == "cpu" and cpu_ext.usable_for(E_params[0]):
        try:  # the kernel checks every E before it writes any: on a refusal nothing has changed
            with torch.no_grad():
                torch.ops.adalora_fast.apply_mask(list(E_params), keep.contiguous())
            return
        except RuntimeError:  # an E of another dtype or layout: the foreach path below takes any
            pass
    with torch.no_grad():
        factors = keep.to(E_params[0].dtype).view(-1, 1).split(list(ranks))
        torch._foreach_mul_(list(E_params), list(factors))  # on the parameters: their versions move


class _OrthPenalty(torch.autograd.Function):
    """mean_i ||D_i||_F over every lora_A and lora_B, D = A Aᵀ - I or Bᵀ B - I, as ONE autograd node.

    Per (kind, shape) group: one stack, one bmm and one norm forward; one bmm and one unbind
    backward. Autograd on the same ops would add ~10 nodes per group plus StackBackward; the
    per-parameter leaf work (one gradient per A and B) is what remains.
    """

    @staticmethod
    def forward(ctx, plan, *mats):
        total = mats[0].new_zeros((), dtype=torch.float32)
        saved = []
        for kind, idx in plan:
            S = torch.stack([mats[i] for i in idx])  # [L, r, k] (A) or [L, d, r] (B)
            D = S @ S.mT if kind == "A" else S.mT @ S  # [L, r, r]
            D.diagonal(dim1=1, dim2=2).sub_(1.0)
            nrm = torch.linalg.matrix_norm(D)  # [L]
            total = total + nrm.sum()
            saved += [S, D, nrm]
        ctx.plan = plan
        ctx.save_for_backward(*saved)
        return total / len(mats)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        n = sum(len(idx) for _, idx in ctx.plan)
        grads = [None] * n
        for j, (kind, idx) in enumerate(ctx.plan):
            S, D, nrm = saved[3 * j : 3 * j + 3]
            # d||D||/dD = D/||D|| (0 where ||D|| = 0, as torch.norm); D symmetric: dS = 2 c D S or 2 c S D
            coef = torch.where(nrm > 0, (2.0 / n) * g / nrm.clamp_min(1e-30), torch.zeros_like(nrm))
            Dc = D * coef[:, None, None]
            gS = Dc @ S if kind == "A" else S @ Dc
            for i, gi in zip(idx, gS.unbind(0)):
                grads[i] = gi
        return (None, *grads)


def _orth_plan(layout: FlatLayout) -> list:
    """[(kind, [positions in the A-then-B list])] per (kind, shape) group of A or B."""

    def build():
        n_A = layout.n_layers
        return [
            (grp.kind, [t // 3 + (0 if grp.kind == "A" else n_A) for t in grp.members])
            for grp in layout.groups
            if grp.kind != "E"
        ]

    return layout.cached("orth_plan", build)


def orth_penalty(layout: FlatLayout, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over all A and B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F: one autograd node, one
    stack + bmm + norm per (kind, shape) group."""
    mats = list(params[0::3]) + list(params[1::3])
    if not mats:
        return torch.zeros(())
    return _OrthPenalty.apply(_orth_plan(layout), *mats)
