"""``torch.library.opcheck`` on every registered op, for every real implementation on the CPU.

opcheck checks the schema (declared mutations and aliasing), the fake (meta) implementation against
the real one, the registered autograd, and that the op traces through AOTAutograd with dynamic
shapes: what ``torch.compile`` relies on to keep a graph whole.

With a GPU (conftest's ``ON_GPU``) the "triton" runs build their tensors on CUDA (``device_for``),
so opcheck checks the compiled kernels; the layout's ``shape_table`` and the dropout seed stay on the CPU,
as the public calls pass them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import device_for

import adalora_fast.ops  # noqa: F401  (registers torch.ops.adalora_fast.*)
from adalora_fast.ops import FlatLayout

OPS = torch.ops.adalora_fast


def _layer_args(p, fifo=False, bias=True, r=5, requires_grad=True, dev="cpu"):
    g = torch.Generator().manual_seed(0)
    N, k, d = 9, 12, 10

    def leaf(*shape):  # drawn on the CPU (the same values on every device), a leaf on dev
        return torch.randn(*shape, generator=g).to(dev).requires_grad_(requires_grad)

    x = leaf(N, k)
    W = (torch.randn(k, d, generator=g) if fifo else torch.randn(d, k, generator=g)).to(dev)
    b = torch.randn(d, generator=g).to(dev) if bias else None
    A, E, B = (leaf(*s) for s in ((r, k), (r, 1), (d, r)))
    return (x, W, b, A, E, B, 2.0, torch.tensor([float(r)], device=dev), p, fifo, torch.tensor([1234]))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("fifo,bias", [(False, True), (True, False)])
def test_adapter_linear(impl, p, fifo, bias):
    torch.library.opcheck(OPS.adapter_linear, _layer_args(p, fifo, bias, dev=device_for(impl)))


def test_adapter_linear_backward(impl):
    dev = device_for(impl)
    x, W, b, A, E, B, scaling, rk, p, fifo, seed = _layer_args(0.25, requires_grad=False, dev=dev)
    _, t, seed = OPS.adapter_linear(x, W, b, A, E, B, scaling, rk, p, fifo, seed)
    g = torch.randn(x.shape[0], W.shape[0]).to(dev)
    for need_x, need_lora in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(
            OPS.adapter_linear_backward, (g, x, t, W, A, E, B, scaling, rk, p, fifo, seed, need_x, need_lora)
        )


def _allocator_args(want, dev="cpu"):
    L = FlatLayout([(3, 8, 6), (2, 5, 8), (3, 8, 6)])
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=g) for s in L.tensor_shapes]
    grads = [torch.randn(s, generator=g) for s in L.tensor_shapes]
    grads[1][0, 1] = float("nan")  # one element skipped: the counter is written too
    m1, m2 = torch.rand(L.numel, generator=g), torch.rand(L.numel, generator=g)
    skipped = torch.zeros(len(L.tensor_shapes), dtype=torch.int64)
    params, grads = [p.to(dev) for p in params], [t.to(dev) for t in grads]
    m1, m2, skipped = m1.to(dev), m2.to(dev), skipped.to(dev)
    return L, (params, grads, m1, m2, skipped, L.shape_table, 0.85, 0.8, L.total_rank, want)  # shape_table: CPU


@pytest.mark.parametrize("want", [False, True])
def test_importance_update(impl, want):
    _, args = _allocator_args(want, device_for(impl))
    torch.library.opcheck(OPS.importance_update, args)


def test_triplet_scores(impl):
    L, (_, _, m1, m2, _, shape_table, *_rest) = _allocator_args(True, device_for(impl))
    torch.library.opcheck(OPS.triplet_scores, (m1, m2, shape_table, L.total_rank))


@pytest.mark.parametrize("n_prune", [0, 3, 8])
def test_keep_mask_to_budget(impl, n_prune):
    torch.library.opcheck(OPS.keep_mask_to_budget, (torch.randn(8).to(device_for(impl)), n_prune))


def test_apply_mask(impl):
    dev = device_for(impl)
    Es = [torch.randn(3, 1).to(dev), torch.randn(2, 1).to(dev)]
    torch.library.opcheck(OPS.apply_mask, (Es, torch.tensor([True, False, True, False, True], device=dev)))


def test_orth_penalty(impl):
    dev = device_for(impl)
    g = torch.Generator().manual_seed(2)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dev).requires_grad_()

    As, Bs = [leaf(3, 8), leaf(2, 5)], [leaf(6, 3), leaf(8, 2)]
    torch.library.opcheck(OPS.orth_penalty, (As, Bs))
    As, Bs = [a.detach() for a in As], [b.detach() for b in Bs]  # no double backward: inputs need no grad
    loss, gram, norms = OPS.orth_penalty(As, Bs)
    torch.library.opcheck(OPS.orth_penalty_backward, (torch.tensor(1.0, device=dev), As, Bs, gram, norms))
