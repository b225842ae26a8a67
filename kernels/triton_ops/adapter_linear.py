"""Triton kernels of one adapted layer: shrink, expand-add, and the two backward kernels.

Notation: x [N, k] (N tokens, base dtype), W [d, k] frozen, A [r, k], E [r, 1], B [d, r] (adapter
dtype), s = scaling / (ranknum + eps) (formed inside each kernel from the [1] ``ranknum`` tensor in
device memory and the host float ``scaling``: no torch op per call, no host read of ``ranknum``, and a
captured CUDA graph reads the current ranknum at every replay), e = E * s (an r-vector folded inside
the kernels: no ``A*E`` tensor), p = dropout rate.
The rank is padded inside the kernels to R_PAD in {16, 64} with zeros (masked loads), so any
r <= 64 (init_r = 6, 12, 32 ...) runs on the tensor cores.

Forward (the op ``adalora_fast::adapter_linear`` in ``ops/adapter_linear.py`` owns autograd):
  1. out = x Wᵀ + b                                   cuBLAS (torch), 1 launch
  2. t = dropout(x) Aᵀ            [N, r] fp32        ``_shrink_kernel``, 1 launch, 1 pass over x
  3. out += (t ⊙ e) Bᵀ            in place           ``_expand_add_kernel``, 1 launch, 1 RMW of out
Saved for backward: x, t [N, r], W, A, E, B, ranknum, the seed. The dropped copy of x is never
written: dropout is regenerated from the seed (Philox) wherever x is read. The seed is a [1] int64
tensor in device memory that the kernels load (drawn on the device by the caller, see
``ops/adapter_linear.py``): no host value, so a CUDA graph replays a fresh seed at each replay.

Backward with g = dout [N, d] (any strides, stride 0 included):
  1. dx = g W                                         cuBLAS (torch), 1 launch
  2. gB = g B; dB = gᵀ(t ⊙ e); dE = s Σₙ gB ⊙ t; ge = gB ⊙ e
                                                      ``_grad_rank_kernel``, 1 launch, 1 pass over g
  3. dA = geᵀ dropout(x); dx += mask ⊙ (ge A)/(1-p)   ``_dA_dx_kernel``, 1 launch, 1 pass over x,
                                                      1 RMW of dx
  + one memset of the flat fp32 [r·k + d·r + r] accumulator of dA, dB, dE (fp32 atomics; dA at 0, dB
  at r·k, dE at r·k + d·r), + one cast of it when the adapter dtype is half.

Split-K / split-D (:func:`split_plan`; wide layers whose cdiv(N, 64) row tiles leave SMs idle, e.g.
N = 8192 at k or d >= 4096 on an H100): the shrink and grad_rank launch S programs per row tile, each
over a chunk of whole tiles of the width, and write fp32 partials [S, N, r] of t / ge (4·S·N·r bytes);
the expand-add / dA_dx sum them in the fixed order s = 0 .. S-1 as they load them (the expand-add
then writes t). Still 2 launches each way, no atomics for t or ge, the forward deterministic; S = 1
is the single-pass kernels above, compiled to the same binaries. kernels/COST.md has the bytes,
the grids per SM and the predicted times.

Dropout keep mask: element (n, c) of x [N, k] is kept iff a 16-bit uniform value is >= thresh =
round(p·65536) (keep probability 1 - thresh/65536, within 8e-6 of 1-p); one Philox-4x32-10 call
(``tl.randint4x(seed, counter)``, counter = n·ceil(k/8) + c//8) yields the 16-bit values of 8
consecutive columns, so the mask depends only on (seed, n, c, k), never on block sizes or strides.

Costs for LLaMA-7B shapes are in each kernel's docstring, predicted from bytes and FLOPs at a
roofline of 3.0 TB/s and 790 TFLOP/s bf16; ``kernels/COST.md`` has how they were derived and what a
GPU measured against them (``bench/gpu_check.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import INTERPRET, RANK_PADS, TL_DTYPE, dot_precision, pad_rank

BLOCK_N = 64  # rows of x / out / g per tile (M of the tensor-core tiles: >= 64 for HGMMA)
BLOCK_K = 64  # columns of x per tile (multiple of 8: the dropout counter groups 8 columns)
NUM_WARPS = 4
# Launch configurations: the fastest candidates of ``bench/gpu_check.py --sweep`` (bf16, r = 12, LLaMA-7B
# widths; the timings are in kernels/COST.md). The shrink streams x with 5 pipeline stages, which hide
# more of each program's serial walk over k. dA_dx runs one row tile and 128 columns per program:
# more programs in flight beat fewer dA atomics. grad_rank keeps 64-column tiles of g: 128-column
# tiles reach 255 registers and spill at R_PAD 64 and with fp32 adapters (bench/compile_check.py).
SHRINK_STAGES = 5
GRAD_BLOCK_D = 64
EXPAND_BLOCK_D = 128
DA_BLOCK_K = 128
DA_ROW_BLOCKS = 1
DA_STAGES = 2
# Split-K shrink / split-D grad_rank (:func:`split_plan`): unsplit, both launch cdiv(N, BLOCK_N) programs
# that walk the whole width, 128 programs for 132 SMs at N = 8192, and the H100 measured them at
# 1.9-3.4x their bandwidth bound (kernels/COST.md). Split S ways they launch S x as many programs,
# each over a chunk of whole tiles. S is sized so that the grid fills one wave of the programs
# resident per SM (more than fit would leave a second, mostly empty wave): SPLIT_PROGRAMS_PER_SM = 4
SPLIT_PROGRAMS_PER_SM_PRE_HOPPER = 3
# on sm_90 (the split shrink's 5-stage shared memory, 4 x 52 KB of 228 KB; the split grad_rank's
# 128 registers x 128 threads, 4 x 16 K of 64 K), 3 before it (sm_8x: 164 KB hold 3 of the shrink's
# 49 KB; grad_rank's 168 registers, 3 x 21 K), with at least SPLIT_MIN_WIDTH columns per chunk
# (8 tiles of 64, 16 of 32, 32 of 16: a partial's r·4 bytes per row and chunk against >= 512 x 2
# bytes of bf16 x or g per row walked, <= 1/16 at r <= 16, 1/4 at r = 64) and at most SPLIT_MAX ways.
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_WIDTH = 512
SPLIT_MAX = 8
# The split-D grad_rank with "bf16x3" products pipelines g in 2 stages, not Triton's default 3: at 3 its
# unaligned-width sm_80 binary kept 8 bytes of stack at ptxas's 168-register cap (the split adds the
# chunk end as a live register); at 2 none, and ~4 programs per SM hide the latency a stage would.
GRAD_SPLIT_BF16X3_STAGES = 2
# An fp16 base's bf16x3 grad_rank (g in two bf16 parts: 5 products per g dot, not 3) reaches 254-255
# registers at 4 warps on sm_90; 8 warps and one stage keep it at 224-234 (sm_90) / 177-180 (sm_80)
# with no spills (kernels/COST.md, "fp32 adapters at R_PAD 64 and on an fp16 base").
GRAD_FP16_BF16X3_WARPS, GRAD_FP16_BF16X3_STAGES = 8, 1
# bf16x3 at R_PAD 64 (fp32 adapters at r in (16, 64] on a half base), by base dtype (an fp16 x or g
# holds two bf16 parts live, a bf16 one one): the shrink's and grad_rank's tiles of the width are
# narrower, and dA_dx always runs its split binary (with one partial when unsplit: the same sum),
# which compiles clean at the 128-column tile where the unsplit one spills on sm_80; at the tiles
# above the shrink, grad_rank and unsplit dA_dx spill (kernels/COST.md, "fp32 adapters at R_PAD 64
# and on an fp16 base"). The same constexprs for the split and unsplit launches.
BF16X3_R64_CONSTEXPRS = {
    torch.bfloat16: {"shrink": {"BLOCK_K": 32}, "grad_rank": {"BLOCK_D": 32}, "dA_dx": {"SPLIT": True}},
    torch.float16: {"shrink": {"BLOCK_K": 32}, "grad_rank": {"BLOCK_D": 16}, "dA_dx": {"SPLIT": True}},
}
SPLIT_SMS_CPU = 132  # the SMs the interpreter (CPU tensors) plans for: an H100's, as on the GPU
# Tests force a split factor here (an int: the shrink and grad_rank both split that many ways where
# the width has that many tiles, see split_plan); None: chosen from the shapes and the SM count.
FORCE_SPLIT = None
RANKNUM_EPS = 1e-5  # as ops/layout.RANKNUM_EPS (PEFT's): s = scaling / (ranknum + 1e-5)
_EPS = tl.constexpr(RANKNUM_EPS)  # a kernel reads globals only as constexprs

# (base dtype, adapter dtype) pairs the kernels are compiled for: the adapter dtype is fp32
# (PEFT's default, autocast_adapter_dtype=True) or the base dtype (autocast, or all-fp32 models).
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
)

# Not specialised (one binary whatever their value): N changes with every batch, R is tiny, the flags
# are runtime branches, the gradient offsets change with the layer, and the seed pointer (a new [1]
# tensor per step) must not pick a binary by its alignment.
# n_split (the split kernels' partial count) is not specialised either: one binary for every count.
# K and D are specialised (Triton's %16 divisibility): a layer's widths are fixed, and knowing they
# are multiples of 16 lets the column masks stay constant over 8-element groups, so the streaming
# loads of x / g / out / dx are 128-bit and the tile loops can use async copies (COST.md). So are the
# split kernels' chunk widths k_chunk / d_chunk: always multiples of the tile width (0 when unsplit),
# so one key, and the chunk starts keep the column offsets' divisibility (128-bit loads, checked by
# tests/test_triton_compile.py).
_INT_ARGS = ["SEED", "N", "R", "thresh", "has_dropout", "need_dx", "db_off", "de_off", "n_split"]


def check_dtypes(base: torch.dtype, adapter: torch.dtype) -> None:
    if (base, adapter) not in DTYPE_PAIRS:
        raise TypeError(
            f"triton backend: base dtype {base} with adapter dtype {adapter} is not supported; supported "
            f"(base, adapter) pairs: {[(str(a), str(b)) for a, b in DTYPE_PAIRS]} (cast lora_A/E/B to "
            "fp32, or use ADALORA_FAST_BACKEND=torch)"
        )


def dropout_threshold(dropout_p: float) -> int:
    """16-bit threshold: an element is kept iff its 16-bit Philox value is >= this (65536 at p = 1:
    nothing is kept)."""
    return int(round(float(dropout_p) * 65536.0))


_DROPOUT_ARGS: dict = {}


def dropout_args(dropout_p: float) -> tuple:
    """(thresh, 1/(1-p), has_dropout) for a launch, cached per rate; p = 1 drops everything (scale 0,
    as ``nn.Dropout(1.0)``) instead of dividing by zero."""
    a = _DROPOUT_ARGS.get(dropout_p)
    if a is None:
        p = float(dropout_p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout_p={dropout_p} must lie in [0, 1]")
        a = (0, 1.0, 0) if p == 0.0 else (dropout_threshold(p), (1.0 / (1.0 - p) if p < 1.0 else 0.0), 1)
        if len(_DROPOUT_ARGS) < 64:
            _DROPOUT_ARGS[dropout_p] = a
    return a


def seed_tensor(seed, device) -> torch.Tensor:
    """A seed as the kernels read it: a [1] int64 tensor on ``device`` (an int or a tensor given)."""
    if torch.is_tensor(seed):
        return seed.detach().reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def _seed_arg(seed, dropout_p, device) -> torch.Tensor:
    # the hot path passes the [1] int64 seed tensor on the device as it is
    if not dropout_p or seed is None:
        return no_seed(device)
    if type(seed) is torch.Tensor and seed.dtype == torch.int64 and seed.device == device:
        return seed
    return seed_tensor(seed, device)


_NO_SEED: dict = {}


def no_seed(device) -> torch.Tensor:
    """The [1] int64 tensor passed as the seed when dropout is off (the kernels never read it), one per device."""
    t = _NO_SEED.get(device)
    if t is None:
        t = _NO_SEED[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


@triton.jit
def _keep_tile(seed, rows, col0, K, thresh, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool [BLOCK_N, BLOCK_K]: the keep mask of rows ``rows`` (int64), columns col0 + [0, BLOCK_K).

    col0 and BLOCK_K are multiples of 8. One Philox call per 8 columns (4 x 32 bits = 8 x 16 bits).
    """
    kc = (K + 7) // 8
    ctr = rows[:, None] * kc + (col0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    v01 = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
    v23 = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
    v = tl.reshape(tl.join(v01, v23), (BLOCK_N, BLOCK_K))
    return v.to(tl.int32) >= thresh


@triton.jit
def _scale(RK, scaling):
    """s = scaling / (ranknum + eps) in fp32, once per program (a plain division, within 2 ulp of
    torch's reciprocal-then-product: an IEEE-rounded ``div_rn`` added ~110 SASS instructions to
    every expand-add program)."""
    return scaling / (tl.load(RK).to(tl.float32) + _EPS)


@triton.jit
def _bf16_parts(v, UPCAST: tl.constexpr):
    """An fp32 tile as three bf16 parts, v = p0 + p1 + p2 to within ~2^-24 of v (each part the
    rounded remainder of the ones before). Under the interpreter (``UPCAST``) the parts come back
    upcast to fp32 (its bf16 dots are wrong; the values are the same)."""
    p0 = v.to(tl.bfloat16)
    r = v - p0.to(tl.float32)
    p1 = r.to(tl.bfloat16)
    p2 = (r - p1.to(tl.float32)).to(tl.bfloat16)
    if UPCAST:
        return p0.to(tl.float32), p1.to(tl.float32), p2.to(tl.float32)
    return p0, p1, p2


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, A_PARTS: tl.constexpr, B_PARTS: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. ``DOT_PREC`` "bf16x3" (fp32 adapters on a half base under torch's full-fp32
    default, :func:`layer_precision`; FMA dots spill at these tiles): each fp32 operand
    split into bf16 parts
    (:func:`_bf16_parts`; ``A_PARTS`` / ``B_PARTS`` of them are used: 1 for values exact in bf16, a
    bf16 base's x or g; 2 for an fp16 base's, exact in two; 3 for fp32 values) and the products of
    parts whose orders sum below the largest part count kept, on the tensor cores, accumulated in
    fp32: x (bf16) · A is 3 products, g (fp16) · B 5, u · B (both fp32) 6, each accurate to ~2^-24
    of the product like an fp32 one. Two parts (the classic bf16x3, ~2^-16) were not enough: where
    the adapter term cancels the base output to near zero, the output PEFT rounds from an fp32 sum
    came out tens of its ulps away. Any other ``DOT_PREC`` is ``tl.dot``'s input precision on the
    operands as they are."""
    if DOT_PREC == "bf16x3":
        a0, a1, a2 = _bf16_parts(a, UPCAST)
        b0, b1, b2 = _bf16_parts(b, UPCAST)
        acc = tl.dot(a0, b0, acc)
        if B_PARTS > 1:
            acc = tl.dot(a0, b1, acc)
        if A_PARTS > 1:
            acc = tl.dot(a1, b0, acc)
        if A_PARTS > 2 or B_PARTS > 2:  # third-order terms: fp32-class
            if B_PARTS > 2:
                acc = tl.dot(a0, b2, acc)
            if A_PARTS > 1 and B_PARTS > 1:
                acc = tl.dot(a1, b1, acc)
            if A_PARTS > 2:
                acc = tl.dot(a2, b0, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _fold_e(E, s, rr, R):
    """e = E * s as an fp32 [R_PAD] vector, 0 in the pad."""
    ev = tl.load(E + rr, mask=rr < R, other=0.0).to(tl.float32)
    return ev * s


@triton.jit
def _sum_partials(P, row0, N, R, n_split, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """fp32 [BLOCK_N, R_PAD]: Σ_s P[s, row0 + i, j] over s = 0, 1, ..., n_split - 1 in that order (so
    every caller forms the same value, bit for bit), 0 outside [N, R); P an fp32 [n_split, N, R]
    workspace of partials. Loaded as flat [BLOCK_N·R_PAD] vectors (a plain blocked layout: one
    element per thread and partial, no replication) and reshaped once after the sum; loaded as
    2-D tiles the partials took the dot-operand layout of their consumer, 4x replicated (32 loads
    per thread and partial instead of 8 in the sm_90 SASS)."""
    idx = tl.arange(0, BLOCK_N * R_PAD)
    rows = row0 + idx // R_PAD
    cols = idx % R_PAD
    m = (rows < N) & (cols < R)
    ptr = P + rows * R + cols
    part = N.to(tl.int64) * R  # elements per partial
    acc = tl.load(ptr, mask=m, other=0.0)
    for sp in range(1, n_split):
        acc += tl.load(ptr + sp * part, mask=m, other=0.0)
    return tl.reshape(acc, (BLOCK_N, R_PAD))


@triton.jit(do_not_specialize=_INT_ARGS)
def _dropout_keep_mask_kernel(OUT, SEED, N, K, thresh, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the bool keep mask [N, K] the other kernels draw for the seed at ``SEED`` (tests, debugging).

    Bytes: N·K (bool). Not on the training path.
    """
    seed = tl.load(SEED)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, rows, col0, K, thresh, BLOCK_N, BLOCK_K)
    m = (rows[:, None] < N) & (cols[None, :] < K)
    tl.store(OUT + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=m)


@triton.jit(do_not_specialize=_INT_ARGS)
def _shrink_kernel(
    X,
    A,
    T,
    SEED,
    N,
    K,
    R,
    stride_xn,
    stride_xk,
    thresh,
    inv_keep,
    has_dropout,
    k_chunk,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """t[N, r] (fp32) = dropout(x)[N, k] @ A[r, k]ᵀ; grid (cdiv(N, BLOCK_N),), or split-K
    (``SPLIT``) grid (cdiv(N, BLOCK_N), S): program (i, s) sums columns [s·k_chunk, (s+1)·k_chunk) ∩
    [0, k) (k_chunk a multiple of BLOCK_K) into the fp32 partial T[s] of the workspace [S, N, r];
    the expand-add sums the S partials in a fixed order as it loads them and writes t (deterministic,
    no atomics). The dropout mask is drawn per global column, so it is the same whatever S is.

    One pass over x (any strides); A re-read per row tile from L2; the dropped x lives only in
    registers. FLOPs 2·N·k·R_PAD (tensor cores). LLaMA-7B (N=8192, k=4096, r=12→16, bf16 x):
    reads 67.2 MB, writes 0.4 MB, 1.1 GFLOP → 22.5 µs predicted (memory-bound; k=11008: 60.3 µs);
    with dropout the Philox work (~17 int ops per element, ~0.57 G int ops) is of the same order
    as the memory time and overlaps it. Unsplit, the grid is cdiv(N, BLOCK_N) programs that each
    walk all of k: at N = 8192 128 programs for 132 SMs, one 4-warp program per SM, latency-bound
    (measured 2.6-3.4x the bandwidth bound). Split S ways (:func:`split_plan`: S = 4 at N = 8192 on
    an H100) the grid is 512 programs, ~4 resident per SM (the shared-memory limit of 5 stages:
    4 x 52 KB), each walking k/S; the partials add S·N·r·4 B written here and read back by the
    expand-add (1.6 MB at S = 4, r = 12: 2 % of x's 67 MB; kernels/COST.md).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    seed = tl.load(SEED)  # one scalar load per program; a valid [1] tensor even without dropout
    if SPLIT:  # this program's columns; T points at its partial [N, r] of the workspace
        k_lo = tl.program_id(1) * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
        T = T + tl.program_id(1).to(tl.int64) * N * R
    else:
        k_lo = 0
        k_hi = K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(
            X + rows[:, None] * stride_xn + cols[None, :].to(tl.int64) * stride_xk,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        a = tl.load(A + rr[None, :] * K + cols[:, None], mask=(rr[None, :] < R) & col_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        else:
            x = x.to(A.dtype.element_ty)
        if has_dropout:  # runtime flag: one binary for p = 0 and p > 0
            keep = _keep_tile(seed, rows, k0, K, thresh, BLOCK_N, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = _dot(x, a, acc, DOT_PREC, 1 if X.dtype.element_ty == tl.bfloat16 else 2, 3, UPCAST)
    acc = acc * inv_keep
    tl.store(T + rows[:, None] * R + rr[None, :], acc, mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit(do_not_specialize=_INT_ARGS)
def _expand_add_kernel(
    T,
    E,
    RK,
    B,
    OUT,
    T_SUM,
    N,
    D,
    R,
    stride_on,
    scaling,
    n_split,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """out[N, d] += (t ⊙ e)[N, r] @ B[d, r]ᵀ in place; grid (cdiv(N, BLOCK_N), cdiv(d, BLOCK_D)).

    One read and one write of out (base dtype), t and B re-read per tile (L2). The product t ⊙ e
    is formed per tile in the adapter dtype (fp32 accumulate). LLaMA-7B (N=8192, d=4096, r=12,
    bf16 out): 134.7 MB moved, 1.1 GFLOP → 44.9 µs predicted (d=11008: 361 MB, 120.5 µs).
    ``SPLIT`` (after a split-K shrink): T is the fp32 workspace [n_split, N, r] of partials, summed
    here in order s = 0, 1, ... as they load (every program of a row tile forms the same sum, bit
    for bit); the programs of column tile 0 write that sum to T_SUM [N, r], the t saved for
    backward. Extra per program: (n_split - 1) more [BLOCK_N, r] fp32 loads from L2; in all
    (n_split + 1)·N·r·4 B of DRAM traffic at most (2 MB at n_split = 4, r = 12).
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    col_ok = cols < D
    t_m = row_ok[:, None] & (rr[None, :] < R)
    if SPLIT:
        t = _sum_partials(T, pid_n.to(tl.int64) * BLOCK_N, N, R, n_split, BLOCK_N, R_PAD)
        if pid_d == 0:
            tl.store(T_SUM + rows[:, None] * R + rr[None, :], t, mask=t_m)
    else:
        t = tl.load(T + rows[:, None] * R + rr[None, :], mask=t_m, other=0.0)
    u = t * _fold_e(E, _scale(RK, scaling), rr, R)[None, :]
    b = tl.load(B + cols[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & col_ok[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    else:
        u = u.to(B.dtype.element_ty)
    acc = _dot(u, b, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PREC, 3, 3, UPCAST)
    m = row_ok[:, None] & col_ok[None, :]
    o_ptr = OUT + rows[:, None] * stride_on + cols[None, :]
    o = tl.load(o_ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr, (o + acc).to(OUT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=_INT_ARGS)
def _grad_rank_kernel(
    G,
    T,
    E,
    RK,
    B,
    GE,
    DB,
    DE,
    N,
    D,
    R,
    stride_gn,
    stride_gd,
    scaling,
    db_off,
    de_off,
    d_chunk,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One pass over g [N, d]: gB = g B, dB += gᵀ(t ⊙ e), dE += s Σₙ gB ⊙ t, ge = gB ⊙ e.

    grid (cdiv(N, BLOCK_N),); each program walks all of d for its rows. dB [d, r] (at DB + db_off)
    and dE [r] (at DE + de_off) accumulate with fp32 atomics into zeroed fp32 buffers: on the eager
    path both are the layer's one flat gradient buffer (offsets r·k and r·k + d·r), on the registered
    op's path two buffers of their own (offsets 0) (cdiv(N, BLOCK_N) adds per element);
    ge [N, r] fp32 is written. g may have any strides (stride 0 from ``.sum()``).
    LLaMA-7B (N=8192, d=4096, r=12, bf16 g): reads 67.1 MB of g, 0.8 MB of t/ge, 25.2 MB of fp32
    atomics (counted as traffic), 2.1 GFLOP → 93.1 MB, 31.0 µs predicted (d=11008: 249 MB, 82.9 µs);
    Unsplit, cdiv(N, BLOCK_N) programs each walk all of d: 128 programs for 132 SMs at N = 8192,
    latency-bound (measured 1.9-2.9x the bandwidth bound).
    Split-D (``SPLIT``), grid (cdiv(N, BLOCK_N), S): program (i, s) walks columns
    [s·d_chunk, (s+1)·d_chunk) ∩ [0, d) (d_chunk a multiple of BLOCK_D) and writes its partial
    gB_s ⊙ e to GE[s] of the fp32 workspace [S, N, r]; the dA_dx kernel sums the S partials in a
    fixed order as it loads them (no atomics for ge). dB's adds are unchanged (each element still
    gets cdiv(N, BLOCK_N)); dE gets S partial sums s Σₙ gB_s ⊙ t per row tile instead of one
    (cdiv(N, BLOCK_N)·S·r relaxed adds: 6 KB at S = 4), the same fp32 atomics as unsplit.
    Extra bytes: S·N·r·4 written (1.6 MB at S = 4, r = 12), read back by dA_dx.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    r_ok = rr < R
    t = tl.load(T + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    s = _scale(RK, scaling)
    e = _fold_e(E, s, rr, R)
    DB = DB + db_off
    DE = DE + de_off
    u = t * e[None, :]
    if not UPCAST:
        u = u.to(B.dtype.element_ty)
    gB = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    if SPLIT:  # this program's columns
        d_lo = tl.program_id(1) * d_chunk
        d_hi = tl.minimum(d_lo + d_chunk, D)
    else:
        d_lo = 0
        d_hi = D
    for d0 in range(d_lo, d_hi, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d_hi  # = D unsplit; split, D is then not live in the loop
        g = tl.load(
            G + rows[:, None] * stride_gn + cols[None, :].to(tl.int64) * stride_gd,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        b = tl.load(B + cols[:, None] * R + rr[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            b = b.to(tl.float32)
        else:
            g = g.to(B.dtype.element_ty)
        gB = _dot(g, b, gB, DOT_PREC, 1 if G.dtype.element_ty == tl.bfloat16 else 2, 3, UPCAST)
        db = _dot(
            tl.trans(g),
            u,
            tl.zeros((BLOCK_D, R_PAD), dtype=tl.float32),
            DOT_PREC,
            1 if G.dtype.element_ty == tl.bfloat16 else 2,
            3,
            UPCAST,
        )
        tl.atomic_add(DB + cols[:, None] * R + rr[None, :], db, mask=col_ok[:, None] & r_ok[None, :], sem="relaxed")
    de = tl.sum(gB * t, axis=0) * s
    tl.atomic_add(DE + rr, de, mask=r_ok, sem="relaxed")
    if SPLIT:  # this program's partial [N, r] of the workspace (formed here, not live across the loop:
        # at the loop's start it cost the bf16x3 sm_80 binary 8 bytes of stack)
        GE = GE + tl.program_id(1).to(tl.int64) * N * R
    tl.store(GE + rows[:, None] * R + rr[None, :], gB * e[None, :], mask=row_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=_INT_ARGS)
def _dA_dx_kernel(
    X,
    GE,
    A,
    DX,
    DA,
    SEED,
    N,
    K,
    R,
    stride_xn,
    stride_xk,
    stride_dxn,
    thresh,
    inv_keep,
    has_dropout,
    need_dx,
    n_split,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_BLOCKS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """dA += geᵀ dropout(x) and (need_dx) dx += mask ⊙ (ge A) / (1-p) in place.

    grid (cdiv(N, BLOCK_N·ROW_BLOCKS), cdiv(k, BLOCK_K)). One pass over x (mask regenerated from
    the seed), one RMW of dx (base dtype, contiguous), ge [N, r] re-read per column tile (L2),
    dA [r, k] accumulated with fp32 atomics (cdiv(N, BLOCK_N·ROW_BLOCKS) adds per element).
    LLaMA-7B (N=8192, k=4096, r=12, bf16, ROW_BLOCKS=1): x 67.1 MB + dx 134.2 MB + ge 0.4 MB +
    25.2 MB of fp32 atomics, 2.1 GFLOP → 227 MB, 75.6 µs predicted (k=11008: 609 MB, 203 µs).
    ``SPLIT`` (after a split-D grad_rank): GE is the fp32 workspace [n_split, N, r] of partials,
    summed in order s = 0, 1, ... as they load (every program of a row tile forms the same ge, bit
    for bit): (n_split - 1) more [BLOCK_N, r] fp32 loads per row tile from L2, n_split·N·r·4 B of
    DRAM traffic (1.6 MB at n_split = 4, r = 12).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    col0 = pid_k * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    a = tl.load(A + rr[:, None] * K + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    daT = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)
    seed = tl.load(SEED)  # one scalar load per program; a valid [1] tensor even without dropout
    for i in range(ROW_BLOCKS):
        rows = (pid_n.to(tl.int64) * ROW_BLOCKS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        m = row_ok[:, None] & col_ok[None, :]
        if SPLIT:
            ge = _sum_partials(GE, (pid_n.to(tl.int64) * ROW_BLOCKS + i) * BLOCK_N, N, R, n_split, BLOCK_N, R_PAD)
        else:
            ge = tl.load(GE + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        if not UPCAST:
            ge = ge.to(A.dtype.element_ty)
        if has_dropout:  # runtime flags: one binary for p = 0 / p > 0 and with / without dx
            keep = _keep_tile(seed, rows, col0, K, thresh, BLOCK_N, BLOCK_K)
        else:
            keep = tl.full((BLOCK_N, BLOCK_K), 1, tl.int1)
        if need_dx:
            ga = _dot(ge, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), DOT_PREC, 3, 3, UPCAST)
            ta = tl.where(keep, ga * inv_keep, 0.0)
            d_ptr = DX + rows[:, None] * stride_dxn + cols[None, :]
            dx = tl.load(d_ptr, mask=m, other=0.0).to(tl.float32)
            tl.store(d_ptr, (dx + ta).to(DX.dtype.element_ty), mask=m)
        x = tl.load(X + rows[:, None] * stride_xn + cols[None, :].to(tl.int64) * stride_xk, mask=m, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            x = x.to(A.dtype.element_ty)
        x = tl.where(keep, x, tl.zeros_like(x))
        daT = _dot(tl.trans(x), ge, daT, DOT_PREC, 1 if X.dtype.element_ty == tl.bfloat16 else 2, 3, UPCAST)
    daT = daT * inv_keep
    tl.atomic_add(DA + rr[None, :] * K + cols[:, None], daT, mask=r_ok[None, :] & col_ok[:, None], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launchers (all launches go through _launch.launch)


def num_warps(r_pad: int) -> int:
    """4 warps (one warpgroup) at R_PAD 16; 8 at R_PAD 64, where 4 warps spill with fp32 tiles."""
    return 4 if r_pad <= 16 else 8


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the grids (``triton.cdiv`` is a ConstexprFunction: slow to call from host code)."""
    return -(-a // b)


# per-kernel launch options by (kernel, adapter dtype, rank, dot precision): built once, so a launch
# costs one dict lookup, not a dict built and merged per call
_KW: dict = {}
_BLOCKS = {
    "shrink": dict(BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_stages=SHRINK_STAGES),
    "expand_add": dict(BLOCK_N=BLOCK_N, BLOCK_D=EXPAND_BLOCK_D),
    "grad_rank": dict(BLOCK_N=BLOCK_N, BLOCK_D=GRAD_BLOCK_D),
    "dA_dx": dict(BLOCK_N=BLOCK_N, BLOCK_K=DA_BLOCK_K, ROW_BLOCKS=DA_ROW_BLOCKS, num_stages=DA_STAGES),
}
# each kernel unsplit ("shrink") and split ("shrink_split": the split-K shrink, the expand-add that
# sums its partials, the split-D grad_rank, the dA_dx that sums its partials)
_BLOCKS = {
    **{name: dict(b, SPLIT=False) for name, b in _BLOCKS.items()},
    **{name + "_split": dict(b, SPLIT=True) for name, b in _BLOCKS.items()},
}
_SLOTS: dict = {}  # split programs resident at once, per CUDA device index


def split_slots(device: torch.device) -> int:
    """How many split programs ``device`` holds at once: SMs x :data:`SPLIT_PROGRAMS_PER_SM` (sm_90 and
    later) or :data:`SPLIT_PROGRAMS_PER_SM_PRE_HOPPER`, read once per device; CPU tensors (the
    interpreter) plan for an H100: :data:`SPLIT_SMS_CPU` x 4."""
    if device.type != "cuda":
        return SPLIT_SMS_CPU * SPLIT_PROGRAMS_PER_SM
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SLOTS.get(idx)
    if n is None:
        prop = torch.cuda.get_device_properties(idx)
        per_sm = SPLIT_PROGRAMS_PER_SM if prop.major >= 9 else SPLIT_PROGRAMS_PER_SM_PRE_HOPPER
        n = _SLOTS[idx] = prop.multi_processor_count * per_sm
    return n


def split_plan(rows: int, width: int, block: int, slots: int, force=None) -> tuple:
    """(S, chunk): how many ways the split-K shrink (width k, ``block`` = BLOCK_K) or split-D grad_rank
    (width d, ``block`` = GRAD_BLOCK_D) divides the width of ``rows`` tokens on a device holding
    ``slots`` split programs at once (:func:`split_slots`), and the columns per split (a multiple of
    ``block``; the last split takes the remainder). (1, 0): unsplit, the single-pass kernel.

    S = min(slots // row_tiles, tiles // min_tiles, SPLIT_MAX) with row_tiles = cdiv(rows,
    BLOCK_N), tiles = cdiv(width, block), min_tiles = SPLIT_MIN_WIDTH // block: the most ways that
    still fit one wave of resident programs, each walking >= SPLIT_MIN_WIDTH columns; then S =
    cdiv(tiles, chunk) so that no split is empty. H100 (528 slots), N = 8192, 64-column tiles:
    528 // 128 = 4 ways (512 programs) at k or d = 4096 (16 tiles each) and 11008 (43 tiles each);
    N = 4096: 8 ways; N = 16384: 2; N > 16896 (265 row tiles or more): 1. A100 (324 slots), N =
    8192: 2 ways.
    ``force`` (tests, :data:`FORCE_SPLIT`): S = force, capped at ``tiles``, then made non-empty the
    same way (force 3 on 4 tiles gives chunks of 2 tiles: S = 2)."""
    tiles = -(-width // block)
    if force is not None:
        s = min(int(force), tiles)
    else:
        s = min(slots // -(-rows // BLOCK_N), tiles // max(1, SPLIT_MIN_WIDTH // block), SPLIT_MAX)
    if s <= 1:
        return 1, 0
    chunk = -(-tiles // s)
    return -(-tiles // chunk), chunk * block


# a width split_plan never splits without a forced factor, whatever the tile (at most the widest of
# BLOCK_K and GRAD_BLOCK_D; narrower ones in BF16X3_R64_CONSTEXPRS): it needs 2 x SPLIT_MIN_WIDTH //
# block tiles, more than 2 x SPLIT_MIN_WIDTH - block columns; up to it the launchers skip the call
_SPLIT_MAX_UNSPLIT_WIDTH = 2 * SPLIT_MIN_WIDTH - max(BLOCK_K, GRAD_BLOCK_D)


_NARROW, _UNSPLIT = _SPLIT_MAX_UNSPLIT_WIDTH, (1, 0)


def _plan_split(rows: int, width: int, block: int, device: torch.device) -> tuple:
    """split_plan for a launch on ``device`` (the forced factor if set); (1, 0) for narrow widths
    without the call into split_plan (the host path of small layers)."""
    if FORCE_SPLIT is None and width <= _SPLIT_MAX_UNSPLIT_WIDTH:
        return 1, 0
    return split_plan(rows, width, block, split_slots(device), FORCE_SPLIT)


def layer_precision(x_dtype: torch.dtype, a_dtype: torch.dtype, r: int) -> str:
    """The layer kernels' ``DOT_PREC`` for a base of ``x_dtype``, adapters of ``a_dtype``, rank ``r``:
    torch's TF32 switch for fp32 adapters (``_launch.dot_precision``), except that full fp32 ("ieee",
    torch's default) on a half base (bf16, or fp16 whose x and g take two bf16 parts) is "bf16x3"
    (fp32 products from bf16 tensor-core products, :func:`_dot`; the FMA dots spill at these tiles;
    at R_PAD 64 on narrower tiles, :data:`BF16X3_R64_CONSTEXPRS`). An fp32 base at full fp32 stays
    "ieee": that layer runs the torch implementation on CUDA (``ops/adapter_linear._pick``). Half
    adapters use the tensor cores as they are. Read at each call: it picks the binary. ``r`` is
    checked against the rank pads (:func:`_launch.pad_rank`)."""
    pad_rank(r)
    prec = dot_precision(a_dtype)
    if prec == "ieee" and x_dtype in (torch.bfloat16, torch.float16):
        return "bf16x3"
    return prec


def layer_kwargs(a_dtype: torch.dtype, r: int, x_dtype: torch.dtype = torch.float32) -> dict:
    """{kernel: constexprs and compile options} of the four layer kernels for adapters of ``a_dtype``
    at rank ``r`` on a base of ``x_dtype`` (the dot precision: :func:`layer_precision`), as the
    launchers pass them (``UPCAST`` under the interpreter)."""
    prec = layer_precision(x_dtype, a_dtype, r)
    key = (a_dtype, r, prec, x_dtype)
    kws = _KW.get(key)
    if kws is None:
        kws = _KW[key] = kernel_kwargs(x_dtype, pad_rank(r), prec, INTERPRET)
    return kws


def kernel_kwargs(x_dtype: torch.dtype, r_pad: int, prec: str, upcast: bool) -> dict:
    """{kernel ("shrink", "shrink_split", ...): its constexprs (R_PAD, blocks, UPCAST, DOT_PREC,
    SPLIT) and compile options (num_warps, num_stages where not Triton's default)} for a base of
    ``x_dtype`` at rank pad ``r_pad`` and dot precision ``prec``: the one table the launch plans and
    the compile check (:func:`compile_variants`) read."""
    narrow = BF16X3_R64_CONSTEXPRS[x_dtype] if prec == "bf16x3" and r_pad > 16 else {}
    kws = {}
    for name, blocks in _BLOCKS.items():
        kw = dict(blocks, R_PAD=r_pad, UPCAST=upcast, DOT_PREC=prec, num_warps=num_warps(r_pad))
        kw.update(narrow.get(name.removesuffix("_split"), {}))
        if name.startswith("grad_rank"):
            kw.update(grad_rank_options(x_dtype, prec, name.endswith("_split"), r_pad))
        kws[name] = kw
    return kws


def grad_rank_options(x_dtype: torch.dtype, prec: str, split: bool, r_pad: int) -> dict:
    """The grad_rank's compile options (num_warps, and num_stages where it is not Triton's default),
    for the launchers and the compile check alike."""
    if prec == "bf16x3" and x_dtype == torch.float16:
        return {"num_warps": GRAD_FP16_BF16X3_WARPS, "num_stages": GRAD_FP16_BF16X3_STAGES}
    if prec == "bf16x3" and split:
        return {"num_warps": num_warps(r_pad), "num_stages": GRAD_SPLIT_BF16X3_STAGES}
    return {"num_warps": num_warps(r_pad)}


def launch_kwargs(kernel: str, a_dtype: torch.dtype, r: int, x_dtype: torch.dtype = torch.float32) -> dict:
    """Constexprs and compile options of ``kernel`` ("shrink", "expand_add", "grad_rank", "dA_dx")."""
    return layer_kwargs(a_dtype, r, x_dtype)[kernel]


def dropout_keep_mask(seed, n: int, k: int, dropout_p: float, device) -> torch.Tensor:
    """bool [n, k]: the keep mask the kernels use for ``seed`` (an int or a [1] int64 tensor) and rate ``p``."""
    out = torch.empty((n, k), dtype=torch.int8, device=device)
    if n and k:
        grid = (cdiv(n, BLOCK_N), cdiv(k, BLOCK_K))
        thresh = dropout_args(dropout_p)[0]
        _launch.launch(
            _dropout_keep_mask_kernel,
            grid,
            out,
            seed_tensor(seed, out.device),
            n,
            k,
            thresh,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS,
        )
    return out.bool()


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed, split: int = 1) -> torch.Tensor:
    """t = dropout(x) Aᵀ, fp32 [N, r]; x [N, k] any strides; A [r, k] contiguous; seed a [1] int64
    tensor on x's device (an int is put there), unused at p = 0.

    ``split`` > 1: the split-K kernel (:func:`split_plan` with that factor forced) returns its fp32
    partials [S, N, r] (S the factor the plan makes of ``split``), whose sum over the first axis is t:
    :func:`expand_add` takes them as they are (``bench/gpu_check.py`` times both forms)."""
    n, k = x.shape
    r = lora_A.shape[0]
    kws = layer_kwargs(lora_A.dtype, r, x.dtype)
    s, chunk = split_plan(n, k, kws["shrink"]["BLOCK_K"], 1, split) if split > 1 else (1, 0)
    t = torch.empty((s, n, r) if s > 1 else (n, r), dtype=torch.float32, device=x.device)
    seed = _seed_arg(seed, dropout_p, x.device)
    _launch.launch(
        _shrink_kernel,
        (cdiv(n, BLOCK_N), s) if s > 1 else (cdiv(n, BLOCK_N),),
        x,
        lora_A,
        t,
        seed,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        *dropout_args(dropout_p),
        chunk,
        **kws["shrink_split" if s > 1 else "shrink"],
    )
    return t


def expand_add(
    out: torch.Tensor,
    t: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    ranknum: torch.Tensor,
    scaling: float,
    t_sum: torch.Tensor = None,
):
    """out [N, d] (unit column stride) += (t ⊙ e) Bᵀ in place, e = E·scaling/(ranknum + eps)
    (ranknum: [1] on out's device, read by the kernel). t: fp32 [N, r], or the split shrink's
    partials [S, N, r], summed as they load; then their sum is written to ``t_sum`` [N, r] (a new
    tensor if not given; never the partials themselves, which other programs are still reading)
    and returned (d > 0). Returns None for an unsplit t."""
    n, d = out.shape
    r = lora_B.shape[1]
    split = t.dim() == 3
    if split and t_sum is None:
        t_sum = torch.empty(t.shape[1:], dtype=torch.float32, device=t.device)
    kw = launch_kwargs("expand_add_split" if split else "expand_add", lora_B.dtype, r, out.dtype)
    _launch.launch(
        _expand_add_kernel,
        (cdiv(n, BLOCK_N), cdiv(d, kw["BLOCK_D"])),
        t,
        lora_E,
        ranknum,
        lora_B,
        out,
        t_sum if t_sum is not None else t,
        n,
        d,
        r,
        out.stride(0),
        float(scaling),
        t.shape[0] if split else 1,
        **kw,
    )
    return t_sum if split else None


def grad_offsets(r: int, k: int, d: int) -> tuple:
    """(dB offset, dE offset, size) of the flat fp32 gradient buffer [dA r·k | dB d·r | dE r]."""
    return r * k, r * k + d * r, r * k + d * r + r


def grad_rank(g, t, lora_E, lora_B, ranknum, scaling: float, ge, dB, dE) -> None:
    """ge = (g B) ⊙ e (written); dB [d, r] += gᵀ(t ⊙ e), dE [r] += s Σ (g B) ⊙ t (fp32 atomics into
    zeroed fp32 buffers). ge fp32 [N, r], or [S, N, r] for the split-D kernel (S from
    :func:`split_plan` with that factor forced, so pass a workspace of a factor the plan keeps:
    ``split_plan(N, d, block, 1, S)[0] == S`` with the configuration's grad_rank block), which
    writes S partials whose sum is ge (:func:`dA_dx` takes them as they are)."""
    n, d = g.shape
    r = lora_B.shape[1]
    kws = layer_kwargs(lora_B.dtype, r, g.dtype)
    s, chunk = split_plan(n, d, kws["grad_rank"]["BLOCK_D"], 1, ge.shape[0]) if ge.dim() == 3 else (1, 0)
    if ge.dim() == 3 and s != ge.shape[0]:
        raise ValueError(f"grad_rank: a workspace of {ge.shape[0]} partials, but d = {d} splits {s} ways")
    _launch.check_deterministic("the adapter backward (dB, dE)")
    _launch.launch(
        _grad_rank_kernel,
        (cdiv(n, BLOCK_N), s) if s > 1 else (cdiv(n, BLOCK_N),),
        g,
        t,
        lora_E,
        ranknum,
        lora_B,
        ge,
        dB,
        dE,
        n,
        d,
        r,
        g.stride(0),
        g.stride(1),
        float(scaling),
        0,
        0,
        chunk,
        **kws["grad_rank_split" if s > 1 else "grad_rank"],
    )


def dA_dx(x, ge, lora_A, dx, dA, dropout_p: float, seed) -> None:
    """dA [r, k] (or the flat buffer, dA first) += geᵀ dropout(x) (fp32 atomics); dx [N, k] +=
    dropout-mask ⊙ (ge A)/(1-p) if dx given; seed as for :func:`shrink`. ge fp32 [N, r], or the
    split grad_rank's partials [S, N, r], summed as they load."""
    n, k = x.shape
    r = lora_A.shape[0]
    split = ge.dim() == 3
    _launch.check_deterministic("the adapter backward (dA)")
    seed = _seed_arg(seed, dropout_p, x.device)
    kw = launch_kwargs("dA_dx_split" if split else "dA_dx", lora_A.dtype, r, x.dtype)
    _launch.launch(
        _dA_dx_kernel,
        (cdiv(n, BLOCK_N * kw["ROW_BLOCKS"]), cdiv(k, kw["BLOCK_K"])),
        x,
        ge,
        lora_A,
        dx if dx is not None else x,
        dA,
        seed,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        dx.stride(0) if dx is not None else 0,
        *dropout_args(dropout_p),
        int(dx is not None),
        ge.shape[0] if split else 1,
        **kw,
    )


class LayerPlan:
    """Everything the four launches of one layer configuration take besides its tensors: grids,
    split factors and chunk widths, constexprs and compile options, the dropout arguments and the
    flat gradient buffer's layout. Built once per configuration (:func:`layer_plan`), so a layer
    step's launches cost their calls and no host arithmetic."""

    __slots__ = (
        "fwd_split", "fwd_chunk", "fwd_grid", "shrink_kw", "expand_grid", "expand_kw",
        "bwd_split", "bwd_chunk", "grad_grid", "grad_kw", "da_grid", "da_kw",
        "thresh", "inv_keep", "has_dropout", "db_off", "de_off", "size",
    )  # fmt: skip

    def __init__(self, n: int, k: int, d: int, r: int, a_dtype, x_dtype, dropout_p: float, device):
        kws = layer_kwargs(a_dtype, r, x_dtype)
        gn = cdiv(n, BLOCK_N)
        # d = 0: no expand-add program would sum split partials into t
        s, self.fwd_chunk = (
            _plan_split(n, k, kws["shrink"]["BLOCK_K"], device) if d and (k > _NARROW or FORCE_SPLIT) else _UNSPLIT
        )
        self.fwd_split, self.fwd_grid = s, ((gn, s) if s > 1 else (gn,))
        self.shrink_kw, self.expand_kw = (
            kws["shrink_split" if s > 1 else "shrink"],
            kws["expand_add_split" if s > 1 else "expand_add"],
        )
        self.expand_grid = (gn, cdiv(d, self.expand_kw["BLOCK_D"]))
        s, self.bwd_chunk = (
            _plan_split(n, d, kws["grad_rank"]["BLOCK_D"], device) if d > _NARROW or FORCE_SPLIT else _UNSPLIT
        )
        self.bwd_split, self.grad_grid = s, ((gn, s) if s > 1 else (gn,))
        self.grad_kw, self.da_kw = (
            kws["grad_rank_split" if s > 1 else "grad_rank"],
            kws["dA_dx_split" if s > 1 else "dA_dx"],
        )
        self.da_grid = (cdiv(n, BLOCK_N * self.da_kw["ROW_BLOCKS"]), cdiv(k, self.da_kw["BLOCK_K"]))
        self.thresh, self.inv_keep, self.has_dropout = dropout_args(dropout_p)
        self.db_off, self.de_off, self.size = grad_offsets(r, k, d)


_LAYER_PLANS: dict = {}


def layer_plan(n: int, k: int, d: int, r: int, a_dtype, x_dtype, dropout_p: float, device) -> LayerPlan:
    """The :class:`LayerPlan` of N = ``n`` tokens through a [d, k] layer at rank ``r``, cached per
    configuration (the dot precision and a forced split factor included: both pick binaries)."""
    key = (n, k, d, r, a_dtype, x_dtype, dropout_p, device, torch._C._get_float32_matmul_precision(), FORCE_SPLIT)
    lp = _LAYER_PLANS.get(key)
    if lp is None:
        if len(_LAYER_PLANS) >= 4096:  # token counts that change every batch
            _LAYER_PLANS.clear()
        lp = _LAYER_PLANS[key] = LayerPlan(n, k, d, r, a_dtype, x_dtype, dropout_p, device)
    return lp


# forward() and backward() write the launches of the single-kernel launchers above out again on
# purpose: calling those would add Python calls per launch to the host path these two exist to
# shorten (bench/README.md, "Host path"). A change to a kernel's arguments goes in both places.
def forward(x, lora_A, lora_E, lora_B, ranknum, scaling: float, dropout_p: float, seed, out, lp=None) -> torch.Tensor:
    """The layer's two forward launches (:func:`shrink`, then :func:`expand_add` into ``out`` in place)
    with the host work shared (:func:`layer_plan`, or ``lp``, the caller's): one call per layer step on
    the eager path. Returns t [N, r] fp32. The caller has checked that x, A, E, B, ranknum and out share one device
    (the launches skip the per-argument device check).

    Wide layers (:func:`split_plan`; k > 960 and N small enough that the unsplit grid leaves SMs
    idle: N = 8192 at k = 4096 on an H100) run the split-K shrink into an fp32 workspace [S, N, r]
    and the expand-add sums it and writes t: the same two launches, one more allocation."""
    n, k = x.shape
    r, d = lora_A.shape[0], out.shape[1]
    dev = x.device
    if lp is None:
        lp = layer_plan(n, k, d, r, lora_A.dtype, x.dtype, dropout_p, dev)
    t = torch.empty((n, r), dtype=torch.float32, device=dev)
    s = lp.fwd_split
    ws = torch.empty((s, n, r), dtype=torch.float32, device=dev) if s > 1 else t
    _launch.launch(
        _shrink_kernel,
        lp.fwd_grid,
        x,
        lora_A,
        ws,
        _seed_arg(seed, dropout_p, dev),
        n,
        k,
        r,
        *x.stride(),
        lp.thresh,
        lp.inv_keep,
        lp.has_dropout,
        lp.fwd_chunk,
        _device=dev,
        **lp.shrink_kw,
    )
    _launch.launch(
        _expand_add_kernel,
        lp.expand_grid,
        ws,
        lora_E,
        ranknum,
        lora_B,
        out,
        t,
        n,
        d,
        r,
        out.stride(0),
        scaling,
        s,
        _device=dev,
        **lp.expand_kw,
    )
    return t


def backward(
    g,
    x,
    t,
    lora_A,
    lora_E,
    lora_B,
    ranknum,
    scaling: float,
    dropout_p: float,
    seed,
    dx,
    separate: bool = False,
    lp=None,
):
    """The layer's two backward launches (:func:`grad_rank`, then :func:`dA_dx`, adding into ``dx`` in
    place when given) with the host work shared (:func:`layer_plan`, or ``lp``: the forward's). Returns the flat fp32 gradient
    [dA | dB | dE] (:func:`grad_offsets`: one memset), or with ``separate`` the three fp32 buffers
    (dA, dB, dE) of their own (three memsets: the registered op's outputs may not alias one
    another). The caller has checked the devices, as for :func:`forward`.

    Wide layers (:func:`split_plan` on d) run the split-D grad_rank into an fp32 workspace [S, N, r]
    of ge partials that dA_dx sums as it loads: the same two launches."""
    n, k = x.shape
    r, d = lora_A.shape[0], g.shape[1]
    dev = x.device
    if lp is None:
        lp = layer_plan(n, k, d, r, lora_A.dtype, x.dtype, dropout_p, dev)
    if torch._C._get_deterministic_algorithms():  # torch.are_deterministic_algorithms_enabled(), one frame less
        _launch.check_deterministic("the adapter backward (dA, dB, dE)")
    if separate:
        dA, dB, dE = (torch.zeros(shape, dtype=torch.float32, device=dev) for shape in ((r, k), (d, r), (r,)))
        db_off = de_off = 0
        out = dA, dB, dE
    else:
        db_off, de_off = lp.db_off, lp.de_off
        dA = dB = dE = out = torch.zeros(lp.size, dtype=torch.float32, device=dev)
    s = lp.bwd_split
    ge = torch.empty((s, n, r) if s > 1 else (n, r), dtype=torch.float32, device=dev)
    _launch.launch(
        _grad_rank_kernel,
        lp.grad_grid,
        g,
        t,
        lora_E,
        ranknum,
        lora_B,
        ge,
        dB,
        dE,
        n,
        d,
        r,
        *g.stride(),
        scaling,
        db_off,
        de_off,
        lp.bwd_chunk,
        _device=dev,
        **lp.grad_kw,
    )
    _launch.launch(
        _dA_dx_kernel,
        lp.da_grid,
        x,
        ge,
        lora_A,
        dx if dx is not None else x,
        dA,
        _seed_arg(seed, dropout_p, dev),
        n,
        k,
        r,
        *x.stride(),
        dx.stride(0) if dx is not None else 0,
        lp.thresh,
        lp.inv_keep,
        lp.has_dropout,
        int(dx is not None),
        s,
        _device=dev,
        **lp.da_kw,
    )
    return out


# ----------------------------------------------------------------------------------------------
# every configuration the launchers above can pick, for the sm_90 / sm_80 compile check


def compile_variants():
    """Yield (name, jit fn, signature, constexprs, options) for every config the launchers pick;
    options: num_warps, or a dict of compile options (num_warps, num_stages).

    Pointer dtypes follow DTYPE_PAIRS, R_PAD follows RANK_PADS, DOT_PREC for fp32 adapters "tf32"
    (torch's TF32 switch on) and, on a half base, "bf16x3" (torch's full-fp32 default; an fp32 base
    then runs the torch implementation, see ``ops/adapter_linear._pick``); dropout and need-dx are runtime
    flags (one binary serves both values); each layer kernel also comes split (``SPLIT``, name suffix
    ",split": the split-K shrink, the expand-add summing its partials, the split-D grad_rank, the
    dA_dx summing its partials), whose chunk widths are multiples of the tile width (16-divisible
    even where K / D are not). Integer arguments get the specialisation a contiguous
    LLaMA-shaped launch gets (unit column strides become constexpr 1; pointers, leading strides and
    the widths K / D 16-divisible); ``bench/compile_check.py`` also compiles the widths unaligned.
    """

    def p(dt):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]

    yield (
        "dropout_keep_mask",
        _dropout_keep_mask_kernel,
        {
            "OUT": "*i8",
            "SEED": "*i64",
            "N": "i32",
            "K": "i32",
            "thresh": "i32",
            "BLOCK_N": "constexpr",
            "BLOCK_K": "constexpr",
        },
        {"BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K},
        NUM_WARPS,
    )
    # fp32 adapters: the TF32 binaries, and on a half base the bf16x3 ones (torch's full-fp32 default,
    # layer_precision); never the FMA ("ieee") dots, which spill at these tiles on sm_90 and sm_80 (an
    # fp32 base at full fp32 runs the torch implementation). Half operands ignore DOT_PREC.
    for (base, adt), prec in [
        (pair, pr)
        for pair in DTYPE_PAIRS
        for pr in (
            ("tf32", "bf16x3")
            if pair in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32))
            else ("tf32",)
        )
    ]:
        tag = f"{str(base)[6:]}/{str(adt)[6:]}" + (f",{prec}" if adt == torch.float32 else "")
        for rp in RANK_PADS:
            kws = kernel_kwargs(base, rp, prec, False)
            for split in (False, True):
                sfx = ",split" if split else ""

                def kw(name, **fixed):  # (constexprs, compile options) of a kernel from the launchers' table
                    d = kws[name + ("_split" if split else "")]
                    opts = {o: d[o] for o in ("num_warps", "num_stages") if o in d}
                    return dict({c: v for c, v in d.items() if c not in opts}, **fixed), opts

                yield (
                    f"shrink[{tag},R{rp}{sfx}]",
                    _shrink_kernel,
                    {
                        "X": p(base),
                        "A": p(adt),
                        "T": "*fp32",
                        "SEED": "*i64",
                        "N": "i32",
                        "K": "i32",
                        "R": "i32",
                        "stride_xn": "i32",
                        "stride_xk": "constexpr",
                        "thresh": "i32",
                        "inv_keep": "fp32",
                        "has_dropout": "i32",
                        "k_chunk": "i32",
                        "R_PAD": "constexpr",
                        "BLOCK_N": "constexpr",
                        "BLOCK_K": "constexpr",
                        "UPCAST": "constexpr",
                        "DOT_PREC": "constexpr",
                        "SPLIT": "constexpr",
                    },
                    *kw("shrink", stride_xk=1),
                )
                yield (
                    f"expand_add[{tag},R{rp}{sfx}]",
                    _expand_add_kernel,
                    {
                        "T": "*fp32",
                        "E": p(adt),
                        "RK": "*fp32",
                        "B": p(adt),
                        "OUT": p(base),
                        "T_SUM": "*fp32",
                        "N": "i32",
                        "D": "i32",
                        "R": "i32",
                        "stride_on": "i32",
                        "scaling": "fp32",
                        "n_split": "i32",
                        "R_PAD": "constexpr",
                        "BLOCK_N": "constexpr",
                        "BLOCK_D": "constexpr",
                        "UPCAST": "constexpr",
                        "DOT_PREC": "constexpr",
                        "SPLIT": "constexpr",
                    },
                    *kw("expand_add"),
                )
                yield (
                    f"grad_rank[{tag},R{rp}{sfx}]",
                    _grad_rank_kernel,
                    {
                        "G": p(base),
                        "T": "*fp32",
                        "E": p(adt),
                        "RK": "*fp32",
                        "B": p(adt),
                        "GE": "*fp32",
                        "DB": "*fp32",
                        "DE": "*fp32",
                        "N": "i32",
                        "D": "i32",
                        "R": "i32",
                        "stride_gn": "i32",
                        "stride_gd": "constexpr",
                        "scaling": "fp32",
                        "db_off": "i32",
                        "de_off": "i32",
                        "d_chunk": "i32",
                        "R_PAD": "constexpr",
                        "BLOCK_N": "constexpr",
                        "BLOCK_D": "constexpr",
                        "UPCAST": "constexpr",
                        "DOT_PREC": "constexpr",
                        "SPLIT": "constexpr",
                    },
                    *kw("grad_rank", stride_gd=1),
                )
                yield (
                    f"dA_dx[{tag},R{rp}{sfx}]",
                    _dA_dx_kernel,
                    {
                        "X": p(base),
                        "GE": "*fp32",
                        "A": p(adt),
                        "DX": p(base),
                        "DA": "*fp32",
                        "SEED": "*i64",
                        "N": "i32",
                        "K": "i32",
                        "R": "i32",
                        "stride_xn": "i32",
                        "stride_xk": "constexpr",
                        "stride_dxn": "i32",
                        "thresh": "i32",
                        "inv_keep": "fp32",
                        "has_dropout": "i32",
                        "need_dx": "i32",
                        "n_split": "i32",
                        "R_PAD": "constexpr",
                        "BLOCK_N": "constexpr",
                        "BLOCK_K": "constexpr",
                        "ROW_BLOCKS": "constexpr",
                        "UPCAST": "constexpr",
                        "DOT_PREC": "constexpr",
                        "SPLIT": "constexpr",
                    },
                    *kw("dA_dx", stride_xk=1),
                )


__all__ = [
    "DTYPE_PAIRS",
    "check_dtypes",
    "dropout_keep_mask",
    "shrink",
    "expand_add",
    "grad_rank",
    "dA_dx",
    "forward",
    "backward",
    "grad_offsets",
    "compile_variants",
    "TL_DTYPE",
]
