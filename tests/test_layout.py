"""FlatLayout (``ops/layout.py``): where every adapter tensor's importance state lives in the
allocator's flat buffers, the tensor index convention, and the shape table the registered ops take.
"""

from __future__ import annotations

import pytest
import torch

from adalora_fast.ops import FlatLayout
from adalora_fast.ops.layout import KIND_A, KIND_B, KIND_E, split_kinds, tensor_index
from tiny_models import LAYOUT_SHAPES, adapter_params


def test_layout_offsets_cover_state_once():
    layout = FlatLayout(LAYOUT_SHAPES)
    assert layout.numel == sum(r * k + d * r + r for r, k, d in LAYOUT_SHAPES)
    assert layout.total_rank == sum(r for r, _, _ in LAYOUT_SHAPES)
    covered = torch.zeros(layout.numel, dtype=torch.int64)
    for t in range(len(layout.tensor_shapes)):
        o = layout.offsets[t]
        covered[o : o + layout.numel_of(t)] += 1
    assert torch.all(covered == 1)
    with pytest.raises(ValueError, match="shape"):
        bad = adapter_params(LAYOUT_SHAPES, torch.Generator().manual_seed(0))
        bad[0] = torch.zeros(5, 8)
        layout.check(bad)


def test_layout_tensor_index_and_split_kinds():
    params = adapter_params(LAYOUT_SHAPES, torch.Generator().manual_seed(0))
    As, Bs, Es = split_kinds(params)
    layout = FlatLayout(LAYOUT_SHAPES)
    for i, (r, k, d) in enumerate(LAYOUT_SHAPES):
        assert params[tensor_index(i, KIND_A)] is As[i] and As[i].shape == (r, k)
        assert params[tensor_index(i, KIND_B)] is Bs[i] and Bs[i].shape == (d, r)
        assert params[tensor_index(i, KIND_E)] is Es[i] and Es[i].shape == (r, 1)
        assert layout.tensor_shapes[tensor_index(i, KIND_B)] == (d, r)


def test_layout_of_shape_table_gives_the_layout_back():
    """The ops take ``layout.shape_table`` (a tensor) and find the layout (and its cached tables) again."""
    layout = FlatLayout(LAYOUT_SHAPES)
    assert FlatLayout.of_shape_table(layout.shape_table) is layout
    other = FlatLayout(LAYOUT_SHAPES)
    assert (
        FlatLayout.of_shape_table(other.shape_table) is other
        and FlatLayout.of_shape_table(layout.shape_table) is layout
    )
    rebuilt = FlatLayout.of_shape_table(layout.shape_table.clone())  # an equal table of no live layout: rebuilt
    assert rebuilt.shapes == layout.shapes and rebuilt.offsets == layout.offsets
