"""A/B of the ways to write the CPU torch path's rank-r matmuls, in one process.

    python -m bench.cpu_matmul_ab [--threads 1] [--rounds 9]

The adapter's backward forms dB = gᵀ (t·e) [d, r] from g [N, d] and t·e [N, r]. Written as
``g.t() @ te`` BLAS runs a [d, N] @ [N, r] product, whose small output width r it handles poorly;
written as ``(te.t() @ g).t().contiguous()`` it runs [r, N] @ [N, d] and copies the [r, d] result
out. Both are timed alternately per round by thread CPU time (a shared machine's descheduling not
counted), fp32 and bf16, r = 12 (PEFT's init_r) and 3 (after a 12 -> 3 pruning); printed: medians
in microseconds, new/old and its range over the rounds. The two agree to the dtype's rounding.

Then the shrink t = x Aᵀ (x [N, k], A [r, k]; gB = g B has the same [N, k] @ [k, r] form), fp32,
r = 2 ... 16: ``x @ A.t()`` (what the torch path runs) against ``(A @ x.t()).t().contiguous()``,
and a plain pass over x (``x.sum()``) for scale. The first costs about the same at every r here;
the second follows r at r <= 3 and is slower than the first at r >= 8 with large k, so neither
form is chosen by r (that would hard-code one BLAS's behaviour).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ((512, 512), (512, 1376), (256, 1024), (1024, 4096))  # (N, d)


def _per_call_us(fn, n: int) -> float:
    t = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")
    for dtype in (torch.float32, torch.bfloat16):
        for n_tok, d in SHAPES:
            g = torch.randn(n_tok, d, dtype=dtype)
            for r in (12, 3):
                te = torch.randn(n_tok, r, dtype=dtype)

                def old():
                    return g.t() @ te

                def new():
                    return (te.t() @ g).t().contiguous()

                tol = 1e-4 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(new(), old(), rtol=tol, atol=tol * d**0.5)
                calls = max(5, int(2e7 / (n_tok * d)))
                t_old, t_new = [], []
                for _ in range(args.rounds):
                    t_old.append(_per_call_us(old, calls))
                    t_new.append(_per_call_us(new, calls))
                ratios = sorted(b / a for a, b in zip(t_old, t_new))
                mo, mn = statistics.median(t_old), statistics.median(t_new)
                print(
                    f"{str(dtype)[6:]:9s} N={n_tok:5d} d={d:5d} r={r:2d}: gᵀ te {mo:7.0f} us, (teᵀ g)ᵀ {mn:7.0f} us, "
                    f"new/old {mn / mo:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                    flush=True,
                )
    print("shrink x Aᵀ, fp32: (A xᵀ)ᵀ / x Aᵀ time by r, and x @ A.t() and one pass over x in us")
    for n_tok, k in SHAPES:
        x = torch.randn(n_tok, k)
        calls = max(5, int(1e7 / (n_tok * k)))
        cells = []
        for r in (2, 3, 4, 8, 12, 16):
            A = torch.randn(r, k)
            t_a, t_b = [], []
            for _ in range(args.rounds):
                t_a.append(_per_call_us(lambda: x @ A.t(), calls))
                t_b.append(_per_call_us(lambda: (A @ x.t()).t().contiguous(), calls))
            ma = statistics.median(t_a)
            cells.append(f"r={r}: {ma:.0f} ({statistics.median(t_b) / ma:.2f})")
        one_pass = statistics.median(_per_call_us(x.sum, calls) for _ in range(args.rounds))
        print(f"N={n_tok:5d} k={k:5d}: " + ", ".join(cells) + f"; x.sum() {one_pass:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
