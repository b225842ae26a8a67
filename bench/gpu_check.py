"""Predicted vs measured time of the layer's Triton kernels on a GPU.

    python -m bench.gpu_check [--sass RESULTS.json] [--n 8192] [--repeats 50] [--sweep]

For each LLaMA-7B layer shape of ``kernels/COST.md`` (k→d = 4096→4096, 4096→11008, 11008→4096;
N tokens, r = 12, bf16 x / g / adapters, dropout 0.1) it prints, per kernel (shrink, expand-add,
grad-rank, dA/dx): the bandwidth bound at 90 % and 70 % of 3.0 TB/s, the issue bound from the
sm_90 SASS (``bench/cost_on_paper.py``), the predicted range, and, on a CUDA GPU, the measured
median (CUDA events over ``--repeats`` launches after a warm-up), the achieved bandwidth and the
measured/predicted ratio. A measured time above the predicted range says the kernel is bound by
something the model leaves out (latency with one warp per scheduler, atomic throughput in L2);
below it, that the byte count is too pessimistic (L2 hits).

Without a CUDA GPU it prints the predictions only, says so on stderr, and exits with status 2 (so
a script cannot mistake a CPU run for a measurement). What it measured goes to ``kernels/COST.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench import cost_on_paper as cop


def predictions(counts, k: int, d: int) -> dict:
    """{kernel: (MB, bw µs @90 %, bw µs @70 %, issue µs)} for one layer shape."""
    rows = cop.ours(k, d)
    out = {}
    for kernel, idx in cop.KERNEL_ROWS.items():
        b = rows[idx][2]
        programs, tiles, warps = cop.launch_shape(kernel, k, d)
        out[kernel] = (
            b / 1e6,
            *(b / (cop.BW * f) * 1e6 for f in cop.BW_FACTORS),
            cop.issue_us(counts[kernel], programs, tiles, warps),
        )
    return out


def _time(fn, repeats: int) -> float:
    """Median µs of ``fn`` over ``repeats`` runs, each timed by CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _operands(n: int, k: int, d: int, device="cuda"):
    """The four kernels' operands at one shape: bf16 x [n, k], g / out [n, d], dx [n, k], A, E, B
    (r = 12), ranknum [1] fp32, the seed [1] int64, ge [n, r] fp32, zeroed fp32 dA / dB / dE; random
    data, never zeros."""
    import types

    dev, dt, r = torch.device(device), torch.bfloat16, 12
    torch.manual_seed(0)
    return types.SimpleNamespace(
        r=r,
        x=torch.randn(n, k, device=dev, dtype=dt),
        g=torch.randn(n, d, device=dev, dtype=dt),
        A=torch.randn(r, k, device=dev, dtype=dt) * 0.02,
        E=torch.randn(r, 1, device=dev, dtype=dt),
        B=torch.randn(d, r, device=dev, dtype=dt) * 0.02,
        rk=torch.full((1,), 12.0, device=dev),
        seed=torch.tensor([7], dtype=torch.int64, device=dev),
        out=torch.randn(n, d, device=dev, dtype=dt),
        dx=torch.randn(n, k, device=dev, dtype=dt),
        ge=torch.randn(n, r, device=dev),
        dA=torch.zeros(r, k, device=dev),
        dB=torch.zeros(d, r, device=dev),
        dE=torch.zeros(r, device=dev),
    )


def measure(n: int, k: int, d: int, repeats: int) -> dict:
    """{kernel: measured µs} of the four kernels at one shape (bf16, r = 12, dropout 0.1)."""
    from adalora_fast.kernels import adapter_linear as ka

    p, o = 0.1, _operands(n, k, d)
    t = ka.shrink(o.x, o.A, p, o.seed)
    return {
        "_shrink_kernel": _time(lambda: ka.shrink(o.x, o.A, p, o.seed), repeats),
        "_expand_add_kernel": _time(lambda: ka.expand_add(o.out, t, o.E, o.B, o.rk, 2.0), repeats),
        "_grad_rank_kernel": _time(lambda: ka.grad_rank(o.g, t, o.E, o.B, o.rk, 2.0, o.ge, o.dB, o.dE), repeats),
        "_dA_dx_kernel": _time(lambda: ka.dA_dx(o.x, o.ge, o.A, o.dx, o.dA, p, o.seed), repeats),
    }


# the candidate values per launch parameter, per kernel (their product is swept)
_AXES = {
    "shrink": {"BLOCK_N": (64, 32, 16), "BLOCK_K": (64, 128, 256), "num_stages": (3, 4, 5)},
    "grad_rank": {"BLOCK_N": (64, 32, 16), "BLOCK_D": (64, 128), "num_stages": (3, 4)},
    "dA_dx": {"ROW_BLOCKS": (4, 2, 1, 8), "BLOCK_K": (64, 128, 32), "BLOCK_N": (64,), "num_stages": (2, 3)},
    "expand_add": {"BLOCK_N": (64, 128, 32), "BLOCK_D": (128, 256, 64)},
}


def _configs(kind: str):
    """Launch configurations tried by ``--sweep`` for one kernel: the one its launcher ships first
    (``kernels/triton_ops/adapter_linear.py``; num_stages 3 is Triton's default), then the rest of :data:`_AXES`."""
    import itertools

    from adalora_fast.kernels import adapter_linear as ka

    shipped = {
        "shrink": dict(BLOCK_N=ka.BLOCK_N, BLOCK_K=ka.BLOCK_K, num_stages=ka.SHRINK_STAGES),
        "grad_rank": dict(BLOCK_N=ka.BLOCK_N, BLOCK_D=ka.GRAD_BLOCK_D, num_stages=3),
        "dA_dx": dict(ROW_BLOCKS=ka.DA_ROW_BLOCKS, BLOCK_K=ka.DA_BLOCK_K, BLOCK_N=ka.BLOCK_N, num_stages=ka.DA_STAGES),
        "expand_add": dict(BLOCK_N=ka.BLOCK_N, BLOCK_D=ka.EXPAND_BLOCK_D),
    }[kind]
    yield dict(shipped, num_warps=4)
    axes = _AXES[kind]
    for values in itertools.product(*axes.values()):
        cfg = dict(zip(axes, values))
        if cfg != shipped:
            yield dict(cfg, num_warps=4)


def sweep(n: int, k: int, d: int, repeats: int) -> list:
    """[(kernel, config, p, µs)]: every configuration of :func:`_configs` at one shape, bf16, r = 12."""
    from adalora_fast.kernels import _launch
    from adalora_fast.kernels import adapter_linear as ka

    cdiv = ka.cdiv
    o = _operands(n, k, d)
    r, x, g, A, E, B, rk, seed, out, dx, ge, dA, dB, dE = (
        o.r,
        o.x,
        o.g,
        o.A,
        o.E,
        o.B,
        o.rk,
        o.seed,
        o.out,
        o.dx,
        o.ge,
        o.dA,
        o.dB,
        o.dE,
    )
    t = torch.empty(n, r, device=x.device)
    com = dict(R_PAD=16, UPCAST=False, DOT_PREC="tf32")
    rows = []
    ref = {}  # dropout p -> the shipped shrink config's t
    for p in (0.1, 0.0):
        da = ka.dropout_args(p)
        for kind in ("shrink", "grad_rank", "dA_dx", "expand_add"):
            for cfg in _configs(kind):
                c = dict(com, **cfg)
                if kind == "shrink":
                    fn = lambda c=c, da=da: _launch.launch(
                        ka._shrink_kernel,
                        (cdiv(n, c["BLOCK_N"]),),
                        x,
                        A,
                        t,
                        seed,
                        n,
                        k,
                        r,
                        x.stride(0),
                        x.stride(1),
                        *da,
                        **c,
                    )
                elif kind == "grad_rank":
                    fn = lambda c=c: _launch.launch(
                        ka._grad_rank_kernel,
                        (cdiv(n, c["BLOCK_N"]),),
                        g,
                        t,
                        E,
                        rk,
                        B,
                        ge,
                        dB,
                        dE,
                        n,
                        d,
                        r,
                        g.stride(0),
                        g.stride(1),
                        2.0,
                        0,
                        0,
                        **c,
                    )
                elif kind == "dA_dx":
                    grid = (cdiv(n, c["BLOCK_N"] * c["ROW_BLOCKS"]), cdiv(k, c["BLOCK_K"]))
                    fn = lambda c=c, grid=grid, da=da: _launch.launch(
                        ka._dA_dx_kernel,
                        grid,
                        x,
                        ge,
                        A,
                        dx,
                        dA,
                        seed,
                        n,
                        k,
                        r,
                        x.stride(0),
                        x.stride(1),
                        dx.stride(0),
                        *da,
                        1,
                        **c,
                    )
                else:
                    grid = (cdiv(n, c["BLOCK_N"]), cdiv(d, c["BLOCK_D"]))
                    fn = lambda c=c, grid=grid: _launch.launch(
                        ka._expand_add_kernel, grid, t, E, rk, B, out, n, d, r, out.stride(0), 2.0, **c
                    )
                if kind == "expand_add" and p:
                    continue  # no dropout in expand_add
                try:
                    us = _time(fn, repeats)
                except Exception as exc:  # noqa: BLE001 -- a config that does not compile (shared memory, registers)
                    rows.append((kind, cfg, p, None, f"{type(exc).__name__}: {str(exc)[:80]}"))
                    continue
                note = ""
                if kind == "shrink":  # every shrink config must give the shipped config's t
                    got = ref.setdefault(p, t.clone())
                    if not torch.allclose(t, got, rtol=1e-2, atol=1e-2):
                        note = "WRONG RESULT"
                rows.append((kind, cfg, p, us, note))
                print(f"sweep {k}->{d} p={p} {kind:<10} {cfg} {us:8.1f} us {note}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sass", help="a bench.compile_check --json result (default: compile the sm_90 binaries)")
    ap.add_argument("--n", type=int, default=cop.N, help="tokens per layer (the predictions assume 8192)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="also time every launch configuration of _configs "
        "(4096→4096 and 4096→11008) and print the best per kernel",
    )
    args = ap.parse_args(argv)
    if args.n != cop.N:
        cop.N = args.n
    counts = cop.sass_counts(args.sass)
    on_gpu = torch.cuda.is_available()
    print(
        f"{'k→d':>12} {'kernel':<20} {'MB':>7} {'bw@90%':>8} {'bw@70%':>8} {'issue':>7} {'predicted µs':>14} "
        f"{'measured µs':>12} {'GB/s':>7} {'meas/pred':>9}"
    )
    for k, d in cop.SHAPES:
        pred = predictions(counts, k, d)
        meas = measure(args.n, k, d, args.repeats) if on_gpu else {}
        for kernel, (mb, bw90, bw70, iss) in pred.items():
            lo, hi = max(bw90, iss), max(bw70, iss)
            line = (
                f"{f'{k}→{d}':>12} {kernel[1:-7]:<20} {mb:7.1f} {bw90:8.1f} {bw70:8.1f} {iss:7.1f} {lo:6.1f}–{hi:<7.1f}"
            )
            if kernel in meas:
                m = meas[kernel]
                ratio = m / lo if m < lo else (m / hi if m > hi else 1.0)
                line += f" {m:12.1f} {mb * 1e3 / m:7.0f} {ratio:9.2f}"
            print(line)
    if not on_gpu:
        print("gpu_check: no CUDA GPU: predictions only, nothing measured (exit status 2)", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}; meas/pred 1.00 = inside the predicted range")
    if args.sweep:
        for k, d in cop.SHAPES[:2]:
            rows = sweep(args.n, k, d, max(10, args.repeats // 2))
            for kind in ("shrink", "grad_rank", "dA_dx", "expand_add"):
                for p in (0.1, 0.0):
                    ok = [r for r in rows if r[0] == kind and r[2] == p and r[3] is not None and not r[4]]
                    if ok:
                        ship, best = ok[0], min(ok, key=lambda r: r[3])
                        print(
                            f"best {k}->{d} {kind:<10} p={p}: {best[3]:7.1f} us {best[1]}  (shipped {ship[3]:7.1f} us)"
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
