"""The split-K shrink and split-D grad_rank (``kernels/triton_ops/adapter_linear.py``): the host's choice
of the split factor, and the split kernels against ``reference.py`` in Triton's interpreter.

Unsplit, the shrink and grad_rank launch cdiv(N, 64) programs that each walk the whole width (k or
d): 128 programs for an H100's 132 SMs at N = 8192, latency-bound there. Split S ways, each program
walks a chunk of whole tiles and writes fp32 partials [S, N, r] that the consumer kernel (expand-add
for t, dA_dx for ge) sums in a fixed order as it loads them: no atomics for t or ge, the same
launches. Small layers stay unsplit (``split_plan``); the tests here force the factor
(``FORCE_SPLIT``) on shapes whose widths leave a remainder chunk, so the interpreter runs in seconds.

On a GPU machine (conftest's ``TRITON_DEVICE`` is CUDA) the same tests run the compiled kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TRITON_DEVICE

from adalora_fast import ops, reference
from adalora_fast.kernels import _launch
from adalora_fast.kernels import adapter_linear as ka
from tolerances import assert_close

DEV = TRITON_DEVICE


# ----------------------------------------------------------------------------- the host's choice
H100_SLOTS = 132 * 4  # 132 SMs, 4 resident split programs each


def test_split_plan_at_llama_7b_shapes_fills_one_wave():
    """N = 8192 on an H100: 128 row tiles, 528 resident programs: 4 ways at every 7B width (512
    programs), chunks of whole tiles, the last one the remainder at 11008."""
    slots = H100_SLOTS
    assert ka.split_plan(8192, 4096, ka.BLOCK_K, slots) == (4, 1024)
    assert ka.split_plan(8192, 11008, ka.BLOCK_K, slots) == (4, 43 * 64)  # 172 tiles: 43, 43, 43, 43
    assert ka.split_plan(8192, 4096, ka.GRAD_BLOCK_D, slots) == (4, 1024)
    assert ka.split_plan(8192, 11008, ka.GRAD_BLOCK_D, slots) == (4, 43 * 64)
    assert ka.split_plan(4096, 4096, ka.BLOCK_K, slots) == (8, 512)  # 64 row tiles: SPLIT_MAX
    assert ka.split_plan(16384, 4096, ka.BLOCK_K, slots) == (2, 2048)
    assert ka.split_plan(16896, 4096, ka.BLOCK_K, slots) == (2, 2048)  # 264 row tiles: 2 x 264 <= 528
    assert ka.split_plan(16897, 4096, ka.BLOCK_K, slots) == (1, 0)  # 265: a second way would not fit
    assert ka.split_plan(33792, 4096, ka.BLOCK_K, slots) == (1, 0)  # 528 row tiles fill the wave alone
    assert ka.split_plan(8192, 4096, ka.BLOCK_K, 108 * 3) == (2, 2048)  # an A100: 324 // 128 = 2 ways


def test_split_plan_keeps_small_layers_unsplit():
    for rows, width in [(16, 64), (64, 48), (8192, 64), (8192, 960), (1, 960), (70, 300), (4096, 1)]:
        assert ka.split_plan(rows, width, ka.BLOCK_K, H100_SLOTS) == (1, 0), (rows, width)
    assert ka.split_plan(64, 1024, ka.BLOCK_K, H100_SLOTS) == (2, 512)  # 16 tiles: two chunks of 8


@pytest.mark.parametrize("block", [64, 32, 16])  # the tiles of the width the launchers use
@pytest.mark.parametrize("slots", [1, 108 * 3, H100_SLOTS])
def test_split_plan_chunks_cover_the_width_and_none_is_empty(slots, block):
    for rows in (1, 63, 64, 700, 8192, 20000):
        for width in (1, 63, 64, 65, 960, 961, 1024, 3000, 4096, 4100, 11008):
            for force in (None, 1, 2, 3, 5, 64, 1000):
                s, chunk = ka.split_plan(rows, width, block, slots, force)
                if s == 1:
                    assert chunk == 0
                    continue
                assert chunk % block == 0 and chunk > 0
                assert (s - 1) * chunk < width <= s * chunk, (rows, width, force, s, chunk)
                if force is None:
                    assert s <= ka.SPLIT_MAX and chunk >= ka.SPLIT_MIN_WIDTH
                    assert math.ceil(rows / ka.BLOCK_N) * s <= slots
                else:
                    assert s <= force


def test_forced_factor_with_a_remainder():
    assert ka.split_plan(70, 300, 64, H100_SLOTS, 3) == (3, 128)  # 5 tiles: 128 + 128 + 44 columns
    assert ka.split_plan(70, 330, 64, H100_SLOTS, 3) == (3, 128)  # 6 tiles: 128 + 128 + 74
    assert ka.split_plan(70, 300, 64, H100_SLOTS, 2) == (2, 192)  # 192 + 108
    assert ka.split_plan(70, 200, 64, H100_SLOTS, 3) == (2, 128)  # 4 tiles cannot make 3 non-empty chunks
    assert ka.split_plan(70, 300, 64, H100_SLOTS, 1) == (1, 0)


def test_the_launchers_shortcut_agrees_with_split_plan():
    """_plan_split skips split_plan for widths it never splits (the host path of small layers)."""
    cpu = torch.device("cpu")
    assert ka.split_slots(cpu) == ka.SPLIT_SMS_CPU * ka.SPLIT_PROGRAMS_PER_SM == H100_SLOTS
    for block in (64, 32, 16):
        for rows in (1, 64, 8192):
            for width in range(ka._SPLIT_MAX_UNSPLIT_WIDTH - 70, ka._SPLIT_MAX_UNSPLIT_WIDTH + 140, 7):
                got = ka._plan_split(rows, width, block, cpu)
                assert got == ka.split_plan(rows, width, block, H100_SLOTS), (block, rows, width)


# ----------------------------------------------------------------------------- the layer against the reference
class _Grids:
    """Records each layer kernel's grid through the one launch hook."""

    def __init__(self, monkeypatch):
        self.grids: dict = {}
        real = _launch.launch

        def rec(kernel, grid, *a, **kw):
            self.grids.setdefault(getattr(kernel, "__name__", None) or kernel.fn.__name__, []).append(grid)
            return real(kernel, grid, *a, **kw)

        monkeypatch.setattr(_launch, "launch", rec)


def _inputs(N, k, d, r, dtype, seed, adapter_dtype=None):
    """One layer's inputs: base (x, W, b, the output gradient) in ``dtype``, adapters in
    ``adapter_dtype`` (default ``dtype``)."""
    adt = adapter_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, k, generator=g).to(dtype)
    W = (torch.randn(d, k, generator=g) / k**0.5).to(dtype)
    b = (torch.randn(d, generator=g) * 0.1).to(dtype)
    A = (torch.randn(r, k, generator=g) / k**0.5).to(adt)
    E = torch.randn(r, 1, generator=g).to(adt)
    B = (torch.randn(d, r, generator=g) * 0.5).to(adt)
    go = torch.randn(N, d, generator=g).to(dtype)
    return x, W, b, A, E, B, torch.tensor([float(r)]), go


def _run(fn, x, W, b, A, E, B, rk, go, p, keep):
    leaves = [v.detach().clone().requires_grad_() for v in (x, A, E, B)]
    if fn is ops.adapter_linear:
        out = fn(leaves[0], W, b, *leaves[1:], 4.0, rk, dropout_p=p, training=True, seed=11)
    else:
        out = fn(leaves[0], W, b, *leaves[1:], 4.0, rk, p, False, keep)
    grads = torch.autograd.grad(out, leaves, go)
    return out, grads


# (force, N, k, d): shrink chunks and grad_rank chunks; k and d not multiples of the chunk
SPLITS = [
    (2, 70, 300, 330),  # shrink 192 + 108 columns, grad_rank 192 + 138
    (3, 70, 300, 330),  # shrink 128 + 128 + 44, grad_rank 128 + 128 + 74
    (3, 5, 200, 136),  # one partial row tile; shrink 128 + 72 (4 tiles: 2 ways), grad_rank 64 + 64 + 8
]


@pytest.mark.parametrize("force,N,k,d", SPLITS)
@pytest.mark.parametrize("r", [1, 12], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=["fp32", "bf16", "fp16", "bf16-base-fp32-adapters", "fp16-base-fp32-adapters"],
)
def test_split_layer_matches_reference(use_backend, monkeypatch, force, N, k, d, r, p, dtype, adapter_dtype):
    """Forward and dx, dA, dE, dB of the forced-split layer against reference.py on the keep mask
    the kernels draw (every (base, adapter) dtype pair the kernels take); the grids show the split
    happened (shrink (row tiles, S_k), grad_rank (row tiles, S_d)) with no extra launch.
    Tolerance: the base dtype's."""
    use_backend("triton")
    monkeypatch.setattr(ka, "FORCE_SPLIT", force)
    x, W, b, A, E, B, rk, go = _inputs(N, k, d, r, dtype, seed=force * 100 + r, adapter_dtype=adapter_dtype)
    rec = _Grids(monkeypatch)
    out, grads = _run(ops.adapter_linear, x, W, b, A, E, B, rk, go, p, None)
    kws = ka.layer_kwargs(A.dtype, r, dtype)  # the configuration's tiles (narrower for bf16x3 at R_PAD 64)
    sk = ka.split_plan(N, k, kws["shrink"]["BLOCK_K"], H100_SLOTS, force)[0]
    sd = ka.split_plan(N, d, kws["grad_rank"]["BLOCK_D"], H100_SLOTS, force)[0]
    assert sk > 1 and sd > 1
    rows = -(-N // ka.BLOCK_N)
    assert rec.grids == {
        "_shrink_kernel": [(rows, sk)],
        "_expand_add_kernel": [(rows, -(-d // kws["expand_add"]["BLOCK_D"]))],
        "_grad_rank_kernel": [(rows, sd)],
        "_dA_dx_kernel": [(rows, -(-k // kws["dA_dx_split"]["BLOCK_K"]))],
    }
    keep = ops.dropout_keep_mask(11, (N, k), p, "cpu") if p else None
    rout, rgrads = _run(reference.adapter_linear, x, W, b, A, E, B, rk, go, p, keep)
    assert_close(out, rout, dtype, "forward")
    for name, a, e in zip(("dx", "dA", "dE", "dB"), grads, rgrads):
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_bf16x3_r_pad_64_layer_matches_reference(use_backend, monkeypatch, dtype):
    """fp32 adapters on a half base at r = 40 (R_PAD 64, bf16x3 on the narrower tiles of
    ``BF16X3_R64_CONSTEXPRS``), split 3 ways, with dropout: as the test above."""
    test_split_layer_matches_reference(use_backend, monkeypatch, 3, 70, 300, 330, 40, 0.1, dtype, torch.float32)


def test_strided_x_split():
    """x read through a column stride by the split shrink (the chunk offsets in int64 too)."""
    torch.manual_seed(6)
    xt = torch.randn(300, 70, device=DEV)
    x = xt.t()  # [70, 300], strides (1, 70)
    A = torch.randn(12, 300, device=DEV) / 300**0.5
    parts = ka.shrink(x, A, 0.0, None, split=3)
    assert parts.shape == (3, 70, 12)
    assert_close(parts.sum(0), x @ A.t(), what="t")


@pytest.mark.parametrize("r", [1, 12, 20], ids=lambda r: f"r{r}")  # R_PAD 16, 16, 64
def test_split_kernels_against_unsplit_and_torch(r):
    """The single-kernel launchers (bench/gpu_check.py times them): the split shrink's partials sum to
    the unsplit t; the expand-add summing them adds what the unsplit one adds and returns their
    sum; the split grad_rank's ge partials sum to the unsplit ge and give the same dB and dE; dA_dx
    summing them gives the same dA and dx; all against torch products in fp32."""
    torch.manual_seed(r)
    N, k, d = 70, 300, 330
    x, A = torch.randn(N, k, device=DEV), torch.randn(r, k, device=DEV) / k**0.5
    E, B = torch.randn(r, 1, device=DEV), torch.randn(d, r, device=DEV)
    rk, s = torch.tensor([float(r)], device=DEV), 4.0 / (r + 1e-5)
    e = E.view(-1) * s
    t = ka.shrink(x, A, 0.0, None)
    parts = ka.shrink(x, A, 0.0, None, split=3)
    assert parts.shape == (3, N, r) and t.shape == (N, r)
    assert_close(t, x @ A.t(), what="t")
    assert_close(parts.sum(0), t, what="Σ partials of t")
    out1, out3 = torch.ones(N, d, device=DEV), torch.ones(N, d, device=DEV)
    assert ka.expand_add(out1, t, E, B, rk, 4.0) is None
    t_sum = ka.expand_add(out3, parts, E, B, rk, 4.0)
    assert_close(t_sum, t, what="t written by the expand-add")
    assert_close(out3, out1, what="out")
    assert_close(out1 - 1.0, (t * e) @ B.t(), what="adapter term")
    g = torch.randn(N, d, device=DEV)
    acc = [torch.zeros(n, device=DEV) for n in (d * r, r, d * r, r)]
    ge1 = torch.empty(N, r, device=DEV)
    ge3 = torch.empty(3, N, r, device=DEV)
    ka.grad_rank(g, t, E, B, rk, 4.0, ge1, acc[0], acc[1])
    ka.grad_rank(g, t, E, B, rk, 4.0, ge3, acc[2], acc[3])
    gB = g @ B
    assert_close(ge1, gB * e, what="ge")
    assert_close(ge3.sum(0), ge1, what="Σ partials of ge")
    assert_close(acc[0].view(d, r), g.t() @ (t * e), what="dB")
    assert_close(acc[2], acc[0], what="dB split")
    assert_close(acc[1], (gB * t).sum(0) * s, what="dE")
    assert_close(acc[3], acc[1], what="dE split")
    with pytest.raises(ValueError, match="3 partials, but d = 200 splits 2 ways"):  # 4 tiles: chunks of 2
        ka.grad_rank(g[:, :200].contiguous(), t, E, B[:200].contiguous(), rk, 4.0, ge3, acc[2], acc[3])
    dA1, dA3 = torch.zeros(r, k, device=DEV), torch.zeros(r, k, device=DEV)
    dx1, dx3 = torch.zeros(N, k, device=DEV), torch.zeros(N, k, device=DEV)
    ka.dA_dx(x, ge1, A, dx1, dA1, 0.0, None)
    ka.dA_dx(x, ge3, A, dx3, dA3, 0.0, None)
    assert_close(dA1, ge1.t() @ x, what="dA")
    assert_close(dA3, dA1, what="dA split")
    assert_close(dx1, ge1 @ A, what="dx")
    assert_close(dx3, dx1, what="dx split")


def test_split_forward_repeats_bit_for_bit(use_backend, monkeypatch):
    """The partials are summed in a fixed order by every program that reads them: two forwards give
    the same out and t bit for bit, and the t saved for backward is the sum the expand-add used."""
    use_backend("triton")
    monkeypatch.setattr(ka, "FORCE_SPLIT", 3)
    x, W, b, A, E, B, rk, _ = _inputs(70, 300, 330, 12, torch.float32, seed=3)
    x, A, E, B, rk = (v.to(DEV) for v in (x, A, E, B, rk))
    seed = torch.tensor([5], device=DEV)
    outs = []
    for _ in range(2):
        out = torch.zeros(70, 330, device=DEV)
        t = ka.forward(x, A, E, B, rk, 4.0, 0.1, seed, out)
        outs.append((out, t))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    e = (E.view(-1) * (4.0 / (12 + 1e-5))).float()
    assert_close(outs[0][0], (outs[0][1] * e) @ B.t(), what="out from the saved t")


def test_wide_layer_splits_by_itself_with_the_same_launches(use_backend, monkeypatch):
    """Without forcing: k = d = 1024 at 64 tokens is 16 tiles, so the plan splits 2 ways (the one
    row tile leaves 131 SMs idle); still 2 launches each way, and the reference's numbers."""
    use_backend("triton")
    x, W, b, A, E, B, rk, go = _inputs(64, 1024, 1024, 4, torch.float32, seed=9)
    rec = _Grids(monkeypatch)
    out, grads = _run(ops.adapter_linear, x, W, b, A, E, B, rk, go, 0.0, None)
    assert rec.grids["_shrink_kernel"] == [(1, 2)] and rec.grids["_grad_rank_kernel"] == [(1, 2)]
    assert sum(len(v) for v in rec.grids.values()) == 4
    rout, rgrads = _run(reference.adapter_linear, x, W, b, A, E, B, rk, go, 0.0, None)
    assert_close(out, rout, what="forward")
    for name, a, e in zip(("dx", "dA", "dE", "dB"), grads, rgrads):
        assert_close(a, e, what=name)


def test_small_layer_stays_unsplit(use_backend, monkeypatch):
    """The host path's layer (k = d = 64) and the suite's small shapes launch the unsplit kernels."""
    use_backend("triton")
    x, W, b, A, E, B, rk, go = _inputs(16, 64, 64, 12, torch.float32, seed=1)
    rec = _Grids(monkeypatch)
    _run(ops.adapter_linear, x, W, b, A, E, B, rk, go, 0.1, None)
    assert rec.grids["_shrink_kernel"] == [(1,)] and rec.grids["_grad_rank_kernel"] == [(1,)]


def test_forced_factor_one_runs_the_unsplit_kernels(use_backend, monkeypatch):
    """FORCE_SPLIT = 1 on a layer the plan would split (k = d = 1024, 64 tokens): the unsplit grids,
    and bit for bit what the unsplit single-kernel launchers compute."""
    use_backend("triton")
    monkeypatch.setattr(ka, "FORCE_SPLIT", 1)
    x, W, b, A, E, B, rk, go = _inputs(64, 1024, 1024, 4, torch.float32, seed=2)
    x, A, E, B, rk = (v.to(DEV) for v in (x, A, E, B, rk))
    rec = _Grids(monkeypatch)
    out = torch.zeros(64, 1024, device=DEV)
    t = ka.forward(x, A, E, B, rk, 4.0, 0.0, None, out)
    assert rec.grids == {"_shrink_kernel": [(1,)], "_expand_add_kernel": [(1, 8)]}
    t1 = ka.shrink(x, A, 0.0, None)
    out1 = torch.zeros(64, 1024, device=DEV)
    ka.expand_add(out1, t1, E, B, rk, 4.0)
    assert torch.equal(t, t1) and torch.equal(out, out1)


def test_registered_op_splits_too(use_backend, monkeypatch):
    """The registered op's path (a dispatch mode routes the call there; its backward keeps dA, dB, dE
    in buffers of their own) runs the same split launchers: the eager path's numbers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    use_backend("triton")
    monkeypatch.setattr(ka, "FORCE_SPLIT", 3)
    x, W, b, A, E, B, rk, go = _inputs(70, 300, 330, 12, torch.float32, seed=4)
    rec = _Grids(monkeypatch)
    out, grads = _run(ops.adapter_linear, x, W, b, A, E, B, rk, go, 0.1, None)
    with Passthrough():
        out2, grads2 = _run(ops.adapter_linear, x, W, b, A, E, B, rk, go, 0.1, None)
    assert type(out2.grad_fn).__name__ == "_AdapterLinearAutogradBackward"
    assert rec.grids["_shrink_kernel"] == [(2, 3)] * 2 and rec.grids["_grad_rank_kernel"] == [(2, 3)] * 2
    assert torch.equal(out, out2)
    for name, a, e in zip(("dx", "dA", "dE", "dB"), grads2, grads):
        assert_close(a, e, what=name)
