"""The flat layout every op module shares: the adapter-tensor index convention, the ranknum
epsilon, the missing-gradient error, and FlatLayout (where every adapter tensor's importance state
lives in the allocator's flat buffers). How the ops are registered and which implementation runs
is in ``registry.py``.

The allocator owns two flat fp32 buffers (EMA sensitivity ``m1`` and uncertainty ``m2``) that
hold the state of every A, B and E of every adapted layer. Tensors are ordered by *group*: all
tensors of one kind ("A", "B" or "E") and one shape are contiguous, so a group is a dense
[L, *shape] block. The torch backend reduces a whole group with one op; the triton backend walks
the per-tensor offsets with pointer tables. Tensors are numbered per layer: layer i has A at
index 3i ([r, k]), B at 3i+1 ([d, r]), E at 3i+2 ([r, 1]) (:func:`tensor_index`, the one place
that says so).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

KINDS = ("A", "B", "E")
KIND_A, KIND_B, KIND_E = 0, 1, 2
RANKNUM_EPS = 1e-5  # PEFT's ``scaling / (ranknum + 1e-5)``


def tensor_index(layer: int, kind: int) -> int:
    """Position of layer ``layer``'s A (kind 0), B (1) or E (2) in every per-tensor list."""
    return 3 * layer + kind


def layer_and_kind(t: int) -> tuple[int, int]:
    """Inverse of :func:`tensor_index`."""
    return divmod(t, 3)


def split_kinds(params: Sequence[torch.Tensor]) -> tuple[list, list, list]:
    """(every A, every B, every E) of a per-tensor list in :func:`tensor_index` order."""
    return list(params[KIND_A::3]), list(params[KIND_B::3]), list(params[KIND_E::3])


class MissingGradientError(ValueError, RuntimeError):
    """An adapter tensor has no gradient at update_and_allocate (a ValueError for the ops' callers,
    a RuntimeError as PEFT's crash on ``p.grad is None`` was)."""


def tensor_name(t: int, names: Sequence[str] = (), adapter: str = "") -> str:
    """``<module>.lora_<A|B|E>[.<adapter>]`` of adapter tensor ``t`` (``names``: module names by
    layer, when the caller knows them), else its index, layer and kind."""
    layer, kind = layer_and_kind(t)
    if names:
        return f"{names[layer]}.lora_{KINDS[kind]}" + (f".{adapter}" if adapter else "")
    return f"adapter tensor {t} (layer {layer}, lora_{KINDS[kind]})"


def missing_grad_error(t: int, names: Sequence[str] = (), adapter: str = "") -> MissingGradientError:
    """The one error for adapter tensor ``t`` without a gradient."""
    where = tensor_name(t, names, adapter)
    return MissingGradientError(
        f"update_and_allocate needs the gradients of the adapter weights, but {where} has no gradient; "
        "call it after loss.backward() (and optimizer.step()) and before optimizer.zero_grad()"
    )


@dataclass(frozen=True)
class Group:
    kind: str  # "A", "B" or "E"
    shape: tuple  # shape of one member
    members: tuple  # tensor indices (tensor_index(layer, kind))
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
            raise missing_grad_error(t)
    return grads


class FlatLayout:
    """Offsets of every adapter tensor in the flat state, grouped by (kind, shape).

    ``shapes`` is one (r, k, d) per adapted layer (r may be 0). ``offsets[t]`` is the first
    element of tensor t in the flat buffers, ``triplet_offsets[i]`` the first position of layer
    i's triplets in the flat [sum(r)] score vector (layer order).

    The registered ops take tensors and ints only: ``shape_table`` is ``shapes`` as an int64
    [L, 3] tensor of (r, k, d), and :meth:`of_shape_table` gives the layout back (cached while
    ``shape_table`` lives).
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
            tensor_shapes += [(r, k), (d, r), (r, 1)]  # tensor_index order: A, B, E
        self.tensor_shapes = tensor_shapes
        order: dict = {}
        for t, shp in enumerate(tensor_shapes):
            order.setdefault((KINDS[layer_and_kind(t)[1]], shp), []).append(t)
        self.offsets = [0] * len(tensor_shapes)
        groups = []
        start = 0
        for (kind, shp), members in order.items():
            n = 1
            for v in shp:
                n *= v
            for j, t in enumerate(members):
                self.offsets[t] = start + j * n
            layers = tuple(layer_and_kind(t)[0] for t in members)
            groups.append(Group(kind, shp, tuple(members), layers, start, n * len(members)))
            start += n * len(members)
        self.groups = groups
        self.numel = start
        self._cache: dict = {}
        self._checked: tuple = ()
        self._sizes = [torch.Size(shp) for shp in tensor_shapes]
        self.shape_table = torch.tensor(self.shapes, dtype=torch.int64).view(-1, 3)
        key = id(self.shape_table)
        _BY_SHAPE_TABLE[key] = (
            weakref.ref(self.shape_table, lambda _ref: _BY_SHAPE_TABLE.pop(key, None)),
            weakref.ref(self),
        )

    @staticmethod
    def of_shape_table(shape_table: torch.Tensor) -> "FlatLayout":
        """The layout ``shape_table`` was made from (rebuilt from its values if that layout is gone)."""
        hit = _BY_SHAPE_TABLE.get(id(shape_table))
        layout = hit[1]() if hit is not None and hit[0]() is shape_table else None
        return layout if layout is not None else FlatLayout([tuple(row) for row in shape_table.tolist()])

    def cached(self, key, build):
        """``build()`` once per ``key`` for this layout: the tables implementations derive from it
        (positions, pointer-table geometry, C++ metadata) live and die with the layout."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = build()
        return hit

    def numel_of(self, t: int) -> int:
        a, b = self.tensor_shapes[t]
        return a * b

    def kind_of(self, t: int) -> int:
        return layer_and_kind(t)[1]

    def group_positions(self, group: Group, device) -> torch.Tensor:
        """int64 positions in the [sum(r)] triplet vector of each row of ``group``'s reduced [L, r]."""

        def build():
            idx = []
            for layer in group.layers:
                o = self.triplet_offsets[layer]
                idx.extend(range(o, o + self.ranks[layer]))
            return torch.tensor(idx, dtype=torch.int64, device=device)

        return self.cached(("positions", group.start, group.kind, str(device)), build)

    def check_cached(self, params: Sequence[torch.Tensor], grads: Sequence = ()) -> None:
        """:meth:`check` of ``params`` and of their gradients (``grads``, or each ``p.grad`` when it
        is empty), every call. The full check runs when the tensors are new; for the tensors that
        passed it last time one list comparison of their shapes remains, since ``p.data = ...``
        keeps a parameter's identity and can still change its shape (a kernel reading by this
        layout would then read or write past the tensor)."""
        key = tuple(map(id, params))
        if key != self._checked:
            self.check(params)
            self._checked = key
        elif list(map(_SHAPE, params)) != self._sizes:
            self.check(params)
        gs = list(grads) if grads else list(map(_GRAD, params))
        try:
            ok = list(map(_SHAPE, gs)) == self._sizes
        except AttributeError:  # a missing gradient: the op raises its own error for it
            ok = False
        if not ok:
            for t, (g, shp) in enumerate(zip(gs, self.tensor_shapes)):
                if g is not None and tuple(g.shape) != shp:
                    layer, kind = layer_and_kind(t)
                    raise ValueError(
                        f"the gradient of adapter tensor {t} (layer {layer}, lora_{KINDS[kind]}) has shape "
                        f"{tuple(g.shape)}, the allocator's layout expects {shp}"
                    )

    def check(self, params: Sequence[torch.Tensor]) -> None:
        """Raise if ``params`` (A, B, E per layer) do not have the shapes this layout was built for."""
        if len(params) != len(self.tensor_shapes):
            raise ValueError(f"expected {len(self.tensor_shapes)} adapter tensors, got {len(params)}")
        for t, (p, shp) in enumerate(zip(params, self.tensor_shapes)):
            if tuple(p.shape) != shp:
                layer, kind = layer_and_kind(t)
                raise ValueError(
                    f"adapter tensor {t} (layer {layer}, lora_{KINDS[kind]}) has shape {tuple(p.shape)}, "
                    f"the allocator's layout expects {shp}; rebuild the allocator after resizing"
                )


_SHAPE = operator.attrgetter("shape")
_GRAD = operator.attrgetter("grad")


# id(shape table) -> (weak ref to it, weak ref to its layout); an entry goes when its shape table is
# collected. Keyed by id, not by the tensor: tensors compare elementwise, so they make poor dict keys.
_BY_SHAPE_TABLE: dict = {}
