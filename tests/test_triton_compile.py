"""SASS lint: every Triton kernel, at every configuration its launcher can pick, compiled for sm_90
and sm_80, read from the cubin.

Runs ``bench/compile_check.py`` once per session in a subprocess without TRITON_INTERPRET (no GPU
needed: Triton's bundled ptxas builds the cubins, its bundled cuobjdump reads them; compiled
binaries are cached in ~/.triton), then checks, per (config, arch):

* no local-memory or stack spills; registers within :data:`REG_BUDGET`; shared memory under the
  chip's limit;
* the matrix kernels on the tensor cores (HGMMA on sm_90, HMMA on sm_80), except the full-fp32
  ("ieee") binaries, which are FMA dots by definition;
* no device-scope fence (MEMBAR.*.GPU / .SYS), cache invalidation (CCTL) or value-returning atomic
  (ATOMG) anywhere, unless the kernel is in :data:`DOCUMENTED_FENCES` with the reason, and never a
  device-scope fence inside a loop: accumulators are relaxed reductions (REDG / RED);
* the streaming kernels, compiled for 16-divisible widths (the LLaMA case), load their streamed
  tiles (:func:`streamed_tile`: x, g, out, dx) with 128-bit global loads (LDG.E.128 /
  LDGSTS.128) in their tile loop, or where a thread's share of a tile is narrower (the 16-column
  tiles of fp32 adapters at R_PAD 64 on an fp16 base) with loads of that share's full width (the
  small L2-resident operands A, B, t, ge may be narrower: r is not specialised), within
  :data:`TILE_INSN_BUDGET` SASS instructions per tile;
* the split binaries (``SPLIT``: the split-K shrink, the split-D grad_rank and the expand-add /
  dA_dx that sum their fp32 partials) pass the same checks, and the split tile loops cost what the
  unsplit ones do (the consumers' one loop sums partials: their figures are per program);
* the table of every config (registers, fences, atomics, instructions per tile, load widths) is
  written to ``sass_lint.md`` in the test's temporary directory and printed (``pytest -rP``).

A missing ptxas/cuobjdump is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL_KERNELS = {
    "_shrink_kernel",
    "_expand_add_kernel",
    "_grad_rank_kernel",
    "_dA_dx_kernel",
    "_orth_fwd_kernel",
    "_orth_bwd_kernel",
}
ALL_KERNELS = MATMUL_KERNELS | {"_dropout_keep_mask_kernel", "_importance_kernel", "_apply_mask_kernel"}
# the kernels that stream an N x k / N x d operand, and how many such operands one tile loads: x;
# out; g; x and dx
STREAMED_OPERANDS = {"_shrink_kernel": 1, "_expand_add_kernel": 1, "_grad_rank_kernel": 1, "_dA_dx_kernel": 2}
STREAMING = set(STREAMED_OPERANDS)


def streamed_tile(r) -> tuple:
    """(operands, elements of each) a tile of a compiled config streams, from its block sizes (the
    launchers' constexprs: BLOCK_N rows by BLOCK_K or BLOCK_D columns, times ROW_BLOCKS)."""
    b = r["blocks"]
    return STREAMED_OPERANDS[r["kernel"]], b["BLOCK_N"] * b.get("BLOCK_K", b.get("BLOCK_D", 0)) * b.get("ROW_BLOCKS", 1)


ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Kernels allowed a device-scope fence / value-returning atomic, and why (none: every accumulator
# is a relaxed reduction; a kernel that needs acquire/release adds itself here).
DOCUMENTED_FENCES: dict = {}

# Registers per thread. sm_90: 15 below the 255 cap, where ptxas starts spilling, so a kernel change
# that drifts towards it fails here first. sm_80: the cap itself; some configs sit close to it (the
# registers of every config are in kernels/COST.md's compile table).
REG_BUDGET = {90: 240, 80: 255}

# SASS instructions per tile (one iteration of the tile loop; the whole program when there is no
# loop), per warp, for the aligned binaries: ~15% above the largest config of each kernel on sm_90 /
# sm_80 (kernels/COST.md's compile table), so a change that adds layout conversions or scalar loads
# to a hot loop fails here (COST.md turns these counts into the issue bound).
TILE_INSN_BUDGET = {"_shrink_kernel": 700, "_grad_rank_kernel": 750, "_dA_dx_kernel": 4400, "_expand_add_kernel": 900}
# The "bf16x3" binaries (fp32 adapters on a bf16 base at torch's full-fp32 default) split each fp32
# operand into bf16 parts and run 3-6 tensor-core products per dot (kernels/triton_ops/adapter_linear._dot):
# their own budget, ~15% above their largest config the same way.
TILE_INSN_BUDGET_BF16X3 = {
    "_shrink_kernel": 950,
    "_grad_rank_kernel": 700,
    "_dA_dx_kernel": 4550,
    "_expand_add_kernel": 1170,
}
# On an fp16 base x and g take two bf16 parts: the shrink's and grad_rank's x / g dots run 5 products,
# not 3 (its grad_rank also runs 8 warps and one stage: kernels/triton_ops/adapter_linear.grad_rank_options).
TILE_INSN_BUDGET_BF16X3_FP16 = {**TILE_INSN_BUDGET_BF16X3, "_shrink_kernel": 1120, "_grad_rank_kernel": 950}
# At R_PAD 64 the bf16x3 shrink, grad_rank and dA_dx run narrower tiles of the width (fewer
# instructions per tile, more tiles: kernels/triton_ops/adapter_linear.BF16X3_R64_CONSTEXPRS) and stay in
# the budgets above; the expand-add keeps its 128-column tile and runs a 4x deeper u · B (6 products
# of K = 64): its own budget, ~15% above its largest config likewise.
TILE_INSN_BUDGET_BF16X3_R64 = {"_expand_add_kernel": 1630}

# The split expand-add (after a split-K shrink: its program also sums the shrink's fp32 partials, a
# loop counted once here, and its column-0 programs write t): its own budget, ~15% above its largest
# config likewise (sm_80 and R_PAD 64 load the partials in the dot's replicated layout: 1.5-1.8x the
# unsplit count, kernels/COST.md). The split shrink, grad_rank and dA_dx stay within the budgets above.
TILE_INSN_BUDGET_SPLIT = {"_expand_add_kernel": 1550}
TILE_INSN_BUDGET_SPLIT_BF16X3 = {"_expand_add_kernel": 1720}
TILE_INSN_BUDGET_SPLIT_BF16X3_R64 = {"_expand_add_kernel": 2290}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compile_check", "--json", str(out), "--jobs", str(os.cpu_count() or 1)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, f"bench.compile_check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out) as f:
        results = json.load(f)
    from bench.compile_check import table

    md = table(results)
    (out.parent / "sass_lint.md").write_text(md)
    print(md)
    return results


def _expected_configs():
    """Config names the launchers can pick, from the kernel modules (the interpreter is fine here)."""
    from adalora_fast import kernels

    return {v[0] for v in kernels.compile_variants()}


def test_every_kernel_and_config_compiled_for_both_archs(compiled):
    aligned = {r["name"] for r in compiled if r["aligned"]}
    assert aligned == _expected_configs()
    names = {(r["name"], r["arch"]) for r in compiled}
    assert names == {(n, a) for n, _ in names for a in (90, 80)}
    assert {r["kernel"] for r in compiled} == ALL_KERNELS
    unaligned = {r["kernel"] for r in compiled if not r["aligned"]}
    assert STREAMING | {"_dropout_keep_mask_kernel"} <= unaligned


def test_no_spills(compiled):
    bad = [(r["name"], r["arch"], r["local"], r["stack"]) for r in compiled if r["local"] or r["stack"]]
    assert not bad, f"local-memory / stack spills: {bad}"


def test_registers_within_budget(compiled):
    bad = [(r["name"], r["arch"], r["registers"]) for r in compiled if r["registers"] > REG_BUDGET[r["arch"]]]
    assert not bad, f"registers over {REG_BUDGET}: {bad}"


def test_shared_memory_under_limit(compiled):
    bad = [
        (r["name"], r["arch"], r["static_shared"] + r["dyn_shared"])
        for r in compiled
        if r["static_shared"] + r["dyn_shared"] > r["smem_limit"]
    ]
    assert not bad, f"shared memory over the chip's limit: {bad}"


def test_tensor_cores(compiled):
    for r in compiled:
        if r["kernel"] not in MATMUL_KERNELS:
            continue
        if "ieee" in r["name"]:
            assert r["hgmma"] == r["hmma"] == 0, f"{r['name']}: full-fp32 dots on the tensor cores?"
        elif r["arch"] == 90:
            assert r["hgmma"] > 0, f"{r['name']}: no HGMMA in sm_90 SASS"
        else:
            assert r["hmma"] > 0, f"{r['name']}: no HMMA in sm_80 SASS"


def test_no_device_scope_fences(compiled):
    in_loops = [(r["name"], r["arch"], r["membar_gpu_loop"]) for r in compiled if r["membar_gpu_loop"]]
    assert not in_loops, f"MEMBAR.*.GPU inside a loop: {in_loops}"
    bad = [
        (r["name"], r["arch"], r["membar_gpu"], r["errbar"], r["cctl"], r["atomic_ops"])
        for r in compiled
        if r["kernel"] not in DOCUMENTED_FENCES
        and (r["membar_gpu"] or r["cctl"] or any(op.startswith("ATOM") for op in r["atomic_ops"]))
    ]
    assert not bad, f"fenced (acq_rel) atomics: {bad}"


def test_accumulating_kernels_use_relaxed_reductions(compiled):
    for r in compiled:
        if r["kernel"] in ("_grad_rank_kernel", "_dA_dx_kernel"):
            assert r["atomics"] > 0 and all(op.startswith("RED") for op in r["atomic_ops"]), (
                r["name"],
                r["atomic_ops"],
            )
        if r["kernel"] in ("_orth_fwd_kernel", "_orth_bwd_kernel", "_shrink_kernel", "_expand_add_kernel"):
            assert r["atomics"] == 0, (r["name"], r["atomic_ops"])


def _bytes(loads):
    return {k: v * int(k.split(".")[1]) // 8 for k, v in loads.items()}


def _per_tile(r, key_loop, key_all):
    """A record's figure per tile: the tile loop's for the kernels that loop over tiles, the whole
    kernel's for those whose programs handle one tile (the split expand-add and dA_dx have a loop,
    but over the partials they sum, not over tiles)."""
    if r["kernel"] in _one_tile_per_program() or not r["loop_insns"]:
        return r[key_all]
    return r[key_loop]


def test_streaming_loads_are_128_bit(compiled):
    """Per thread and tile, loads 128 bits wide (or as wide as a thread's share of one streamed
    operand's tile, where that is less) carry at least the streamed tiles' share of bytes."""
    checked_narrow = 0
    for r in compiled:
        if r["kernel"] not in STREAMING or not r["aligned"]:
            continue
        loads = _per_tile(r, "loop_loads", "loads")
        base = r["name"].split("[")[1].split("/")[0]
        operands, elements = streamed_tile(r)
        share = elements * ELEMENT_BYTES[base] // (32 * r["num_warps"])  # bytes per thread and operand
        bits = min(128, 8 * share)
        checked_narrow += bits < 128
        wide = sum(b for k, b in _bytes(loads).items() if int(k.split(".")[1]) >= bits)
        assert wide >= operands * share, (
            f"{r['name']} sm_{r['arch']}: {wide} B per thread by {bits}-bit or wider loads in the tile "
            f"loop, the streamed tiles need {operands * share}: {loads}"
        )
    assert checked_narrow > 0  # the fp16-base R_PAD 64 bf16x3 tiles: 16 columns, 64 bits a thread


def _one_tile_per_program() -> set:
    """The kernels whose programs handle one tile (no tile loop in the SASS): expand_add always,
    dA_dx with one row tile per program (``DA_ROW_BLOCKS = 1``, the shipped configuration)."""
    from adalora_fast.kernels import adapter_linear as adapter

    return {"_expand_add_kernel"} | ({"_dA_dx_kernel"} if adapter.DA_ROW_BLOCKS == 1 else set())


def test_instructions_per_tile_within_budget(compiled):
    bad = []
    for r in compiled:
        if r["kernel"] in TILE_INSN_BUDGET and r["aligned"]:
            per_tile = _per_tile(r, "loop_insns", "insns")
            bf16x3 = ",bf16x3," in r["name"]
            budgets = TILE_INSN_BUDGET_BF16X3 if bf16x3 else TILE_INSN_BUDGET
            if "[float16/float32,bf16x3," in r["name"]:
                budgets = TILE_INSN_BUDGET_BF16X3_FP16
            r64 = bf16x3 and ",R64" in r["name"]
            if r64:
                budgets = {**budgets, **TILE_INSN_BUDGET_BF16X3_R64}
            if r["name"].endswith(",split]"):
                split = TILE_INSN_BUDGET_SPLIT_BF16X3 if bf16x3 else TILE_INSN_BUDGET_SPLIT
                budgets = {**budgets, **split, **(TILE_INSN_BUDGET_SPLIT_BF16X3_R64 if r64 else {})}
            budget = budgets[r["kernel"]]
            if per_tile > budget:
                bad.append((r["name"], r["arch"], per_tile))
            if r["kernel"] not in _one_tile_per_program():
                assert r["loop_insns"] > 0, f"{r['name']}: no tile loop found in the SASS"
    assert not bad, f"SASS instructions per tile over their budget: {bad}"


def test_split_tile_loops_cost_what_the_unsplit_ones_do(compiled):
    """The split-K shrink and split-D grad_rank walk the unsplit kernels' tiles, over a chunk of the
    width: per tile within 10% of the unsplit binary's instructions, and the same 128-bit loads."""
    unsplit = {(r["name"], r["arch"]): r for r in compiled if r["aligned"] and ",split]" not in r["name"]}
    checked = 0
    for r in compiled:
        if r["kernel"] not in ("_shrink_kernel", "_grad_rank_kernel") or not r["aligned"]:
            continue
        if not r["name"].endswith(",split]"):
            continue
        u = unsplit[(r["name"].replace(",split]", "]"), r["arch"])]
        assert r["loop_insns"] <= 1.1 * u["loop_insns"], (r["name"], r["arch"], r["loop_insns"], u["loop_insns"])
        wide = {k: v for k, v in r["loop_loads"].items() if k.endswith(".128")}
        assert wide == {k: v for k, v in u["loop_loads"].items() if k.endswith(".128")}, (r["name"], r["arch"])
        checked += 1
    assert checked >= 2 * 2 * 10  # both kernels, both archs, every dtype pair and rank pad


def test_sass_parser_on_a_listing():
    """The SASS reader on a hand-made listing: a loop, fences by scope, load widths, atomics."""
    from bench.compile_check import sass_stats

    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P0 LDG.E.U16 R8, desc[UR4][R2.64] ;
        /*0030*/                   MEMBAR.ALL.GPU ;
        /*0040*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R9 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   MEMBAR.ALL.CTA ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""
    st = sass_stats(listing)
    assert st["n_loops"] == 1 and st["loop_insns"] == 5
    assert st["membar_gpu"] == st["membar_gpu_loop"] == 1 and st["membar_cta"] == 1 and st["membar_cta_loop"] == 0
    assert st["loop_loads"] == {"LDG.128": 1, "LDG.16": 1}
    assert st["atomic_ops"] == ["REDG.E.ADD.F32.FTZ.RN.STRONG.GPU"] and st["atomics_loop"] == 1
    assert st["insns"] == 8  # the BRA-to-itself padding after EXIT is not counted
