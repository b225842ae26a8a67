"""Orthogonal penalty of every A and B matrix: one forward launch, one backward launch.

loss = (1/n) Σ_M ‖G_M − I‖_F, G = A Aᵀ for A [r, k] and G = Bᵀ B for B [d, r] (not squared,
PEFT's form); n counts every A and B (r = 0 matrices add 0, as in PEFT). Each matrix is seen as
M [r, c] (A as is; B through its transpose: row stride 1, column stride r) so G = M Mᵀ for both.
The Gram tile is [R_M = 64, R_N] with R_N = 16 or 64 (the padded largest rank): 64 rows because the
HGMMA tile M is 64, only R_N columns so the padding wastes 4x, not 28x, of the FLOPs at r = 12;
zeros fill the pad (masked loads). r <= 64 is supported.

``_orth_fwd_kernel``: one program per matrix: G = M Mᵀ over c in tiles of BLOCK_C, D = G − I,
norm = ‖D‖_F; writes G (r×r, for backward) and the norm. Reads every A and B once. The loss is
``norms.sum() / n`` (one torch reduction, deterministic: no atomics in either kernel).
``_orth_bwd_kernel``: one program per (matrix, BLOCK_C columns): dM = (dloss/n)·2·D M/‖D‖
(0 where ‖D‖ = 0); reads M once, writes dM once into one flat fp32 buffer whose slices are the
gradients. The upstream gradient is read from device memory (no host sync).

LLaMA-7B (224 linears adapted, r = 12, fp32 adapters, 30.0 M A/B elements, 120 MB): forward
reads 120 MB, 2·64·16·Σc = 5.1 GFLOP TF32 on the padded tile → 40 µs predicted (memory-bound);
backward reads 120 MB and writes 120 MB → 80 µs predicted. PEFT's loop: 448 x (Gram, eye, sub,
norm) forward and ~5 ops per matrix backward, ~4000 launches (see COST.md). Dots follow torch's
TF32 switch on the GPU (full fp32 by default, see ``_launch.dot_precision``), exact fp32 in the
interpreter.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import INTERPRET, RANK_PADS, dot_precision, dot_precisions, pad_rank

R_M = 64  # Gram rows padded to 64: the HGMMA tile M
BLOCK_C = 64
BWD_BLOCK_C = 128
NUM_WARPS = 4
# full fp32 ("ieee": FMA dots, torch's default) at R_N = 64 spills with 4 warps and 128 columns:
# 8 warps, and 32 columns per backward tile (bench/compile_check.py)
IEEE_R64_WARPS = 8
IEEE_BWD_BLOCK_C = 32


def _config(prec: str, r_n: int):
    """(num_warps, backward columns per tile) for dot precision ``prec`` at padded rank ``r_n``."""
    if prec == "ieee" and r_n > 16:
        return IEEE_R64_WARPS, IEEE_BWD_BLOCK_C
    return NUM_WARPS, BWD_BLOCK_C


MAX_RANK = R_M
# matrix table row: ptr, r, c, stride_r, stride_c, gram_off, grad_off, (pad)
_F = tl.constexpr(8)  # int64 fields per matrix record (the host table below writes 8)


@triton.jit
def _matrix_record(MATS, i, MAT_DT: tl.constexpr):
    """Row i of the matrix table: (pointer, rows, cols, row stride, col stride, gram_off, grad_off);
    the matrices are ``MAT_DT`` (fp32, bf16 or fp16: read as they are, upcast to fp32 in registers)."""
    rec = MATS + i * _F
    mp = tl.load(rec).to(tl.pointer_type(MAT_DT))
    return (
        mp,
        tl.load(rec + 1),
        tl.load(rec + 2),
        tl.load(rec + 3),
        tl.load(rec + 4),
        tl.load(rec + 5),
        tl.load(rec + 6),
    )


@triton.jit
def _orth_fwd_kernel(
    MATS,
    GRAM,
    NORMS,
    R_M: tl.constexpr,
    R_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MAT_DT: tl.constexpr,
):
    """G[:r, :r] = M Mᵀ as a [R_M=64, R_N] tile (rows padded to 64 for HGMMA, columns to R_N)."""
    i = tl.program_id(0)
    mp, nr, nc, sr, sc, goff, _ = _matrix_record(MATS, i, MAT_DT)
    rm = tl.arange(0, R_M)
    rn = tl.arange(0, R_N)
    G = tl.zeros((R_M, R_N), dtype=tl.float32)
    for c0 in range(0, nc, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols[None, :] < nc
        mm = tl.load(mp + rm[:, None] * sr + cols[None, :] * sc, mask=(rm[:, None] < nr) & c_ok, other=0.0)
        mn = tl.load(mp + rn[:, None] * sr + cols[None, :] * sc, mask=(rn[:, None] < nr) & c_ok, other=0.0)
        mm, mn = mm.to(tl.float32), mn.to(tl.float32)
        G = tl.dot(mm, tl.trans(mn), G, input_precision=DOT_PREC)
    gm = (rm[:, None] < nr) & (rn[None, :] < nr)
    D = G - tl.where((rm[:, None] == rn[None, :]) & gm, 1.0, 0.0)
    norm = tl.sqrt(tl.sum(tl.sum(D * D, axis=1), axis=0))
    tl.store(GRAM + goff + rm[:, None] * nr + rn[None, :], G, mask=gm)
    tl.store(NORMS + i, norm)


@triton.jit
def _orth_bwd_kernel(
    MATS,
    TILES,
    GRAM,
    NORMS,
    GOUT,
    GRAD,
    two_inv_n,
    R_M: tl.constexpr,
    R_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MAT_DT: tl.constexpr,
):
    """dM[:, tile] = coef · D M[:, tile], D = G − I as [R_M=64, R_N] (K = R_N)."""
    tile = tl.program_id(0)
    i = tl.load(TILES + tile * 2)
    c0 = tl.load(TILES + tile * 2 + 1)
    mp, nr, nc, sr, sc, goff, doff = _matrix_record(MATS, i, MAT_DT)
    rm = tl.arange(0, R_M)
    rn = tl.arange(0, R_N)
    gm = (rm[:, None] < nr) & (rn[None, :] < nr)
    G = tl.load(GRAM + goff + rm[:, None] * nr + rn[None, :], mask=gm, other=0.0)
    D = G - tl.where((rm[:, None] == rn[None, :]) & gm, 1.0, 0.0)
    norm = tl.load(NORMS + i)
    coef = tl.load(GOUT).to(tl.float32) * two_inv_n / tl.where(norm > 0, norm, 1.0)
    coef = tl.where(norm > 0, coef, 0.0)
    cols = c0 + tl.arange(0, BLOCK_C)
    c_ok = cols[None, :] < nc
    mn = tl.load(mp + rn[:, None] * sr + cols[None, :] * sc, mask=(rn[:, None] < nr) & c_ok, other=0.0)
    mn = mn.to(tl.float32)
    dm = tl.dot(D, mn, input_precision=DOT_PREC) * coef
    tl.store(GRAD + doff + rm[:, None] * sr + cols[None, :] * sc, dm, mask=(rm[:, None] < nr) & c_ok)


_table_cache: dict = {}


def _tables(work_A: Sequence[torch.Tensor], work_B: Sequence[torch.Tensor], order=None, bwd_block=BWD_BLOCK_C):
    """(matrix table, tile table, Gram elements, gradient elements, largest rank) of fp32 contiguous
    matrices; the tables are cached per set of addresses (no host-to-device copy per step).
    ``order``: positions (A then B) in the order their gradients follow each other in the flat
    gradient buffer (default: A then B)."""
    mats = list(work_A) + list(work_B)
    grad_off, acc = [0] * len(mats), 0
    for i in order if order is not None else range(len(mats)):
        grad_off[i] = acc
        acc += mats[i].numel()
    vals, tiles, gram_n, grad_n, max_r = [], [], 0, 0, 0
    n_live = 0
    for j, (m, is_A) in enumerate([(a, True) for a in work_A] + [(b, False) for b in work_B]):
        rows, cols = (m.shape[0], m.shape[1]) if is_A else (m.shape[1], m.shape[0])
        if rows > MAX_RANK:
            raise NotImplementedError(f"orth_penalty: rank {rows} > {MAX_RANK} is not supported by the Triton kernels")
        sr, sc = (cols, 1) if is_A else (1, rows)
        if rows > 0 and cols > 0:
            vals += [m.data_ptr(), rows, cols, sr, sc, gram_n, grad_off[j], 0]
            tiles += [[n_live, c0] for c0 in range(0, cols, bwd_block)]
            n_live += 1
            gram_n += rows * rows
            max_r = max(max_r, rows)
        grad_n += m.numel()
    devs = {m.device for m in mats}
    if len(devs) != 1:
        raise ValueError(
            f"orth_penalty: lora_A and lora_B matrices must be on one device, got {sorted(map(str, devs))}"
        )
    dev = devs.pop()
    key = (str(dev), bwd_block, tuple(vals))
    tabs = _table_cache.get(key)
    if tabs is None and n_live:
        if len(_table_cache) >= 8:
            _table_cache.pop(next(iter(_table_cache)))
        tabs = (_launch.to_device_table(vals, dev), _launch.to_device_table([v for t in tiles for v in t], dev))
        _table_cache[key] = tabs
    return tabs, n_live, gram_n, grad_n, max_r


_MAT_DT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_FAST: dict = {}  # the tables of the very parameters a training step passes every time (see _work_tables)


def _fp32(ms: Sequence[torch.Tensor]) -> list:
    return [m.detach().float().contiguous() for m in ms]


def _work_tables(lora_A, lora_B, order=None, bwd_block=BWD_BLOCK_C):
    """(matrices the kernels read, their dtype as a tl dtype, :func:`_tables`' result).

    The parameters themselves when they share one dtype (fp32, bf16 or fp16: the kernels upcast in
    registers) and are contiguous, with the tables cached by the parameters' identities and checked
    against their addresses and shapes (a step passes the same parameters every time: no table walk,
    no upload, nothing per matrix but two reads); else fp32 contiguous copies (tables rebuilt)."""
    mats = list(lora_A) + list(lora_B)
    key = (bwd_block, order, tuple(map(id, mats)))
    hit = _FAST.get(key)
    if hit is not None and hit[0] == [m.data_ptr() for m in mats] and hit[1] == [m.shape for m in mats]:
        return mats, hit[2], hit[3]
    dt = mats[0].dtype
    if dt in _MAT_DT and all(m.dtype == dt and m.is_contiguous() for m in mats):
        res = _tables(lora_A, lora_B, order, bwd_block)
        if len(_FAST) >= 8:
            _FAST.pop(next(iter(_FAST)))
        _FAST[key] = ([m.data_ptr() for m in mats], [m.shape for m in mats], _MAT_DT[dt], res)
        return mats, _MAT_DT[dt], res
    work_A, work_B = _fp32(lora_A), _fp32(lora_B)
    return work_A + work_B, tl.float32, _tables(work_A, work_B, order, bwd_block)


def forward(lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor]):
    """(loss [] fp32, gram [Σr²] fp32, norms [n_nonempty] fp32) for lora_A [r_i, k_i], lora_B [d_i, r_i]:
    one launch (+ 1 sum of the norms). ``gram``/``norms`` are what :func:`backward` needs."""
    mats, mat_dt, (tabs, n_live, gram_n, _, max_r) = _work_tables(lora_A, lora_B)
    n_total = len(mats)
    dev = mats[0].device
    gram = torch.empty(gram_n, dtype=torch.float32, device=dev)
    norms = torch.empty(n_live, dtype=torch.float32, device=dev)
    if n_live:
        prec, r_n = dot_precision(torch.float32), pad_rank(max_r)
        _launch.launch(
            _orth_fwd_kernel,
            (n_live,),
            tabs[0],
            gram,
            norms,
            R_M=R_M,
            R_N=r_n,
            BLOCK_C=BLOCK_C,
            DOT_PREC=prec,
            MAT_DT=mat_dt,
            num_warps=_config(prec, r_n)[0],
        )
    loss = norms.sum() * (1.0 / n_total)  # fixed-order reduction: the same bits every run
    return loss, gram, norms


def backward(
    gout: torch.Tensor,
    lora_A: Sequence[torch.Tensor],
    lora_B: Sequence[torch.Tensor],
    gram: torch.Tensor,
    norms: torch.Tensor,
    order: Sequence[int],
) -> torch.Tensor:
    """d loss / d M of every matrix as one flat fp32 buffer, the matrices' gradients one after the
    other in ``order`` (positions in the A-then-B list): one launch."""
    prec = dot_precision(torch.float32)
    max_r = max([m.shape[0] for m in lora_A] + [m.shape[1] for m in lora_B] + [0])
    warps, block = _config(prec, pad_rank(min(max(max_r, 1), MAX_RANK)))
    mats, mat_dt, (tabs, n_live, _, grad_n, max_r) = _work_tables(lora_A, lora_B, tuple(order), block)
    n_total = len(mats)
    dev = mats[0].device
    grad = torch.empty(grad_n, dtype=torch.float32, device=dev)
    if n_live:
        mtab, ttab = tabs
        _launch.launch(
            _orth_bwd_kernel,
            (ttab.numel() // 2,),
            mtab,
            ttab,
            gram,
            norms,
            gout.contiguous(),
            grad,
            2.0 / n_total,
            R_M=R_M,
            R_N=pad_rank(max_r),
            BLOCK_C=block,
            DOT_PREC=prec,
            MAT_DT=mat_dt,
            num_warps=warps,
        )
    return grad  # a matrix the kernel skips (r = 0 or no columns) has no elements to fill


def compile_variants():
    """Every config the launchers pick (see ``adapter_linear.compile_variants``)."""
    for rn in RANK_PADS:
        for prec in dot_precisions(torch.float32):
            warps, bwd_block = _config(prec, rn)
            for tdt, mdt in _MAT_DT.items():
                tag = f"{prec},R{rn}" + ("" if tdt == torch.float32 else f",{str(tdt)[6:]}")
                yield (
                    f"orth_fwd[{tag}]",
                    _orth_fwd_kernel,
                    {
                        "MATS": "*i64",
                        "GRAM": "*fp32",
                        "NORMS": "*fp32",
                        "R_M": "constexpr",
                        "R_N": "constexpr",
                        "BLOCK_C": "constexpr",
                        "DOT_PREC": "constexpr",
                        "MAT_DT": "constexpr",
                    },
                    {"R_M": R_M, "R_N": rn, "BLOCK_C": BLOCK_C, "DOT_PREC": prec, "MAT_DT": mdt},
                    warps,
                )
                yield (
                    f"orth_bwd[{tag}]",
                    _orth_bwd_kernel,
                    {
                        "MATS": "*i64",
                        "TILES": "*i64",
                        "GRAM": "*fp32",
                        "NORMS": "*fp32",
                        "GOUT": "*fp32",
                        "GRAD": "*fp32",
                        "two_inv_n": "fp32",
                        "R_M": "constexpr",
                        "R_N": "constexpr",
                        "BLOCK_C": "constexpr",
                        "DOT_PREC": "constexpr",
                        "MAT_DT": "constexpr",
                    },
                    {"R_M": R_M, "R_N": rn, "BLOCK_C": bwd_block, "DOT_PREC": prec, "MAT_DT": mdt},
                    warps,
                )


__all__ = ["forward", "backward", "compile_variants", "INTERPRET"]
