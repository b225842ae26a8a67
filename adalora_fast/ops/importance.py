"""AdaLoRA's importance update and triplet scores as registered operators.

    adalora_fast::importance_update(Tensor[] params, Tensor[] grads, Tensor(a!) m1, Tensor(b!) m2,
                                    Tensor(c!) skipped, Tensor shape_table, float beta1, float beta2,
                                    int n_triplets, bool want_scores) -> Tensor
    adalora_fast::triplet_scores(Tensor m1, Tensor m2, Tensor shape_table, int n_triplets) -> Tensor

``params``: A, B, E of every layer (``layout.tensor_index`` order); ``grads`` the same, or empty
for "each parameter's ``.grad``"; m1, m2: the allocator's flat fp32 state [layout.numel], updated
in place (PEFT's ``update_ipt``: ipt = |p·g|, m1 = β1·m1 + (1-β1)·ipt, m2 = β2·m2 + (1-β2)·|ipt-m1|);
``skipped``: int64 [T] on m1's device, one counter per adapter tensor: an element whose |p·g| is
not finite (a NaN or inf gradient, e.g. an fp16 overflow step) leaves its m1 and m2 as they were
and adds 1 to its tensor's counter (the caller warns; see ``RankAllocator``).
``shape_table``: ``FlatLayout.shape_table`` (int64 [L, 3] of (r, k, d)). Returns the [n_triplets] fp32 triplet
scores ``E + mean_row(A) + mean_col(B)`` of the element scores m1·m2 when ``want_scores``, else an
empty tensor. A missing gradient raises before any state changes. No host sync.

Implementations by device (``ADALORA_FAST_BACKEND`` forces one):

* CPU, "torch": fp32 parameters: one C++ pass (``csrc/importance_cpu.cpp``, reads each ``.grad``
  itself; p, g, m1, m2 read once, m1, m2 written once, 24 B per element); other dtypes ~10 flat
  torch ops plus two ``torch.stack`` per (kind, shape) group, whatever the number of layers.
* CUDA, "triton": ``kernels/triton_ops/importance.py``, one launch over every tensor (pointer tables built
  here, cached per set of addresses) + 1 memset of the score vector.
* "reference" (forced, tests only): ``reference.importance_update`` one tensor at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import cpu_ext
from .layout import KIND_A, KIND_B, KIND_E, FlatLayout, grads_of, layer_and_kind, missing_grad_error, tensor_index
from .registry import define_op, impl_for


# ---------------------------------------------------------------------------------- torch (CPU)
def _update_torch(layout: FlatLayout, params, grads, m1, m2, skipped, beta1, beta2, want_scores):
    # the C++ pass takes fp32 only and checks every tensor itself (a clear error, nothing changed)
    if params and cpu_ext.usable_for(params[0]):
        return _update_cpp(layout, params, grads, m1, m2, skipped, beta1, beta2, want_scores)
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
    # NaN/inf elements keep their averages: selected, not branched on, so there is no host sync
    # (two extra flat passes; the fp32 CPU path is the C++ one above)
    ok = torch.isfinite(ipt)
    bad = ~ok
    for grp in layout.groups:
        if grp.numel:
            per = bad[grp.slice].view(len(grp.members), -1).sum(dim=1)
            skipped.index_add_(
                0,
                layout.cached(("members", grp.start, str(dev)), lambda g=grp: torch.tensor(g.members, device=dev)),
                per,
            )
    torch.mul(ipt, 1 - beta1, out=G)
    new1 = torch.mul(m1, beta1).add_(G)
    torch.sub(ipt, new1, out=G).abs_().mul_(1 - beta2)
    new2 = torch.mul(m2, beta2).add_(G)
    torch.where(ok, new1, m1, out=m1)
    torch.where(ok, new2, m2, out=m2)
    return _scores_torch(layout, m1, m2, out_buffer=P) if want_scores else None


def _update_cpp(layout: FlatLayout, params, grads, m1, m2, skipped, beta1, beta2, want_scores):
    """One C++ pass. ``grads=None`` passes an empty list: the kernel reads each ``.grad`` itself."""
    tensor_table = layout.cached(
        "cpu_tensor_table",
        lambda: torch.tensor(
            [
                (layout.offsets[t], layout.triplet_offsets[layer_and_kind(t)[0]], layout.kind_of(t))
                for t in range(len(layout.tensor_shapes))
            ],
            dtype=torch.int64,
        ).view(-1, 3),
    )
    parts = torch.zeros(3, layout.total_rank, dtype=torch.float32) if want_scores else None
    try:
        torch.ops.adalora_fast_cpu.importance_update(
            list(params),
            [] if grads is None else list(grads),
            m1,
            m2,
            skipped,
            tensor_table,
            float(beta1),
            float(beta2),
            parts,
        )
    except RuntimeError as exc:  # the kernel names a missing gradient by index, before it writes anything
        msg = str(exc)
        if "missing gradient for adapter tensor" in msg:
            raise missing_grad_error(int(msg.split("adapter tensor ")[1].split()[0])) from None
        raise
    if parts is None:
        return None
    return parts[2] + (parts[0] + parts[1])


def _scores_torch(layout: FlatLayout, m1, m2, out_buffer=None) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------- triton (CUDA)
_TILE_CACHE_KEY = "importance_tiles"
_ptr_cache: dict = {}
_PTR_CACHE_MAX = 8


def _geometry(layout: FlatLayout, t: int):
    """(rows, cols, stride_r, stride_c) of tensor t seen as [triplets, columns]."""
    a, b = layout.tensor_shapes[t]
    if layout.kind_of(t) == KIND_B:  # B [d, r] seen through its transpose
        return b, a, 1, b
    return a, b, b, 1  # A [r, k], E [r, 1]


def _tables(layout: FlatLayout, params, grads, device):
    from ..kernels import _launch as _kl
    from ..kernels import importance as _ki

    def tiles():
        rows = []
        for t in range(len(layout.tensor_shapes)):
            nr, nc, _, _ = _geometry(layout, t)
            for r0 in range(0, nr, _ki.TILE_R):
                for c0 in range(0, nc, _ki.TILE_C):
                    rows += [t, r0, c0]
        return _kl.to_device_table(rows, device) if rows else torch.zeros(0, dtype=torch.int64, device=device)

    vals = []
    for t in range(len(layout.tensor_shapes)):
        nr, nc, sr, sc = _geometry(layout, t)
        vals += [
            params[t].data_ptr() if params is not None else 0,
            grads[t].data_ptr() if grads is not None else 0,
            layout.offsets[t],
            nr,
            nc,
            sr,
            sc,
            layout.triplet_offsets[layer_and_kind(t)[0]],
        ]
    key = (str(device), tuple(vals))
    tab = _ptr_cache.get(key)
    if tab is None:
        if len(_ptr_cache) >= _PTR_CACHE_MAX:
            _ptr_cache.pop(next(iter(_ptr_cache)))
        tab = _ptr_cache[key] = _kl.to_device_table(vals, device)
    return tab, layout.cached((_TILE_CACHE_KEY, str(device)), tiles)


def _fp32_contig(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


def _run_triton(layout: FlatLayout, params, grads, m1, m2, skipped, beta1, beta2, update, want_scores):
    from ..kernels import importance as _ki

    dev = m1.device
    scores = torch.zeros(layout.total_rank, dtype=torch.float32, device=dev) if want_scores else None
    if update:
        params = [_fp32_contig(p) for p in params]  # fp32 copies (if any) live until the launch returns
        grads = [_fp32_contig(g) for g in grads]
    tens, tiles = _tables(layout, params if update else None, grads if update else None, dev)
    # without an update the counter is never touched: the int64 table stands in for it
    _ki.importance(
        tens,
        tiles,
        m1,
        m2,
        scores if want_scores else m1,
        skipped if update else tens,
        beta1,
        beta2,
        update,
        want_scores,
    )
    return scores


def _update_triton(layout, params, grads, m1, m2, skipped, beta1, beta2, want_scores):
    return _run_triton(layout, params, grads_of(params, grads), m1, m2, skipped, beta1, beta2, True, want_scores)


def _scores_triton(layout, m1, m2):
    return _run_triton(layout, None, None, m1, m2, None, 0.0, 0.0, False, True)


# ---------------------------------------------------------------------------------- reference (forced)
def _views(layout: FlatLayout, buf: torch.Tensor, t: int) -> torch.Tensor:
    o = layout.offsets[t]
    return buf[o : o + layout.numel_of(t)].view(layout.tensor_shapes[t])


def _update_reference(layout, params, grads, m1, m2, skipped, beta1, beta2, want_scores):
    from .. import reference as ref

    grads = grads_of(params, grads)  # checked first: the loop below updates the state tensor by tensor
    for t, (p, g) in enumerate(zip(params, grads)):
        v1, v2 = _views(layout, m1, t), _views(layout, m2, t)
        n1, n2, n_skipped = ref.importance_update(p, g, v1, v2, beta1, beta2)
        v1.copy_(n1)
        v2.copy_(n2)
        skipped[t] += n_skipped
    return _scores_reference(layout, m1, m2) if want_scores else None


def _scores_reference(layout, m1, m2):
    from .. import reference as ref

    out = []
    for i in range(layout.n_layers):
        sA, sB, sE = (
            ref.element_score(_views(layout, m1, tensor_index(i, k)), _views(layout, m2, tensor_index(i, k)))
            for k in (KIND_A, KIND_B, KIND_E)
        )
        out.append(ref.triplet_scores(sA, sE, sB))
    return torch.cat(out) if out else torch.zeros(0, device=m1.device)


_UPDATE = {"torch": _update_torch, "triton": _update_triton, "reference": _update_reference}
_SCORES = {"torch": _scores_torch, "triton": _scores_triton, "reference": _scores_reference}


# ---------------------------------------------------------------------------------- the operators
def _check_state(layout: FlatLayout, m1, m2, n_triplets):
    for name, buf in (("m1", m1), ("m2", m2)):
        if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.numel() != layout.numel:
            raise ValueError(f"importance_update: {name} must be a contiguous fp32 [{layout.numel}] buffer")
        if buf.device != m1.device:
            raise ValueError(f"importance_update: m1 is on {m1.device}, {name} on {buf.device}")
    if n_triplets != layout.total_rank:
        raise ValueError(f"importance_update: n_triplets={n_triplets}, the layout has {layout.total_rank}")


def _importance_update_kernel(params, grads, m1, m2, skipped, shape_table, beta1, beta2, n_triplets, want_scores):
    layout = FlatLayout.of_shape_table(shape_table)
    _check_state(layout, m1, m2, n_triplets)
    T = len(layout.tensor_shapes)
    if skipped.dtype != torch.int64 or skipped.shape != (T,) or skipped.device != m1.device:
        raise ValueError(f"importance_update: skipped must be an int64 [{T}] tensor on {m1.device}")
    if grads and len(grads) != len(params):
        raise ValueError(f"importance_update: {len(grads)} gradients for {len(params)} parameters")
    layout.check_cached(params, grads)
    if m1.device.type != "cpu":  # the Triton pointer tables address every tensor on m1's device
        for t, x in enumerate(list(params) + list(grads)):
            if x is not None and x.device != m1.device:
                raise ValueError(
                    f"importance_update: adapter tensor {t % len(params)} is on {x.device}, "
                    f"the importance state on {m1.device}"
                )
    with torch.no_grad():
        scores = _UPDATE[impl_for(m1.device)](layout, params, grads or None, m1, m2, skipped, beta1, beta2, want_scores)
    return scores if scores is not None else m1.new_empty(0)


def _importance_update_fake(params, grads, m1, m2, skipped, shape_table, beta1, beta2, n_triplets, want_scores):
    return m1.new_empty(n_triplets if want_scores else 0)


importance_update_op = define_op(
    "importance_update(Tensor[] params, Tensor[] grads, Tensor(a!) m1, Tensor(b!) m2, Tensor(c!) skipped, "
    "Tensor shape_table, float beta1, float beta2, int n_triplets, bool want_scores) -> Tensor",
    _importance_update_kernel, _importance_update_fake,
)  # fmt: skip


def _triplet_scores_kernel(m1, m2, shape_table, n_triplets):
    layout = FlatLayout.of_shape_table(shape_table)
    _check_state(layout, m1, m2, n_triplets)
    return _SCORES[impl_for(m1.device)](layout, m1, m2)


triplet_scores_op = define_op(
    "triplet_scores(Tensor m1, Tensor m2, Tensor shape_table, int n_triplets) -> Tensor",
    _triplet_scores_kernel, lambda m1, m2, shape_table, n_triplets: m1.new_empty(n_triplets),
)  # fmt: skip


# ---------------------------------------------------------------------------------- the public calls
def importance_update(
    layout: FlatLayout,
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[Optional[torch.Tensor]]],
    m1: torch.Tensor,
    m2: torch.Tensor,
    beta1: float,
    beta2: float,
    want_scores: bool = False,
    skipped: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """PEFT's ``update_ipt`` for every adapter tensor at once, in place on the flat fp32 state
    (``grads=None``: each parameter's ``.grad``). Returns the [sum(r)] triplet scores when
    ``want_scores``, else None. A missing gradient raises ValueError before any state changes.

    Elements whose |p·g| is not finite keep their state; ``skipped`` (int64 [T], T = 3 × layers,
    on m1's device) accumulates how many per tensor (a throwaway counter when None)."""
    if grads is not None:
        grads = grads_of(params, grads)  # the op's Tensor[] has no None: name the missing one here
    if skipped is None:
        skipped = torch.zeros(len(layout.tensor_shapes), dtype=torch.int64, device=m1.device)
    with torch.no_grad():
        out = importance_update_op(
            list(params),
            list(grads or []),
            m1,
            m2,
            skipped,
            layout.shape_table,
            float(beta1),
            float(beta2),
            layout.total_rank,
            bool(want_scores),
        )
    return out if want_scores else None


def triplet_scores(layout: FlatLayout, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """[sum(r)] triplet scores of the current state (no update)."""
    return triplet_scores_op(m1, m2, layout.shape_table, layout.total_rank)
