"""A/B of the C++ dropout-shrink kernels against their source at another git revision, in one process.

    python -m bench.cpu_kernel_ab [--rev REV] [--threads 1] [--rounds 100]

Builds ``csrc/adapter_linear_cpu.cpp`` as it was at ``REV`` (default ``HEAD~1``) under another op
namespace, checks that both give the same forward, dA and dx (fp32 tolerance) on each shape, then
times forward and backward (dA + dx) of both, alternating in a shuffled order each round (a fixed
order lets one contender inherit the other's warm cache), by thread CPU time (a shared machine's
descheduling is not counted), medians in microseconds. A base matmul x @ W [k, k] is timed
alongside for scale. r = 12 is PEFT's default init_r.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SHAPES = [
    (37, 300, 70),
    (9, 17, 1),
    (333, 77, 5),
    (512, 256, 8),
    (512, 256, 12),
    (512, 688, 12),
    (512, 256, 64),
    (1024, 1024, 12),
]


def _build_old(rev: str):
    from torch.utils import cpp_extension

    root = Path(__file__).resolve().parent.parent
    src = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:csrc/adapter_linear_cpu.cpp"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    d = Path(tempfile.mkdtemp())
    (d / "old.cpp").write_text(src.replace("adalora_fast_cpu", "adalora_fast_ab_old"))
    cpp_extension.load(
        name="adalora_fast_ab_old",
        sources=[str(d / "old.cpp")],
        is_python_module=False,
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
    )
    return torch.ops.adalora_fast_ab_old


def _time(fns: dict, rounds: int) -> dict:
    res = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        items = list(fns.items())
        random.shuffle(items)
        for k, f in items:
            t = time.thread_time()
            f()
            res[k].append(time.thread_time() - t)
    return {k: statistics.median(v) * 1e6 for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="HEAD~1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    from adalora_fast.ops import cpu_ext

    if not cpu_ext.available():
        raise SystemExit("the C++ kernels could not be built here")
    new, old = torch.ops.adalora_fast_cpu, _build_old(args.rev)
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} rounds={args.rounds} old={args.rev}; microseconds, medians of thread CPU time")
    for N, k, r in SHAPES:
        g = torch.Generator().manual_seed(N + k + r)
        x, A, ge = (torch.randn(s, generator=g) for s in ((N, k), (r, k), (N, r)))
        W = torch.randn(k, k, generator=g)
        torch.testing.assert_close(
            new.dropout_shrink(x, A, 7, 0.1), old.dropout_shrink(x, A, 7, 0.1), rtol=1e-4, atol=1e-4
        )
        d_new, d_old = torch.randn(N, k, generator=g), None
        d_old = d_new.clone()
        torch.testing.assert_close(
            new.dropout_shrink_backward(x, A, ge, d_new, 7, 0.1, True),
            old.dropout_shrink_backward(x, A, ge, d_old, 7, 0.1, True),
            rtol=1e-4,
            atol=1e-3,
        )
        torch.testing.assert_close(d_new, d_old, rtol=1e-4, atol=1e-4)
        dx = torch.zeros(N, k)
        t = _time(
            {
                "fwd new": lambda: new.dropout_shrink(x, A, 7, 0.1),
                "fwd old": lambda: old.dropout_shrink(x, A, 7, 0.1),
                "bwd new": lambda: new.dropout_shrink_backward(x, A, ge, dx, 7, 0.1, True),
                "bwd old": lambda: old.dropout_shrink_backward(x, A, ge, dx, 7, 0.1, True),
                "x@W": lambda: x @ W,
            },
            args.rounds,
        )
        print(f"N={N:5d} k={k:5d} r={r:3d}  " + "  ".join(f"{name} {v:7.0f}" for name, v in t.items()))


if __name__ == "__main__":
    main()
