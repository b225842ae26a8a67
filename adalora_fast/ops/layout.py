"""FlatLayout: where every adapter tensor's importance state lives in the allocator's flat buffers.

The allocator owns two flat fp32 buffers (EMA sensitivity ``m1`` and uncertainty ``m2``) that
hold the state of every A, B and E of every adapted layer. Tensors are ordered by *group*: all
tensors of one kind ("A", "B" or "E") and one shape are contiguous, so a group is a dense
[L, *shape] block. The torch backend reduces a whole group with one op; the triton backend walks
the per-tensor offsets with pointer tables. Tensors are numbered per layer: layer i has A at
index 3i ([r, k]), B at 3i+1 ([d, r]), E at 3i+2 ([r, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

KINDS = ("A", "B", "E")


@dataclass(frozen=True)
class Group:
    kind: str  # "A", "B" or "E"
    shape: tuple  # shape of one member
    members: tuple  # tensor indices (3 * layer + kind offset)
    layers: tuple  # layer index of each member
    start: int  # first element in the flat state
    numel: int  # L * prod(shape)

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.numel)


def grads_of(params: Sequence[torch.Tensor], grads) -> list:
    """``grads`` as a list, or each parameter's ``.grad`` when ``grads`` is None. Raises ValueError
    naming the first adapter tensor without a gradient, before a backend touches any state."""
    grads = [p.grad for p in params] if grads is None else list(grads)
    for t, g in enumerate(grads):
        if g is None:
            raise ValueError(
                f"importance_update: adapter tensor {t} (layer {t // 3}, lora_{KINDS[t % 3]}) has no gradient; "
                "call it after backward() and before zero_grad()"
            )
    return grads


class FlatLayout:
    """Offsets of every adapter tensor in the flat state, grouped by (kind, shape).

    ``shapes`` is one (r, k, d) per adapted layer (r may be 0). ``offsets[t]`` is the first
    element of tensor t in the flat buffers, ``triplet_offsets[i]`` the first position of layer
    i's triplets in the flat [sum(r)] score vector (layer order).
    """

    def __init__(self, shapes: Sequence[tuple[int, int, int]]):
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.ranks = [s[0] for s in self.shapes]
        self.n_layers = len(self.shapes)
        self.total_rank = sum(self.ranks)
        self.triplet_offsets = []
        acc = 0
        for r in self.ranks:
            self.triplet_offsets.append(acc)
            acc += r
        tensor_shapes = []
        for r, k, d in self.shapes:
            tensor_shapes += [(r, k), (d, r), (r, 1)]
        self.tensor_shapes = tensor_shapes
        order: dict = {}
        for t, shp in enumerate(tensor_shapes):
            order.setdefault((KINDS[t % 3], shp), []).append(t)
        self.offsets = [0] * len(tensor_shapes)
        groups = []
        start = 0
        for (kind, shp), members in order.items():
            n = 1
            for v in shp:
                n *= v
            for j, t in enumerate(members):
                self.offsets[t] = start + j * n
            groups.append(Group(kind, shp, tuple(members), tuple(t // 3 for t in members), start, n * len(members)))
            start += n * len(members)
        self.groups = groups
        self.numel = start
        self._cache: dict = {}

    def cached(self, key, build):
        """``build()`` once per ``key`` for this layout: the tables backends derive from it
        (positions, pointer-table geometry, C++ metadata) live and die with the layout."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build()
        return hit

    def numel_of(self, t: int) -> int:
        a, b = self.tensor_shapes[t]
        return a * b

    def group_positions(self, group: Group, device) -> torch.Tensor:
        """int64 positions in the [sum(r)] triplet vector of each row of ``group``'s reduced [L, r]."""

        def build():
            idx = []
            for layer in group.layers:
                o = self.triplet_offsets[layer]
                idx.extend(range(o, o + self.ranks[layer]))
            return torch.tensor(idx, dtype=torch.int64, device=device)

        return self.cached(("positions", group.start, group.kind, str(device)), build)

    def check(self, params: Sequence[torch.Tensor]) -> None:
        """Raise if ``params`` (A, B, E per layer) do not have the shapes this layout was built for."""
        if len(params) != len(self.tensor_shapes):
            raise ValueError(f"expected {len(self.tensor_shapes)} adapter tensors, got {len(params)}")
        for t, (p, shp) in enumerate(zip(params, self.tensor_shapes)):
            if tuple(p.shape) != shp:
                raise ValueError(
                    f"adapter tensor {t} (layer {t // 3}, lora_{KINDS[t % 3]}) has shape {tuple(p.shape)}, "
                    f"the allocator's layout expects {shp}; rebuild the allocator after resizing"
                )
