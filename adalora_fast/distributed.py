"""Adapters whose parameters are sharded across data-parallel ranks.

Two kinds of shards are recognised (DDP needs nothing here: every rank holds whole parameters):

* FSDP2 (``torch.distributed.fsdp.fully_shard``): outside a module's forward each adapter tensor is a
  ``DTensor`` sharded on dim 0 (``Shard(0)`` on a 1-D mesh), rows split as ``torch.chunk`` splits them;
* FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): each adapter parameter is a 1-D
  view of its slice of the rank's flat shard (possibly empty, possibly a part of a row).

Either way this rank holds one contiguous range ``[start, start + numel)`` of every tensor seen flat
(row-major): :class:`ShardedAdapters` records these ranges and runs the allocator's work on them:

* :meth:`ShardedAdapters.importance_update`: PEFT's ``update_ipt`` on this rank's elements (local fp32
  state of ``n_local`` elements); no communication;
* :meth:`ShardedAdapters.scores`: the [sum(r)] triplet scores ``E + mean_row(A) + mean_col(B)`` from
  each rank's partial sums, completed by one ``all_reduce`` (collective), so every rank selects the
  same triplets;
* :meth:`ShardedAdapters.apply_mask`: zero the pruned entries of this rank's pieces of ``lora_E``;
* :meth:`ShardedAdapters.gather` and :func:`gather_full`: whole tensors on every rank (collective;
  the latter differentiable, for the orthogonal penalty).

Collective calls must be made on every rank in the same order: ``update_and_allocate`` with the same
step everywhere, the forward (penalty), ``state_dict()`` and ``save_pretrained`` on every rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .ops.layout import KIND_A, KIND_B, FlatLayout, layer_and_kind, missing_grad_error

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch without torch.distributed.tensor has no FSDP2 either
    DTensor = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_flat_shard(t) -> bool:
    """An FSDP1 ``use_orig_params=True`` parameter (FSDP marks the tensors it flattened)."""
    return bool(getattr(t, "_fsdp_flattened", False))


def local_flat(t: torch.Tensor) -> torch.Tensor:
    """This rank's elements of ``t`` as a 1-D tensor (a view; differentiable for a DTensor)."""
    return (t.to_local() if is_dtensor(t) else t).reshape(-1)


def _fsdp1_ranges(root, params) -> dict:
    """id(parameter) -> (start, numel) of this rank's slice, read from the FSDP1 units inside ``root``."""
    out = {}
    for module in root.modules() if root is not None else ():
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None or getattr(flat, "_params", None) is None:
            continue
        for p, info in zip(flat._params, flat._shard_param_infos):
            out[id(p)] = (info.intra_param_start_idx, info.numel_in_shard) if info.in_shard else (0, 0)
    return out


class ShardedAdapters:
    """This rank's range of every adapter tensor (A, B, E per layer, ``layout.tensor_index`` order).

    ``params``: the modules' current parameters (DTensors or FSDP1 flat pieces); ``root``: a module
    holding the FSDP1 units (needed for FSDP1 only); ``names``/``adapter``: for error messages.
    Attributes: ``starts``/``numels`` per tensor, ``n_local`` (elements here, the local state size),
    ``full_pos`` (int64 [n_local]: each local element's position in the layout's flat buffers).
    """

    def __init__(self, layout: FlatLayout, params: Sequence[torch.Tensor], root=None, names=(), adapter="", group=None):
        self.layout, self.params, self.names, self.adapter, self.group = layout, list(params), names, adapter, group
        self.kind = "fsdp2" if is_dtensor(params[0]) else "fsdp1"
        ranges = _fsdp1_ranges(root, params) if self.kind == "fsdp1" else None
        self.starts, self.numels = [], []
        for t, p in enumerate(params):
            start, n = self._range(t, p, ranges)
            self.starts.append(start)
            self.numels.append(n)
        self.n_local = sum(self.numels)
        pos, tri, w = [], [], []
        for t, (start, n) in enumerate(zip(self.starts, self.numels)):
            idx = torch.arange(start, start + n, dtype=torch.int64)
            pos.append(idx + layout.offsets[t])
            layer, kind = layer_and_kind(t)
            r, k, d = layout.shapes[layer]
            if kind == KIND_A:  # A [r, k]: row idx // k, mean over k
                tri.append(idx // k)
                w.append(torch.full((n,), 1.0 / k))
            elif kind == KIND_B:  # B [d, r]: column idx % r, mean over d
                tri.append(idx % r)
                w.append(torch.full((n,), 1.0 / d))
            else:  # E [r, 1]
                tri.append(idx)
                w.append(torch.ones(n))
            tri[-1] += layout.triplet_offsets[layer]
        self.full_pos = torch.cat(pos)
        self.triplet = torch.cat(tri)  # int64 [n_local]: the triplet each local element scores for
        self.weight = torch.cat(w).float()  # fp32 [n_local]: 1/k (A), 1/d (B), 1 (E)
        self.tensor_of = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(self.numels))  # [n_local]
        self._e = [t for t in range(2, len(params), 3) if self.numels[t] > 0]
        self._e_pos = (
            torch.cat([self.triplet[self._slice(t)] for t in self._e]) if self._e else torch.zeros(0, dtype=torch.int64)
        )
        self._plans: dict = {}

    def _range(self, t, p, ranges):
        shape = self.layout.tensor_shapes[t]
        numel = shape[0] * shape[1]
        if is_dtensor(p):
            placements = tuple(p.placements)
            if tuple(p.shape) != shape or p.device_mesh.ndim != 1 or placements != (Shard(0),):
                raise NotImplementedError(
                    f"{self._name(t)}: a DTensor of shape {tuple(p.shape)} with placements {placements}; adalora_fast "
                    f"supports FSDP2's default sharding, Shard(0) on a 1-D mesh, of the {shape} adapter tensor"
                )
            rows, cols = shape
            world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
            chunk = -(-rows // world)  # torch.chunk: ceil(rows / world) rows per rank, the last ones shorter or empty
            r0 = min(rank * chunk, rows)
            r1 = min(r0 + chunk, rows)
            if tuple(p.to_local().shape) != (r1 - r0, cols):
                raise NotImplementedError(
                    f"{self._name(t)}: local shard {tuple(p.to_local().shape)}, expected rows {r0}:{r1} of {shape} "
                    "(torch.chunk's split); uneven custom sharding is not supported"
                )
            return r0 * cols, (r1 - r0) * cols
        if not is_flat_shard(p):
            raise NotImplementedError(
                f"{self._name(t)} is a plain tensor of shape {tuple(p.shape)} while other adapter tensors are sharded; "
                "adalora_fast needs every adapter tensor sharded the same way (wrap every adapted layer)"
            )
        if id(p) not in ranges:
            raise NotImplementedError(
                f"{self._name(t)} is an FSDP1 flat shard but no FSDP unit inside the AdaLoraModel holds it: with "
                "FullyShardedDataParallel wrap the layers (auto_wrap_policy) so the adapters live in units inside "
                "the AdaLoraModel, and pass use_orig_params=True"
            )
        start, n = ranges[id(p)]
        if p.numel() != n or start + n > numel:
            raise RuntimeError(f"{self._name(t)}: {p.numel()} local elements, FSDP's shard info says {n} from {start}")
        return start, n

    def _name(self, t: int) -> str:
        layer, kind = layer_and_kind(t)
        base = f"{self.names[layer]}." if self.names else f"layer {layer} "
        return f"{base}lora_{'ABE'[kind]}" + (f".{self.adapter}" if self.adapter else "")

    def _slice(self, t: int) -> slice:
        s = sum(self.numels[:t])
        return slice(s, s + self.numels[t])

    # ------------------------------------------------------------------ the allocator's work
    def local_state(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part ([n_local]) of a whole flat state buffer ([layout.numel])."""
        return full[self.full_pos.to(full.device)].clone()

    def importance_update(self, m1, m2, beta1: float, beta2: float, skipped: torch.Tensor) -> None:
        """PEFT's ``update_ipt`` on this rank's elements, in place on the local state m1, m2 [n_local]
        (the math of ``ops.importance_update``: ipt = |p·g|, m1 = β1·m1 + (1-β1)·ipt,
        m2 = β2·m2 + (1-β2)·|ipt - m1|; an element whose |p·g| is NaN or inf keeps its m1 and m2 and
        is counted in ``skipped``, int64 [T] per tensor, summed over the ranks: collective, all_reduce).
        Raises naming a tensor with local elements and no gradient, before any state changes."""
        ps, gs = [], []
        for t, p in enumerate(self.params):
            if self.numels[t] == 0:
                continue
            if p.grad is None:
                raise missing_grad_error(t, self.names, self.adapter)
            ps.append(local_flat(p.detach()))
            gs.append(local_flat(p.grad))
        with torch.no_grad():
            ipt = torch.cat(ps).float().mul_(torch.cat(gs).float()).abs_() if ps else m1.new_zeros(0)
            ok = torch.isfinite(ipt)
            step_skipped = torch.zeros_like(skipped).index_add_(0, self.tensor_of.to(ok.device), (~ok).long())
            dist.all_reduce(step_skipped, group=self.group)
            skipped += step_skipped
            new1 = torch.mul(m1, beta1).add_(ipt * (1 - beta1))
            new2 = torch.mul(m2, beta2).add_((ipt - new1).abs_().mul_(1 - beta2))
            torch.where(ok, new1, m1, out=m1)
            torch.where(ok, new2, m2, out=m2)

    def scores(self, m1, m2) -> torch.Tensor:
        """[sum(r)] fp32 triplet scores of the whole model, the same on every rank (collective: all_reduce)."""
        dev = m1.device
        out = torch.zeros(self.layout.total_rank, dtype=torch.float32, device=dev)
        out.index_add_(0, self.triplet.to(dev), (m1 * m2).mul_(self.weight.to(dev)))
        dist.all_reduce(out, group=self.group)
        return out

    def apply_mask(self, keep: torch.Tensor) -> None:
        """Zero this rank's ``lora_E`` entries of the pruned triplets (``keep``: [sum(r)] bool, as on every rank)."""
        from . import ops

        if not self._e:
            return
        with torch.no_grad():
            pieces = [local_flat(self.params[t]).view(-1, 1) for t in self._e]
            ops.apply_mask(pieces, keep[self._e_pos.to(keep.device)])

    # ------------------------------------------------------------------ gathering (collective)
    def _plan(self, ts: tuple):
        """(perm, padded length): whole tensors ``ts`` (concatenated flat) = all_gather(local pieces)[perm]."""
        hit = self._plans.get(ts)
        if hit is not None:
            return hit
        pos = torch.cat([self.full_pos[self._slice(t)] for t in ts])
        sizes = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(sizes, pos.numel(), group=self.group)
        n_max = max(sizes)
        everyone = [torch.empty(n_max, dtype=torch.int64) for _ in sizes]
        dist.all_gather(everyone, torch.cat([pos, pos.new_full((n_max - pos.numel(),), -1)]), group=self.group)
        where = torch.full((self.layout.numel,), -1, dtype=torch.int64)
        flat = torch.cat(everyone)
        valid = flat >= 0
        where[flat[valid]] = torch.arange(flat.numel())[valid]
        want = torch.cat(
            [torch.arange(self.layout.offsets[t], self.layout.offsets[t] + self.layout.numel_of(t)) for t in ts]
        )
        perm = where[want]
        if (perm < 0).any():
            raise RuntimeError("the ranks' shards do not cover every adapter element; is every rank in the group?")
        self._plans[ts] = hit = (perm, n_max, pos.numel())
        return hit

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """A whole flat state buffer [layout.numel] from each rank's [n_local] part (collective)."""
        ts = tuple(range(len(self.params)))
        perm, n_max, _ = self._plan(ts)
        full = _all_gather_padded(local, n_max, self.group)[perm.to(local.device)]
        order = torch.cat(
            [torch.arange(self.layout.offsets[t], self.layout.offsets[t] + self.layout.numel_of(t)) for t in ts]
        ).to(local.device)
        out = torch.empty_like(full)
        out[order] = full
        return out

    def full_tensors(self, ts: Sequence[int]) -> list:
        """Whole (detached) tensors ``ts`` on every rank (collective)."""
        with torch.no_grad():
            return gather_full(self, [self.params[t] for t in ts], tuple(ts))


def _all_gather_padded(local: torch.Tensor, n_max: int, group) -> torch.Tensor:
    padded = torch.zeros(n_max, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    out = torch.empty(n_max * dist.get_world_size(group), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, padded, group=group)
    return out


class _GatherFull(torch.autograd.Function):
    """Whole tensors from every rank's pieces; the backward keeps this rank's part of the gradient
    (every rank computes the same loss from the same gathered tensors, so nothing is reduced).

    FSDP1: FSDP replaces each piece's ``.grad`` with a view of its reduce-scattered flat gradient at
    the end of the backward, so the pieces' gradients are added to those views by a callback queued
    on the autograd engine, which runs after FSDP's own end-of-backward callback (queued earlier,
    by the root's pre-backward hook)."""

    @staticmethod
    def forward(ctx, shards, ts, *pieces):
        perm, n_max, _ = shards._plan(ts)
        local = torch.cat([p.reshape(-1) for p in pieces])
        full = _all_gather_padded(local.detach(), n_max, shards.group)[perm.to(local.device)]
        ctx.perm, ctx.n_max, ctx.pieces_of = perm, n_max, [shards.params[t] for t in ts]
        ctx.fsdp1 = shards.kind == "fsdp1"
        ctx.rank, ctx.world = dist.get_rank(shards.group), dist.get_world_size(shards.group)
        ctx.sizes = [p.numel() for p in pieces]
        shapes = [shards.layout.tensor_shapes[t] for t in ts]
        return tuple(v.view(s) for v, s in zip(full.split([a * b for a, b in shapes]), shapes))

    @staticmethod
    def backward(ctx, *grads):
        g = torch.cat([gr.reshape(-1) for gr in grads])
        everyone = g.new_zeros(ctx.n_max * ctx.world)
        everyone.index_add_(0, ctx.perm.to(g.device), g)
        mine = everyone[ctx.rank * ctx.n_max : ctx.rank * ctx.n_max + sum(ctx.sizes)].split(ctx.sizes)
        if not ctx.fsdp1:
            return (None, None, *mine)
        pending = [(p, g_t) for p, g_t in zip(ctx.pieces_of, mine) if g_t.numel()]

        @torch.no_grad()
        def add_to_views():
            for p, g_t in pending:
                if p.grad is None:  # no gradient from the model this step: the penalty's alone
                    p.grad = g_t.to(p.dtype).clone()
                else:
                    p.grad.add_(g_t.to(p.grad.dtype))

        torch.autograd.Variable._execution_engine.queue_callback(add_to_views)
        return (None, None, *[None] * len(mine))


def gather_full(shards: ShardedAdapters, params: Sequence[torch.Tensor], ts: tuple) -> list:
    """The whole tensors ``ts`` (full shapes, plain tensors) from their sharded ``params``, on every
    rank, differentiable: the gradient of each reaches this rank's shard only (collective)."""
    pieces = [local_flat(p) for p in params]
    return list(_GatherFull.apply(shards, tuple(ts), *pieces))


def shards_of(
    layout: FlatLayout, params: Sequence[torch.Tensor], root=None, names=(), adapter=""
) -> Optional[ShardedAdapters]:
    """A :class:`ShardedAdapters` when the adapter parameters are FSDP shards, else None (whole tensors)."""
    if params and hasattr(params[0], "ds_id"):  # DeepSpeed ZeRO marks the parameters it partitions
        raise NotImplementedError(
            "the adapter parameters are DeepSpeed ZeRO-3 partitions: not supported by adalora_fast's allocator and "
            "penalty; use DDP, FSDP2 (fully_shard) or FSDP1 (use_orig_params=True), or ZeRO stage 1/2"
        )
    if not params or not (is_dtensor(params[0]) or is_flat_shard(params[0])):
        return None
    if is_flat_shard(params[0]) and all(tuple(p.shape) == s for p, s in zip(params, layout.tensor_shapes)):
        return None  # FSDP1 inside a forward (or NO_SHARD): the parameters are whole views
    return ShardedAdapters(layout, params, root, names, adapter)
