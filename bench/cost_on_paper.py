"""Cost on paper: bytes moved and FLOPs of our kernels and of PEFT's op sequence, H100 roofline.

``python -m bench.cost_on_paper [--sass RESULTS.json]`` (from the repository root) prints the tables
of ``kernels/COST.md``.
PREDICTED numbers, from counting bytes and FLOPs and from the compiled SASS: nothing here was
measured on a GPU. Roofline per op: time = max(bytes / 3.0 TB/s, FLOPs / peak), peak 790 TFLOP/s
for bf16/fp16 operands and 395 TFLOP/s for TF32. Launch overheads are not in the times; the launch
counts are listed separately.

Our four layer kernels also get (:func:`kernel_table`, unsplit; :func:`split_table`, the split-K shrink
and split-D grad_rank the launchers pick at these shapes) a bandwidth bound at 90 % and 70 % of the
3.0 TB/s roofline (what real kernels reach) and an issue bound read from their sm_90 SASS
(``bench/compile_check.py``): warp instructions = warps x (instructions per tile x tiles +
the rest of the program x programs), issued at one per cycle per scheduler,
/ (132 SMs x 4 schedulers x 1.755 GHz); the prediction is the larger of the two.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile

BW = 3.0e12
PEAK = {"bf16": 790e12, "tf32": 395e12}
N, R, RP = 8192, 12, 16  # tokens, rank, rank padded inside our kernels
H = 2  # bytes of a bf16 activation / weight element
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (k, d)


def cdiv(a, b):
    return -(-a // b)


def t_us(nbytes, flops, peak="bf16"):
    return max(nbytes / BW, flops / PEAK[peak]) * 1e6


def split_factors(k, d):
    """(S_k, S_d): the ways the shipped plan (``kernels/triton_ops/adapter_linear.split_plan``) splits
    the shrink over k and grad_rank over d at N tokens on an H100 (SMS x 4 resident programs)."""
    from adalora_fast.kernels import adapter_linear as ka

    slots = SMS * ka.SPLIT_PROGRAMS_PER_SM
    return ka.split_plan(N, k, ka.BLOCK_K, slots)[0], ka.split_plan(N, d, ka.GRAD_BLOCK_D, slots)[0]


def ours(k, d, split=False):
    """[(phase, op, bytes, flops)] of our path for one adapted layer (bf16 autocast, p > 0); with
    ``split`` the split-K shrink / split-D grad_rank the plan picks at these shapes (fp32 partials
    [S, N, r]: written by the producer, read by the consumer, which also writes the summed t)."""
    sk, sd = split_factors(k, d) if split else (1, 1)
    tag_k = f" (split-K, S={sk})" if sk > 1 else ""
    tag_d = f" (split-D, S={sd})" if sd > 1 else ""
    return [
        ("fwd", "x Wᵀ + b (cuBLAS)", H * (N * k + d * k + N * d + d), 2 * N * k * d),
        ("fwd", f"_shrink_kernel{tag_k}: t = dropout(x) Aᵀ", H * N * k + H * R * k + 4 * N * R * sk, 2 * N * k * RP),
        (
            "fwd",
            f"_expand_add_kernel{' (sums the partials, writes t)' if sk > 1 else ''}: out += (t⊙e) Bᵀ",
            2 * H * N * d + 4 * N * R * sk + (4 * N * R if sk > 1 else 0) + H * d * R,
            2 * N * d * RP,
        ),
        ("bwd", "dx = g W (cuBLAS)", H * (N * d + d * k + N * k), 2 * N * k * d),
        ("bwd", "memset fp32 dA/dB/dE accumulator", 4 * (R * k + d * R + R), 0),
        (
            "bwd",
            f"_grad_rank_kernel{tag_d}: gB, dB, dE, ge (1 pass over g)",
            H * N * d + 4 * N * R + 4 * N * R * sd + 4 * cdiv(N, 64) * (d + sd) * R,
            4 * N * d * RP,
        ),
        (
            "bwd",
            f"_dA_dx_kernel{' (sums the ge partials)' if sd > 1 else ''}: dA, dx += (1 pass over x, RMW dx)",
            H * N * k + 2 * H * N * k + 4 * N * R * sd + 4 * cdiv(N, 64) * R * k,
            4 * N * k * RP,
        ),
        ("bwd", "cast accumulator to bf16", 6 * (R * k + d * R + R), 0),
    ]


def peft(k, d):
    """PEFT 0.21 ``SVDLinear.forward`` under bf16 autocast with lora_dropout > 0, and its autograd."""
    Nd, Nk, Nr = N * d, N * k, N * R
    return [
        ("fwd", "base_layer(x) (cuBLAS)", H * (Nk + d * k + Nd + d), 2 * N * k * d),
        ("fwd", "dropout(x): x_d + bool mask", H * Nk + H * Nk + Nk, 0),
        ("fwd", "lora_A * lora_E, casts", 4 * 3 * R * k, 0),
        ("fwd", "x_d @ (A*E)ᵀ", H * Nk + H * Nr, 2 * N * k * R),
        ("fwd", "@ lora_Bᵀ", H * Nr + H * Nd, 2 * N * d * R),
        ("fwd", "* scaling", 2 * H * Nd, 0),
        ("fwd", "/ (ranknum + 1e-5) (promotes to fp32)", H * Nd + 4 * Nd, 0),
        ("fwd", "result += (bf16 += fp32)", H * Nd + 4 * Nd + H * Nd, 0),
        ("bwd", "dx = g W (cuBLAS)", H * (Nd + d * k + Nk), 2 * N * k * d),
        ("bwd", "grad of the fp32 term: g → fp32", H * Nd + 4 * Nd, 0),
        ("bwd", "DivBackward", 8 * Nd, 0),
        ("bwd", "cast grad back to bf16", 4 * Nd + H * Nd, 0),
        ("bwd", "MulBackward (scaling)", 2 * H * Nd, 0),
        ("bwd", "MmBackward @Bᵀ: grad_u, dB", H * Nd + H * Nr + H * Nd + H * Nr, 4 * N * d * R),
        ("bwd", "MmBackward @(A*E)ᵀ: grad_xd, d(A*E)", H * Nr + H * Nk + H * Nk + H * Nr, 4 * N * k * R),
        ("bwd", "dropout backward: grad_xd ⊙ mask / (1-p)", H * Nk + Nk + H * Nk, 0),
        ("bwd", "dx = dx_base + grad_x", 3 * H * Nk, 0),
    ]


# H100 SXM: SMs, warp schedulers per SM (one warp instruction each per cycle), clock under load
SMS, SCHEDULERS, CLOCK = 132, 4, 1.755e9
BW_FACTORS = (0.9, 0.7)  # achievable share of the copy roofline
SASS_CONFIG = "bfloat16/bfloat16,R16"  # bf16 autocast: x, g and the adapters bf16; r = 12 pads to 16


def compile_records(path=None, config=SASS_CONFIG) -> list:
    """``bench.compile_check``'s records: read from ``path`` (a ``--json`` result), or from one
    compile_check run of the binaries named ``config`` (cached in ~/.triton)."""
    if path is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sass.json")
            subprocess.run(
                [sys.executable, "-m", "bench.compile_check", "--only", config, "--json", path],
                cwd=root,
                env=env,
                check=True,
                capture_output=True,
            )
            with open(path) as f:
                return json.load(f)
    with open(path) as f:
        return json.load(f)


def sass_counts(path=None, split=False, config=SASS_CONFIG, records=None) -> dict:
    """{kernel: compile_check record} of the sm_90 binaries the scenario runs (aligned widths), the
    unsplit ones or with ``split`` the split ones (name suffix ",split"); ``config`` names the
    binaries (the dtype pair, precision and rank pad of ``compile_variants``). From ``records``
    (:func:`compile_records`, so one compile_check run serves the unsplit and the split counts), else
    from :func:`compile_records` of ``path`` (a ``bench.compile_check --json`` result, or None: a run)."""
    if records is None:
        records = compile_records(path, config)
    return {
        r["kernel"]: r
        for r in records
        if r["arch"] == 90 and r.get("aligned", True) and r["name"].endswith(f"[{config}{',split' if split else ''}]")
    }


def launch_shape(kernel: str, k: int, d: int, split=False):
    """(programs, tiles, warps per program) of one launch at N tokens (the grids of
    kernels/triton_ops/adapter_linear.py); ``split``: the split-K shrink / split-D grad_rank grids
    (S x the programs, the same tiles)."""
    sk, sd = split_factors(k, d) if split else (1, 1)
    return {
        "_shrink_kernel": (cdiv(N, 64) * sk, cdiv(N, 64) * cdiv(k, 64), 4),
        "_expand_add_kernel": (cdiv(N, 64) * cdiv(d, 128), cdiv(N, 64) * cdiv(d, 128), 4),
        "_grad_rank_kernel": (cdiv(N, 64) * sd, cdiv(N, 64) * cdiv(d, 64), 4),
        "_dA_dx_kernel": (cdiv(N, 64) * cdiv(k, 128), cdiv(N, 64) * cdiv(k, 128), 4),
    }[kernel]


def issue_us(rec: dict, programs: int, tiles: int, warps: int, partials: int = 0) -> float:
    """The issue bound. ``partials`` > 0: a consumer of split partials (one tile per program; its
    only loop sums the partials 1 .. partials-1, so the body, counted once in ``insns``, runs
    partials - 1 times)."""
    if partials:
        warp_insns = warps * programs * (rec["insns"] + (partials - 2) * rec["loop_insns"])
        return warp_insns / (SMS * SCHEDULERS * CLOCK) * 1e6
    per_tile = rec["loop_insns"] or rec["insns"]
    rest = rec["insns"] - rec["loop_insns"] if rec["loop_insns"] else 0
    warp_insns = warps * (per_tile * tiles + rest * programs)
    return warp_insns / (SMS * SCHEDULERS * CLOCK) * 1e6


# sm_90 per SM: 64 K registers (allocated per warp in units of 256, i.e. 8 per thread), 227 KB of
# shared memory per block and 228 KB per SM (1 KB of it reserved per block), 32 blocks, 64 warps
REGS_SM, SMEM_SM, BLOCKS_SM, WARPS_SM = 65536, 233472, 32, 64


def resident(rec: dict, warps: int = 4) -> int:
    """Programs of one binary that fit on an SM at once (registers, shared memory, blocks, warps)."""
    regs = -(-rec["registers"] // 8) * 8 * 32 * warps
    smem = rec["static_shared"] + rec["dyn_shared"] + 1024
    return min(REGS_SM // regs, SMEM_SM // smem, BLOCKS_SM, WARPS_SM // warps)


# What one H100 measured for the unsplit kernels (python -m bench.gpu_check, 2026-11-22, bf16, r = 12,
# dropout 0.1, N = 8192; kernels/COST.md "Measured on an H100"), µs
MEASURED_H100 = {
    (4096, 4096): {
        "_shrink_kernel": 108.8,
        "_expand_add_kernel": 79.9,
        "_grad_rank_kernel": 130.0,
        "_dA_dx_kernel": 146.7,
    },
    (4096, 11008): {
        "_shrink_kernel": 110.2,
        "_expand_add_kernel": 164.0,
        "_grad_rank_kernel": 230.3,
        "_dA_dx_kernel": 143.3,
    },
    (11008, 4096): {
        "_shrink_kernel": 220.4,
        "_expand_add_kernel": 79.6,
        "_grad_rank_kernel": 108.2,
        "_dA_dx_kernel": 308.5,
    },
}
SPLIT_KERNELS = ("_shrink_kernel", "_grad_rank_kernel")


def split_table(counts: dict, split_counts: dict):
    """Markdown: per shape and kernel, the split path's programs, programs resident per SM, bytes,
    bandwidth bounds, issue bound and latency bound, and the prediction (the largest of them).

    The latency bound of the split shrink / grad_rank is the H100's measured unsplit time scaled by
    the programs per SM (unsplit 128 programs on 132 SMs: one 4-warp program, one warp per
    scheduler; split S x as many, all resident at once): the assumption that the unsplit kernels
    were bound by one warp per scheduler stalling on its own dependences and loads, which S warps
    per scheduler interleave. Not measured. The consumers (expand-add, dA_dx) keep their grids; their
    rows add the partials' bytes and their summing loop's instructions. The last rows per shape:
    the prediction summed, and the sum "anchored" on the H100's measured expand-add and dA_dx (which
    ran 1.0-1.4x their bandwidth bound) with the split shrink and grad_rank predicted."""
    out = [
        (
            "| layer (k→d) | kernel | S | programs | resident/SM | programs/SM | MB | bw µs @90% | bw µs @70% "
            "| issue µs | latency µs | predicted µs | measured unsplit µs |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals = {}
    for k, d in SHAPES:
        rows = ours(k, d, split=True)
        sk, sd = split_factors(k, d)
        lo = hi = a_lo = a_hi = 0.0
        for kernel, idx in KERNEL_ROWS.items():
            b = rows[idx][2]
            rec = split_counts[kernel]
            programs, tiles, warps = launch_shape(kernel, k, d, split=True)
            s = {"_shrink_kernel": sk, "_grad_rank_kernel": sd}.get(kernel, 1)
            partials = {"_expand_add_kernel": sk, "_dA_dx_kernel": sd}.get(kernel, 1)
            bw90, bw70 = (b / (BW * f) * 1e6 for f in BW_FACTORS)
            iss = issue_us(rec, programs, tiles, warps, partials if partials > 1 else 0)
            fit = resident(rec, warps)
            per_sm = programs / SMS
            meas = MEASURED_H100[(k, d)][kernel]
            lat = 0.0
            if kernel in SPLIT_KERNELS:
                unsplit_per_sm = min(launch_shape(kernel, k, d)[0], SMS) / SMS
                lat = meas * unsplit_per_sm / min(per_sm, fit)
            p_lo, p_hi = max(bw90, iss, lat), max(bw70, iss, lat)
            lo, hi = lo + p_lo, hi + p_hi
            if kernel in SPLIT_KERNELS:
                a_lo, a_hi = a_lo + p_lo, a_hi + p_hi
            else:
                a_lo, a_hi = a_lo + meas, a_hi + meas
            out.append(
                f"| {k}→{d} | {kernel} | {s} | {programs} | {fit} | {per_sm:.2f} | {b / 1e6:.1f} | {bw90:.1f} | "
                f"{bw70:.1f} | {iss:.1f} | {f'{lat:.1f}' if lat else '–'} | {p_lo:.1f}–{p_hi:.1f} | {meas:.1f} |"
            )
        small = sum(t_us(b, f) for ph, op, b, f in rows if "memset" in op or "cast" in op) / BW_FACTORS[1]
        meas_sum = sum(MEASURED_H100[(k, d)].values())
        totals[(k, d)] = (lo + small, hi + small, a_lo, a_hi, meas_sum)
        out.append(
            f"| {k}→{d} | predicted sum (+ memset, cast) | | | | | | | | | | **{lo + small:.0f}–{hi + small:.0f}** | |"
        )
        out.append(
            f"| {k}→{d} | anchored sum: split shrink + grad_rank predicted, expand-add + dA_dx as measured "
            f"| | | | | | | | | | **{a_lo:.0f}–{a_hi:.0f}** | **{meas_sum:.0f}** (sum of the four) |"
        )
    return "\n".join(out), totals


KERNEL_ROWS = {"_shrink_kernel": 1, "_expand_add_kernel": 2, "_grad_rank_kernel": 5, "_dA_dx_kernel": 6}


def kernel_table(counts: dict):
    """Markdown: per shape and kernel the bandwidth bound (90 % / 70 %), the issue bound, the prediction."""
    out = [
        ("| layer (k→d) | kernel | MB | bw µs @90% | bw µs @70% | SASS insns/tile | tiles | issue µs | predicted µs |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    totals = {}
    for k, d in SHAPES:
        rows = ours(k, d)
        lo = hi = 0.0
        for kernel, idx in KERNEL_ROWS.items():
            _, _, b, _ = rows[idx]
            rec = counts[kernel]
            programs, tiles, warps = launch_shape(kernel, k, d)
            bw90, bw70 = (b / (BW * f) * 1e6 for f in BW_FACTORS)
            iss = issue_us(rec, programs, tiles, warps)
            p_lo, p_hi = max(bw90, iss), max(bw70, iss)
            lo, hi = lo + p_lo, hi + p_hi
            out.append(
                f"| {k}→{d} | {kernel} | {b / 1e6:.1f} | {bw90:.1f} | {bw70:.1f} | "
                f"{rec['loop_insns'] or rec['insns']} | {tiles} | {iss:.1f} | {p_lo:.1f}–{p_hi:.1f} |"
            )
        small = sum(t_us(b, f) for ph, op, b, f in rows if "memset" in op or "cast" in op) / BW_FACTORS[1]
        totals[(k, d)] = (lo + small, hi + small)
        out.append(f"| {k}→{d} | adapter part (+ memset, cast) | | | | | | | **{lo + small:.0f}–{hi + small:.0f}** |")
    return "\n".join(out), totals


def layer_tables():
    out = []
    for k, d in SHAPES:
        out.append(f"\n### Adapted layer k={k} → d={d}, N={N}, r={R}, bf16 autocast, lora_dropout > 0\n")
        split = functools.partial(ours, split=True)
        for name, fn in (
            ("ours", ours),
            ("ours, split (what the launchers pick at these shapes)", split),
            ("PEFT", peft),
        ):
            rows = fn(k, d)
            out.append(f"\n**{name}**\n\n| phase | op | MB moved | GFLOP | predicted µs |\n|---|---|---|---|---|")
            tot = {"fwd": [0, 0, 0.0], "bwd": [0, 0, 0.0]}
            adapter = {"fwd": 0.0, "bwd": 0.0}
            for ph, op, b, f in rows:
                tt = t_us(b, f)
                out.append(f"| {ph} | {op} | {b / 1e6:.1f} | {f / 1e9:.2f} | {tt:.1f} |")
                tot[ph][0] += b
                tot[ph][1] += f
                tot[ph][2] += tt
                if "cuBLAS" not in op:
                    adapter[ph] += tt
            for ph in ("fwd", "bwd"):
                b, f, tt = tot[ph]
                out.append(
                    f"| {ph} total | | {b / 1e6:.1f} | {f / 1e9:.2f} | {tt:.1f} (adapter part {adapter[ph]:.1f}) |"
                )
            out.append(
                f"| fwd+bwd | | | | {tot['fwd'][2] + tot['bwd'][2]:.1f} (adapter part "
                f"{adapter['fwd'] + adapter['bwd']:.1f}) |"
            )
    return "\n".join(out)


def llama_layers():
    """LLaMA-7B, every linear adapted: per block q,k,v,o 4096→4096, gate/up 4096→11008, down 11008→4096."""
    return [(4096, 4096)] * 4 * 32 + [(4096, 11008)] * 2 * 32 + [(11008, 4096)] * 32


def step_tables():
    layers = llama_layers()
    n_el = sum(R * k + d * R + R for k, d in layers)
    n_mat_el = sum(R * k + d * R for k, d in layers)
    n_t = 3 * len(layers)
    cols = sum(k + d for k, d in layers)
    rows = []
    # importance update, every step
    rows.append(("importance update (every step)", "ours: 1 launch + memset", 24 * n_el, 10 * n_el, "bf16", 2))
    rows.append(("importance update (every step)", "PEFT: ~10 ops per tensor", 96 * n_el, 10 * n_el, "bf16", 10 * n_t))
    # masking step (every deltaT steps), beyond the update above
    rows.append(
        (
            "masking (every ΔT steps)",
            "ours: scores in the same pass; sort-based selection; 1 mask launch",
            4 * 3 * sum(R for _ in layers),
            0,
            "bf16",
            "1 + selection",
        )
    )
    rows.append(
        (
            "masking (every ΔT steps)",
            "PEFT: element scores, means, cat, kthvalue, masked_fill, .item()",
            12 * n_el + 8 * n_el,
            0,
            "bf16",
            8 * len(layers) + 4 * n_t,
        )
    )
    # orthogonal penalty: fp32 adapters, TF32 products on a [64, 16] tile
    fl = 2 * 64 * RP * cols
    rows.append(("orth penalty forward", "ours: 1 launch (+ memset)", 4 * n_mat_el, fl, "tf32", 2))
    rows.append(
        (
            "orth penalty forward",
            "PEFT: Gram, eye, sub, norm per matrix",
            4 * n_mat_el,
            2 * R * R * cols,
            "tf32",
            4 * 2 * len(layers),
        )
    )
    rows.append(("orth penalty backward", "ours: 1 launch", 8 * n_mat_el, fl, "tf32", 1))
    rows.append(
        (
            "orth penalty backward",
            "PEFT: norm/sub backward, 2 mm + add per matrix",
            28 * n_mat_el,
            4 * R * R * cols,
            "tf32",
            5 * 2 * len(layers),
        )
    )
    out = [
        f"\nLLaMA-7B, all 224 linears adapted, r = {R}: {n_el / 1e6:.1f} M adapter elements (fp32), {n_t} tensors.\n",
        "| what | path | MB moved | GFLOP | predicted µs | launches |",
        "|---|---|---|---|---|---|",
    ]
    for what, path, b, f, peak, nl in rows:
        out.append(f"| {what} | {path} | {b / 1e6:.1f} | {f / 1e9:.2f} | {t_us(b, f, peak):.1f} | {nl} |")
    return "\n".join(out)


if __name__ == "__main__":
    sass = sys.argv[sys.argv.index("--sass") + 1] if "--sass" in sys.argv else None
    print(layer_tables())
    print(step_tables())
    records = compile_records(sass)
    counts = sass_counts(records=records)
    print("\n## Per kernel: bandwidth bound vs issue bound (sm_90 SASS, " + SASS_CONFIG + ")\n")
    print(kernel_table(counts)[0])
    print("\n## Split kernels: bandwidth, issue and latency bounds (sm_90 SASS, " + SASS_CONFIG + ",split)\n")
    print(split_table(counts, sass_counts(split=True, records=records))[0])
