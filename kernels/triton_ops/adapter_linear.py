"""Triton kernels of one adapted layer: shrink, expand-add, and the two backward kernels.

Notation: x [N, k] (N tokens, base dtype), W [d, k] frozen, A [r, k], E [r, 1], B [d, r] (adapter
dtype), s = scaling / (ranknum + eps) (a [1] fp32 device tensor the caller forms, ``ops/adapter_linear.py``),
e = E * s (an r-vector folded inside the kernels from E and s: no ``A*E`` tensor, no host read of
``ranknum``), p = dropout rate.
The rank is padded inside the kernels to R_PAD in {16, 64} with zeros (masked loads), so any
r <= 64 (init_r = 6, 12, 32 ...) runs on the tensor cores.

Forward (the op ``adalora_fast::adapter_linear`` in ``ops/adapter_linear.py`` owns autograd):
  1. out = x Wᵀ + b                                   cuBLAS (torch), 1 launch
  2. t = dropout(x) Aᵀ            [N, r] fp32        ``_shrink_kernel``, 1 launch, 1 pass over x
  3. out += (t ⊙ e) Bᵀ            in place           ``_expand_add_kernel``, 1 launch, 1 RMW of out
Saved for backward: x, t [N, r], W, A, E, B, ranknum, the seed. The dropped copy of x is never
written: dropout is regenerated from the seed (Philox) wherever x is read.

Backward with g = dout [N, d] (any strides, stride 0 included):
  1. dx = g W                                         cuBLAS (torch), 1 launch
  2. gB = g B; dB = gᵀ(t ⊙ e); dE = s Σₙ gB ⊙ t; ge = gB ⊙ e
                                                      ``_grad_rank_kernel``, 1 launch, 1 pass over g
  3. dA = geᵀ dropout(x); dx += mask ⊙ (ge A)/(1-p)   ``_dA_dx_kernel``, 1 launch, 1 pass over x,
                                                      1 RMW of dx
  + one memset of the fp32 [r·k + d·r + r] accumulator of dA, dB, dE (fp32 atomics), + one cast of
  it when the adapter dtype is half.

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
SEED_OFFSET = 1 << 62  # seeds (< 2**62) are passed as seed + 2**62: always an int64, never 1

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
# are runtime branches, and the seed (a new value per step) must not pick a binary by its value %16.
# K and D are specialised (Triton's %16 divisibility): a layer's widths are fixed, and knowing they
# are multiples of 16 lets the column masks stay constant over 8-element groups, so the streaming
# loads of x / g / out / dx are 128-bit and the tile loops can use async copies (COST.md).
_INT_ARGS = ["N", "R", "seed", "thresh", "has_dropout", "need_dx"]


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


def dropout_args(dropout_p: float, seed) -> tuple:
    """(seed + 2**62, thresh, 1/(1-p), has_dropout) for a launch; p = 1 drops everything (scale 0,
    as ``nn.Dropout(1.0)``) instead of dividing by zero."""
    p = float(dropout_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p={dropout_p} must lie in [0, 1]")
    if p == 0.0:
        return SEED_OFFSET, 0, 1.0, 0
    return int(seed) + SEED_OFFSET, dropout_threshold(p), (1.0 / (1.0 - p) if p < 1.0 else 0.0), 1


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
def _fold_e(E, S, rr, R):
    """e = E * s as an fp32 [R_PAD] vector, 0 in the pad."""
    ev = tl.load(E + rr, mask=rr < R, other=0.0).to(tl.float32)
    return ev * tl.load(S)


@triton.jit(do_not_specialize=_INT_ARGS)
def _dropout_keep_mask_kernel(OUT, N, K, seed, thresh, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the bool keep mask [N, K] the other kernels draw for ``seed`` (tests, debugging).

    Bytes: N·K (bool). Not on the training path.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_K
    cols = col0 + tl.arange(0, BLOCK_K)
    keep = _keep_tile(seed, rows, col0, K, thresh, BLOCK_N, BLOCK_K)
    m = (rows[:, None] < N) & (cols[None, :] < K)
    tl.store(OUT + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=m)


@triton.jit(do_not_specialize=_INT_ARGS)
def _shrink_kernel(
    X, A, T, N, K, R, stride_xn, stride_xk, seed, thresh, inv_keep, has_dropout,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """t[N, r] (fp32) = dropout(x)[N, k] @ A[r, k]ᵀ; grid (cdiv(N, BLOCK_N),).

    One pass over x (any strides); A re-read per row tile from L2; the dropped x lives only in
    registers. FLOPs 2·N·k·R_PAD (tensor cores). LLaMA-7B (N=8192, k=4096, r=12→16, bf16 x):
    reads 67.2 MB, writes 0.4 MB, 1.1 GFLOP → 22.5 µs predicted (memory-bound; k=11008: 60.3 µs);
    with dropout the Philox work (~17 int ops per element, ~0.57 G int ops) is of the same order
    as the memory time and overlaps it. The grid is cdiv(N, BLOCK_N) programs that each walk all
    of k, so at N = 8192 (128 programs for 132 SMs) latency, not bandwidth, can bound it.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(X + rows[:, None] * stride_xn + cols[None, :].to(tl.int64) * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(A + rr[None, :] * K + cols[:, None], mask=(rr[None, :] < R) & col_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        else:
            x = x.to(A.dtype.element_ty)
        if has_dropout:  # runtime flag: one binary for p = 0 and p > 0
            keep = _keep_tile(seed, rows, k0, K, thresh, BLOCK_N, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = tl.dot(x, a, acc, input_precision=DOT_PREC)
    acc = acc * inv_keep
    tl.store(T + rows[:, None] * R + rr[None, :], acc, mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit(do_not_specialize=_INT_ARGS)
def _expand_add_kernel(
    T, E, S, B, OUT, N, D, R, stride_on,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[N, d] += (t ⊙ e)[N, r] @ B[d, r]ᵀ in place; grid (cdiv(N, BLOCK_N), cdiv(d, BLOCK_D)).

    One read and one write of out (base dtype), t and B re-read per tile (L2). The product t ⊙ e
    is formed per tile in the adapter dtype (fp32 accumulate). LLaMA-7B (N=8192, d=4096, r=12,
    bf16 out): 134.7 MB moved, 1.1 GFLOP → 44.9 µs predicted (d=11008: 361 MB, 120.5 µs).
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    col_ok = cols < D
    t = tl.load(T + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
    u = t * _fold_e(E, S, rr, R)[None, :]
    b = tl.load(B + cols[None, :] * R + rr[:, None], mask=(rr[:, None] < R) & col_ok[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    else:
        u = u.to(B.dtype.element_ty)
    acc = tl.dot(u, b, input_precision=DOT_PREC)
    m = row_ok[:, None] & col_ok[None, :]
    o_ptr = OUT + rows[:, None] * stride_on + cols[None, :]
    o = tl.load(o_ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr, (o + acc).to(OUT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=_INT_ARGS)
def _grad_rank_kernel(
    G, T, E, S, B, GE, DB, DE, N, D, R, stride_gn, stride_gd,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One pass over g [N, d]: gB = g B, dB += gᵀ(t ⊙ e), dE += s Σₙ gB ⊙ t, ge = gB ⊙ e.

    grid (cdiv(N, BLOCK_N),); each program walks all of d for its rows. dB [d, r] and dE [r]
    accumulate with fp32 atomics into a zeroed buffer (cdiv(N, BLOCK_N) adds per element);
    ge [N, r] fp32 is written. g may have any strides (stride 0 from ``.sum()``).
    LLaMA-7B (N=8192, d=4096, r=12, bf16 g): reads 67.1 MB of g, 0.8 MB of t/ge, 25.2 MB of fp32
    atomics (counted as traffic), 2.1 GFLOP → 93.1 MB, 31.0 µs predicted (d=11008: 249 MB, 82.9 µs);
    like the shrink, cdiv(N, BLOCK_N) programs each walk all of d, so latency can bound it.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    row_ok = rows < N
    r_ok = rr < R
    t = tl.load(T + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    e = _fold_e(E, S, rr, R)
    u = t * e[None, :]
    if not UPCAST:
        u = u.to(B.dtype.element_ty)
    gB = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(G + rows[:, None] * stride_gn + cols[None, :].to(tl.int64) * stride_gd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(B + cols[:, None] * R + rr[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            b = b.to(tl.float32)
        else:
            g = g.to(B.dtype.element_ty)
        gB = tl.dot(g, b, gB, input_precision=DOT_PREC)
        db = tl.dot(tl.trans(g), u, input_precision=DOT_PREC)
        tl.atomic_add(DB + cols[:, None] * R + rr[None, :], db, mask=col_ok[:, None] & r_ok[None, :], sem="relaxed")
    de = tl.sum(gB * t, axis=0) * tl.load(S)
    tl.atomic_add(DE + rr, de, mask=r_ok, sem="relaxed")
    tl.store(GE + rows[:, None] * R + rr[None, :], gB * e[None, :], mask=row_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=_INT_ARGS)
def _dA_dx_kernel(
    X, GE, A, DX, DA, N, K, R, stride_xn, stride_xk, stride_dxn, seed, thresh, inv_keep, has_dropout, need_dx,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ROW_BLOCKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dA += geᵀ dropout(x) and (need_dx) dx += mask ⊙ (ge A) / (1-p) in place.

    grid (cdiv(N, BLOCK_N·ROW_BLOCKS), cdiv(k, BLOCK_K)). One pass over x (mask regenerated from
    the seed), one RMW of dx (base dtype, contiguous), ge [N, r] re-read per column tile (L2),
    dA [r, k] accumulated with fp32 atomics (cdiv(N, BLOCK_N·ROW_BLOCKS) adds per element).
    LLaMA-7B (N=8192, k=4096, r=12, bf16, ROW_BLOCKS=1): x 67.1 MB + dx 134.2 MB + ge 0.4 MB +
    25.2 MB of fp32 atomics, 2.1 GFLOP → 227 MB, 75.6 µs predicted (k=11008: 609 MB, 203 µs).
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
    for i in range(ROW_BLOCKS):
        rows = (pid_n.to(tl.int64) * ROW_BLOCKS + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        m = row_ok[:, None] & col_ok[None, :]
        ge = tl.load(GE + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        if not UPCAST:
            ge = ge.to(A.dtype.element_ty)
        if has_dropout:  # runtime flags: one binary for p = 0 / p > 0 and with / without dx
            keep = _keep_tile(seed, rows, col0, K, thresh, BLOCK_N, BLOCK_K)
        else:
            keep = tl.full((BLOCK_N, BLOCK_K), 1, tl.int1)
        if need_dx:
            ta = tl.where(keep, tl.dot(ge, a, input_precision=DOT_PREC) * inv_keep, 0.0)
            d_ptr = DX + rows[:, None] * stride_dxn + cols[None, :]
            dx = tl.load(d_ptr, mask=m, other=0.0).to(tl.float32)
            tl.store(d_ptr, (dx + ta).to(DX.dtype.element_ty), mask=m)
        x = tl.load(X + rows[:, None] * stride_xn + cols[None, :].to(tl.int64) * stride_xk, mask=m, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            x = x.to(A.dtype.element_ty)
        x = tl.where(keep, x, tl.zeros_like(x))
        daT = tl.dot(tl.trans(x), ge, daT, input_precision=DOT_PREC)
    daT = daT * inv_keep
    tl.atomic_add(DA + rr[None, :] * K + cols[:, None], daT, mask=r_ok[None, :] & col_ok[:, None], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launchers (all launches go through _launch.launch)


def num_warps(r_pad: int) -> int:
    """4 warps (one warpgroup) at R_PAD 16; 8 at R_PAD 64, where 4 warps spill with fp32 tiles."""
    return 4 if r_pad <= 16 else 8


def _common(a_dtype: torch.dtype, r: int) -> dict:
    rp = pad_rank(r)
    return dict(R_PAD=rp, UPCAST=INTERPRET, DOT_PREC=dot_precision(a_dtype), num_warps=num_warps(rp))


def dropout_keep_mask(seed: int, n: int, k: int, dropout_p: float, device) -> torch.Tensor:
    """bool [n, k]: the keep mask the kernels use for ``seed`` and rate ``p``."""
    out = torch.empty((n, k), dtype=torch.int8, device=device)
    if n and k:
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
        seed_arg, thresh = dropout_args(dropout_p, seed)[:2]
        _launch.launch(_dropout_keep_mask_kernel, grid, out, n, k, seed_arg, thresh,
                       BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return out.bool()


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed) -> torch.Tensor:
    """t = dropout(x) Aᵀ, fp32 [N, r]; x [N, k] any strides; A [r, k] contiguous."""
    n, k = x.shape
    r = lora_A.shape[0]
    t = torch.empty((n, r), dtype=torch.float32, device=x.device)
    _launch.launch(
        _shrink_kernel, (triton.cdiv(n, BLOCK_N),),
        x, lora_A, t, n, k, r, x.stride(0), x.stride(1), *dropout_args(dropout_p, seed),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_stages=SHRINK_STAGES, **_common(lora_A.dtype, r),
    )
    return t


def expand_add(out: torch.Tensor, t: torch.Tensor, lora_E: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor) -> None:
    """out [N, d] (unit column stride) += (t ⊙ e) Bᵀ in place, e = E·s (s: [1] fp32 on out's device)."""
    n, d = out.shape
    r = lora_B.shape[1]
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(d, EXPAND_BLOCK_D))
    _launch.launch(
        _expand_add_kernel, grid, t, lora_E, s, lora_B, out, n, d, r, out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_D=EXPAND_BLOCK_D, **_common(lora_B.dtype, r),
    )


def grad_rank(g, t, lora_E, s, lora_B, ge, dB, dE) -> None:
    """ge = (g B) ⊙ e (written); dB [d, r] += gᵀ(t ⊙ e); dE [r] += s Σ (g B) ⊙ t (fp32 atomics)."""
    n, d = g.shape
    r = lora_B.shape[1]
    _launch.check_deterministic("the adapter backward (dB, dE)")
    _launch.launch(
        _grad_rank_kernel, (triton.cdiv(n, BLOCK_N),), g, t, lora_E, s, lora_B, ge, dB, dE, n, d, r,
        g.stride(0), g.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_D=GRAD_BLOCK_D, **_common(lora_B.dtype, r),
    )


def dA_dx(x, ge, lora_A, dx, dA, dropout_p: float, seed) -> None:
    """dA [r, k] += geᵀ dropout(x) (fp32 atomics); dx [N, k] += dropout-mask ⊙ (ge A)/(1-p) if dx given."""
    n, k = x.shape
    r = lora_A.shape[0]
    _launch.check_deterministic("the adapter backward (dA)")
    grid = (triton.cdiv(n, BLOCK_N * DA_ROW_BLOCKS), triton.cdiv(k, DA_BLOCK_K))
    _launch.launch(
        _dA_dx_kernel, grid, x, ge, lora_A, dx if dx is not None else x, dA, n, k, r,
        x.stride(0), x.stride(1), dx.stride(0) if dx is not None else 0, *dropout_args(dropout_p, seed),
        int(dx is not None),
        BLOCK_N=BLOCK_N, BLOCK_K=DA_BLOCK_K, ROW_BLOCKS=DA_ROW_BLOCKS, num_stages=DA_STAGES,
        **_common(lora_A.dtype, r),
    )


# ----------------------------------------------------------------------------------------------
# every configuration the launchers above can pick, for the sm_90 / sm_80 compile check


def compile_variants():
    """Yield (name, jit fn, signature, constexprs, options) for every config the launchers pick;
    options: num_warps, or a dict of compile options (num_warps, num_stages).

    Pointer dtypes follow DTYPE_PAIRS, R_PAD follows RANK_PADS, DOT_PREC "tf32" for fp32 adapters
    (the only fp32 binaries the GPU runs, see ``ops/adapter_linear._impl``); dropout and need-dx are runtime
    flags (one binary serves both values). Integer arguments get the specialisation a contiguous
    LLaMA-shaped launch gets (unit column strides become constexpr 1; pointers, leading strides and
    the widths K / D 16-divisible); ``bench/compile_check.py`` also compiles the widths unaligned.
    """
    def p(dt):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dt]

    yield ("dropout_keep_mask", _dropout_keep_mask_kernel,
           {"OUT": "*i8", "N": "i32", "K": "i32", "seed": "i64", "thresh": "i32",
            "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
           {"BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}, NUM_WARPS)
    # fp32 operands: only the TF32 binaries ship for the GPU; with torch's full-fp32 default the
    # layer op runs the torch implementation on CUDA (see ops/adapter_linear._impl): the FMA ("ieee")
    # dots of these 64-wide tiles spill on sm_90 and sm_80. Half operands ignore DOT_PREC.
    prec = "tf32"
    for base, adt in DTYPE_PAIRS:
        tag = f"{str(base)[6:]}/{str(adt)[6:]}" + (f",{prec}" if adt == torch.float32 else "")
        for rp in RANK_PADS:
            common = {"R_PAD": rp, "UPCAST": False, "DOT_PREC": prec}
            yield (f"shrink[{tag},R{rp}]", _shrink_kernel,
                   {"X": p(base), "A": p(adt), "T": "*fp32", "N": "i32", "K": "i32", "R": "i32",
                    "stride_xn": "i32", "stride_xk": "constexpr", "seed": "i64", "thresh": "i32",
                    "inv_keep": "fp32", "has_dropout": "i32", "R_PAD": "constexpr",
                    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "UPCAST": "constexpr",
                    "DOT_PREC": "constexpr"},
                   dict(common, stride_xk=1, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K),
                   {"num_warps": num_warps(rp), "num_stages": SHRINK_STAGES})
            yield (f"expand_add[{tag},R{rp}]", _expand_add_kernel,
                   {"T": "*fp32", "E": p(adt), "S": "*fp32", "B": p(adt), "OUT": p(base), "N": "i32",
                    "D": "i32", "R": "i32", "stride_on": "i32", "R_PAD": "constexpr",
                    "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "UPCAST": "constexpr", "DOT_PREC": "constexpr"},
                   dict(common, BLOCK_N=BLOCK_N, BLOCK_D=EXPAND_BLOCK_D), num_warps(rp))
            yield (f"grad_rank[{tag},R{rp}]", _grad_rank_kernel,
                   {"G": p(base), "T": "*fp32", "E": p(adt), "S": "*fp32", "B": p(adt), "GE": "*fp32",
                    "DB": "*fp32", "DE": "*fp32", "N": "i32", "D": "i32", "R": "i32", "stride_gn": "i32",
                    "stride_gd": "constexpr", "R_PAD": "constexpr", "BLOCK_N": "constexpr",
                    "BLOCK_D": "constexpr", "UPCAST": "constexpr", "DOT_PREC": "constexpr"},
                   dict(common, stride_gd=1, BLOCK_N=BLOCK_N, BLOCK_D=GRAD_BLOCK_D), num_warps(rp))
            yield (f"dA_dx[{tag},R{rp}]", _dA_dx_kernel,
                   {"X": p(base), "GE": "*fp32", "A": p(adt), "DX": p(base), "DA": "*fp32", "N": "i32",
                    "K": "i32", "R": "i32", "stride_xn": "i32", "stride_xk": "constexpr",
                    "stride_dxn": "i32", "seed": "i64", "thresh": "i32", "inv_keep": "fp32",
                    "has_dropout": "i32", "need_dx": "i32", "R_PAD": "constexpr",
                    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "ROW_BLOCKS": "constexpr",
                    "UPCAST": "constexpr", "DOT_PREC": "constexpr"},
                   dict(common, stride_xk=1, BLOCK_N=BLOCK_N, BLOCK_K=DA_BLOCK_K, ROW_BLOCKS=DA_ROW_BLOCKS),
                   {"num_warps": num_warps(rp), "num_stages": DA_STAGES})


__all__ = ["DTYPE_PAIRS", "check_dtypes", "dropout_keep_mask", "shrink", "expand_add", "grad_rank", "dA_dx",
           "compile_variants", "TL_DTYPE"]
