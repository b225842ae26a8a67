"""Importance update of every adapted layer in one launch (``adalora_fast::importance_update`` and
``triplet_scores``, ``ops/importance.py``).

Pointer tables let one Triton program walk many tensors: a tensor table (one int64 row per adapter
tensor: parameter address, gradient address, offset in the flat state, rows, cols, row stride,
col stride, first triplet) and a tile table (tensor, first row, first column per program).
Every tensor is seen as an [r, c] matrix whose rows are triplets: A [r, k] as is, E [r, 1] as is,
and B [d, r] through its transpose (row stride 1, column stride r), so one code path reduces
A rows, B columns and E entries to per-triplet sums.

``_importance_kernel`` per element (PEFT ``update_ipt`` + ``_element_score``)::

    ipt = |p·g|;  m1 = β1·m1 + (1-β1)·ipt;  m2 = β2·m2 + (1-β2)·|ipt - m1|;  score = m1·m2

with m1, m2 fp32 updated in place in the allocator's flat buffers, and (WANT_SCORES) the
per-triplet score ``E + mean_row(A) + mean_col(B)`` accumulated into a zeroed [Σr] fp32 vector
with fp32 atomics (one add per (tile, row)). UPDATE=False only reads m1, m2 (``triplet_scores``).
An element whose ipt is not finite keeps its m1 and m2 and counts in its tensor's int64 counter
in SKIPPED (one relaxed atomic per tile that saw one, none otherwise).

Bytes per adapter element: read p, g, m1, m2 and write m1, m2 = 24 B (fp32), ~10 FLOPs, one pass.
LLaMA-7B (all 224 linears adapted, r=12: 30.0 M adapter elements): 720 MB → 240 µs predicted,
1 launch (+1 memset of the 10.8 KB score vector). PEFT's loop: 10 elementwise ops per tensor
(96 B per element, 2.88 GB → 960 µs predicted) and 6720 launches (see COST.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

TILE_R = 16  # triplet rows per program
TILE_C = 128  # columns per program
NUM_WARPS = 4
# int64 fields per tensor record (the table ops/importance.py builds): p_ptr, g_ptr, state_off, rows, cols,
# stride_r, stride_c, triplet_off
_TENSOR_FIELDS = tl.constexpr(8)


@triton.jit
def _importance_kernel(
    TENS,
    TILES,
    M1,
    M2,
    SCORES,
    SKIPPED,
    beta1,
    omb1,
    beta2,
    omb2,
    UPDATE: tl.constexpr,
    WANT_SCORES: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """One program per tile [TILE_R triplets, TILE_C columns] of one adapter tensor."""
    tile = tl.program_id(0)
    ti = tl.load(TILES + tile * 3)
    row0 = tl.load(TILES + tile * 3 + 1)
    col0 = tl.load(TILES + tile * 3 + 2)
    rec = TENS + ti * _TENSOR_FIELDS
    soff = tl.load(rec + 2)  # int64 offset of the tensor in the flat state
    nr = tl.load(rec + 3).to(tl.int32)
    nc = tl.load(rec + 4).to(tl.int32)
    sr = tl.load(rec + 5).to(tl.int32)
    sc = tl.load(rec + 6).to(tl.int32)
    rows = row0.to(tl.int32) + tl.arange(0, TILE_R)
    cols = col0.to(tl.int32) + tl.arange(0, TILE_C)
    m = (rows[:, None] < nr) & (cols[None, :] < nc)
    off = rows[:, None] * sr + cols[None, :] * sc  # int32 within one tensor (numel < 2**31)
    m1p = M1 + soff
    m2p = M2 + soff
    m1 = tl.load(m1p + off, mask=m, other=0.0)
    m2 = tl.load(m2p + off, mask=m, other=0.0)
    if UPDATE:
        pp = tl.load(rec).to(tl.pointer_type(tl.float32))
        gp = tl.load(rec + 1).to(tl.pointer_type(tl.float32))
        pv = tl.load(pp + off, mask=m, other=0.0)
        gv = tl.load(gp + off, mask=m, other=0.0)
        ipt = tl.abs(pv * gv)
        ok = (ipt - ipt) == 0.0  # False for NaN and inf: the element keeps its state this step
        n1 = beta1 * m1 + omb1 * ipt
        n2 = beta2 * m2 + omb2 * tl.abs(ipt - n1)
        m1 = tl.where(ok, n1, m1)
        m2 = tl.where(ok, n2, m2)
        tl.store(m1p + off, m1, mask=m)
        tl.store(m2p + off, m2, mask=m)
        n_bad = tl.sum(tl.sum((m & ~ok).to(tl.int64), axis=1), axis=0)
        tl.atomic_add(SKIPPED + ti, n_bad, mask=n_bad > 0, sem="relaxed")
    if WANT_SCORES:
        trip = tl.load(rec + 7)
        part = tl.sum(tl.where(m, m1 * m2, 0.0), axis=1) / nc.to(tl.float32)
        tl.atomic_add(SCORES + trip + rows, part, mask=rows < nr, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# launchers: tensors and ints only (the caller builds the tables, see adalora_fast/ops/importance.py)


def importance(
    tens: torch.Tensor,
    tiles: torch.Tensor,
    m1: torch.Tensor,
    m2: torch.Tensor,
    scores: torch.Tensor,
    skipped: torch.Tensor,
    beta1: float,
    beta2: float,
    update: bool,
    want_scores: bool,
) -> None:
    """One launch over every tile of ``tiles`` ([n_tiles, 3] int64: tensor, first row, first column).

    ``tens``: [T, 8] int64 records (p address, g address, state offset, rows, cols, row stride,
    column stride, first triplet); p and g fp32 contiguous, alive until the launch returns. m1, m2:
    the flat fp32 state, updated in place when ``update``; ``scores``: zeroed [Σr] fp32, accumulated
    into when ``want_scores`` (pass m1 otherwise, it is not touched); ``skipped``: int64 [T], the
    count of non-finite elements (left unchanged) is added per tensor when ``update``.
    """
    if m1.dtype != torch.float32 or m2.dtype != torch.float32 or not (m1.is_contiguous() and m2.is_contiguous()):
        raise TypeError("importance: m1 and m2 must be contiguous fp32 buffers")
    if skipped.dtype != torch.int64:
        raise TypeError("importance: skipped must be an int64 counter")
    n_tiles = tiles.numel() // 3
    if n_tiles == 0:
        return
    if want_scores:
        _launch.check_deterministic("the triplet scores (importance_update / triplet_scores)")
    _launch.launch(
        _importance_kernel,
        (n_tiles,),
        tens,
        tiles,
        m1,
        m2,
        scores,
        skipped,
        float(beta1),
        1.0 - float(beta1),
        float(beta2),
        1.0 - float(beta2),
        UPDATE=bool(update),
        WANT_SCORES=bool(want_scores),
        TILE_R=TILE_R,
        TILE_C=TILE_C,
        num_warps=NUM_WARPS,
    )


def compile_variants():
    """Every config the launcher picks (see ``adapter_linear.compile_variants``)."""
    for update, want in ((True, False), (True, True), (False, True)):
        yield (
            f"importance[update={int(update)},scores={int(want)}]",
            _importance_kernel,
            {
                "TENS": "*i64",
                "TILES": "*i64",
                "M1": "*fp32",
                "M2": "*fp32",
                "SCORES": "*fp32",
                "SKIPPED": "*i64",
                "beta1": "fp32",
                "omb1": "fp32",
                "beta2": "fp32",
                "omb2": "fp32",
                "UPDATE": "constexpr",
                "WANT_SCORES": "constexpr",
                "TILE_R": "constexpr",
                "TILE_C": "constexpr",
            },
            {"UPDATE": update, "WANT_SCORES": want, "TILE_R": TILE_R, "TILE_C": TILE_C},
            NUM_WARPS,
        )
