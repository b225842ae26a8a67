"""Where a training step's time goes on a GPU: host (Python, launches) or device (kernels).

    python -m bench.gpu_profile [--steps 3] [--variants fp32,bf16,autocast] [--kinds ours,peft_lora]

For each variant of the bench's GPU step model (``bench/cases.GPU.step_shape``; fp32, a bf16 base with
fp32 adapters, fp32 under bf16 autocast) and each contender, ``--steps`` steps of ``cases._step_fn``
(forward, backward, AdamW, update_and_allocate) run under ``torch.profiler`` after two warm-up
steps. Printed per step: the wall time (synchronised), the summed device time of all kernels, the
number of kernel launches, and the ops with the most self CPU time and the kernels with the most
device time. Wall time far above the device time says the step is bound by the host.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default="fp32,bf16,autocast")
    ap.add_argument("--kinds", default="ours,peft_lora")
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument(
        "--cprofile", action="store_true", help="instead: Python's cProfile over the steps (host functions by own time)"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    plan, shape = cases.GPU, cases.GPU.step_shape
    torch.manual_seed(3)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=dev)
    summary = []
    for variant in args.variants.split(","):
        kw = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "autocast": {"autocast": True}}[variant]
        for kind in args.kinds.split(","):
            step, _, model = cases._step_fn(kind, shape, plan, dev, args.p, ids, 10, **kw)
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            if args.cprofile:
                import cProfile
                import pstats

                pr = cProfile.Profile()
                pr.enable()
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
                pr.disable()
                print(f"\n=== cProfile {variant} {kind}, {args.steps} steps")
                pstats.Stats(pr).sort_stats("tottime").print_stats(args.top)
                del step, model
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / args.steps
            ev = prof.key_averages()
            dev_us = sum(e.self_device_time_total for e in ev) / args.steps
            launches = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) / args.steps
            print(
                f"\n=== {variant} {kind}: wall {wall * 1e3:.2f} ms/step, device {dev_us / 1e3:.2f} ms/step, "
                f"{launches:.0f} kernels/step"
            )
            print(ev.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
            print(ev.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=60))
            summary.append((variant, kind, wall * 1e3, dev_us / 1e3, launches))
            del step, model
            torch.cuda.empty_cache()
    if args.cprofile:
        return 0
    print("\nvariant   contender    wall ms/step  device ms/step  kernels/step")
    for v, k, w, d, n in summary:
        print(f"{v:<9} {k:<12} {w:12.2f} {d:15.2f} {n:13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
