"""Predicted vs measured time of the layer's Triton kernels on a GPU, unsplit and split.

    python -m bench.gpu_check [--sass RESULTS.json] [--n 8192] [--repeats 50] [--sweep] [--adapters fp32]

For each LLaMA-7B layer shape of ``kernels/COST.md`` (k→d = 4096→4096, 4096→11008, 11008→4096;
N tokens, r = 12, bf16 x / g, bf16 adapters or with ``--adapters fp32`` fp32 ones, dropout 0.1) it
prints, per kernel (shrink, expand-add, grad-rank, dA/dx): the bandwidth bound at 90 % and 70 % of
3.0 TB/s, the issue bound from the sm_90 SASS (``bench/cost_on_paper.py``), the predicted range,
and, on a CUDA GPU, the measured
median (CUDA events over ``--repeats`` launches after a warm-up), the achieved bandwidth and the
measured/predicted ratio. A measured time above the predicted range says the kernel is bound by
something the model leaves out (latency with one warp per scheduler, atomic throughput in L2);
below it, that the byte count is too pessimistic (L2 hits).

Each kernel comes twice: unsplit (S = 1, the single-pass kernels), then split: the split-K shrink
and the split-D grad_rank at the factor S the launchers' plan picks on this device
(``split_plan(N, width, block, split_slots(device))``), and the expand-add / dA_dx summing their S
partials, against ``cost_on_paper``'s split predictions (which add a latency bound scaled from the
H100's unsplit measurements, and assume an H100's plan: S is marked where this device's differs).
Where the plan keeps S = 1 the split rows say so and nothing is timed. Before timing, the split
forms' t, out, ge, dB, dE, dA and dx are checked against the unsplit ones (``split check``).

``--adapters fp32`` times the binaries of PEFT's default (fp32 adapters on a bf16 base; at torch's
full-fp32 default their products are "bf16x3"): the issue bound is then their SASS's, the bytes stay
the bf16 adapters' count (under 0.3 % short of fp32 A and B), and the split rows have no latency
bound (it is scaled from the bf16 kernels' measurements).

Without a CUDA GPU it prints the predictions only, says so on stderr, and exits with status 2 (so
a script cannot mistake a CPU run for a measurement). What it measured goes to ``kernels/COST.md``.
:func:`measure` and :func:`sweep` take a ``timer`` and a ``device``: ``tests/test_gpu_scripts.py``
runs them on CPU tensors in Triton's interpreter with a wall-clock timer (every launch runs; the
numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import types

import torch

from bench import cost_on_paper as cop

KERNELS = ("_shrink_kernel", "_expand_add_kernel", "_grad_rank_kernel", "_dA_dx_kernel")
# the kernel whose split factor each kernel's split form follows: the shrink's over k (the expand-add
# sums its partials), the grad_rank's over d (dA_dx sums its partials)
SPLIT_BY = {"_shrink_kernel": 0, "_expand_add_kernel": 0, "_grad_rank_kernel": 1, "_dA_dx_kernel": 1}
ADAPTERS = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --adapters: the adapters' dtype (x and g bf16)


def sass_counts(path=None, config=cop.SASS_CONFIG) -> tuple:
    """({kernel: record} unsplit, {kernel: record} split) of the sm_90 binaries of ``config``
    (:func:`cost_on_paper.sass_counts`); without ``path`` one ``bench.compile_check`` run serves both."""
    records = cop.compile_records(path, config)
    return cop.sass_counts(config=config, records=records), cop.sass_counts(split=True, config=config, records=records)


def predictions(counts, k: int, d: int) -> dict:
    """{kernel: (MB, bw µs @90 %, bw µs @70 %, issue µs)} for one layer shape, unsplit."""
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


def split_predictions(split_counts, k: int, d: int, latency: bool = True) -> dict:
    """{kernel: (S, MB, bw µs @90 %, bw µs @70 %, issue µs, latency µs)} of the split path at one
    shape as ``cost_on_paper.split_table`` predicts it (an H100's plan, ``cop.split_factors``): the
    split-K shrink and split-D grad_rank, and the expand-add / dA_dx summing their S partials.
    The latency bound (split shrink / grad_rank only; 0 elsewhere) scales the H100's measured unsplit
    time (``cop.MEASURED_H100``, N = 8192) by the programs per SM; at another N, or without
    ``latency`` (kernels other than the measured bf16 ones), it is left out."""
    rows = cop.ours(k, d, split=True)
    sk, sd = cop.split_factors(k, d)
    out = {}
    for kernel, idx in cop.KERNEL_ROWS.items():
        b = rows[idx][2]
        rec = split_counts[kernel]
        programs, tiles, warps = cop.launch_shape(kernel, k, d, split=True)
        s = (sk, sd)[SPLIT_BY[kernel]]
        partials = s if kernel not in cop.SPLIT_KERNELS else 1
        bw90, bw70 = (b / (cop.BW * f) * 1e6 for f in cop.BW_FACTORS)
        iss = cop.issue_us(rec, programs, tiles, warps, partials if partials > 1 else 0)
        lat = 0.0
        measured = cop.MEASURED_H100.get((k, d)) if cop.N == 8192 and latency else None
        if kernel in cop.SPLIT_KERNELS and measured:
            unsplit_per_sm = min(cop.launch_shape(kernel, k, d)[0], cop.SMS) / cop.SMS
            lat = measured[kernel] * unsplit_per_sm / min(programs / cop.SMS, cop.resident(rec, warps))
        out[kernel] = (s, b / 1e6, bw90, bw70, iss, lat)
    return out


def cuda_time(fn, repeats: int) -> float:
    """Median µs of ``fn`` over ``repeats`` runs, each timed by CUDA events, after 3 warm-up runs."""
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


def wall_time(fn, repeats: int) -> float:
    """Median wall-clock µs of ``fn`` over ``repeats`` runs, no warm-up (CPU tensors, the interpreter:
    checks that launches run; measures nothing about a GPU)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


_time = cuda_time  # the default timer of measure() and sweep()


def _operands(
    n: int, k: int, d: int, device="cuda", dtype=torch.bfloat16, sk: int = 1, sd: int = 1, adapter_dtype=None
):
    """The four kernels' operands at one shape: x [n, k], g / out [n, d], dx [n, k] of ``dtype``, A,
    E, B (r = 12) of ``adapter_dtype`` (default ``dtype``), ranknum [1] fp32, the seed [1] int64,
    t / ge [n, r] fp32, the split workspaces tp [sk, n, r] / gep [sd, n, r] fp32 and t_sum [n, r],
    zeroed fp32 dA / dB / dE; random data, never zeros."""
    dev, dt, r = torch.device(device), dtype, 12
    at = adapter_dtype or dtype
    torch.manual_seed(0)
    return types.SimpleNamespace(
        r=r,
        x=torch.randn(n, k, device=dev, dtype=dt),
        g=torch.randn(n, d, device=dev, dtype=dt),
        A=torch.randn(r, k, device=dev, dtype=at) * 0.02,
        E=torch.randn(r, 1, device=dev, dtype=at),
        B=torch.randn(d, r, device=dev, dtype=at) * 0.02,
        rk=torch.full((1,), 12.0, device=dev),
        seed=torch.tensor([7], dtype=torch.int64, device=dev),
        out=torch.randn(n, d, device=dev, dtype=dt),
        dx=torch.randn(n, k, device=dev, dtype=dt),
        t=torch.randn(n, r, device=dev),
        ge=torch.randn(n, r, device=dev),
        tp=torch.randn(sk, n, r, device=dev),
        t_sum=torch.empty(n, r, device=dev),
        gep=torch.randn(sd, n, r, device=dev),
        dA=torch.zeros(r, k, device=dev),
        dB=torch.zeros(d, r, device=dev),
        dE=torch.zeros(r, device=dev),
    )


def layer_launches(o, p: float, sk: int, sd: int) -> dict:
    """{(kernel, split): closure}: each kernel's single-kernel launcher (``adapter_linear.shrink``,
    ``expand_add``, ``grad_rank``, ``dA_dx``) on the operands ``o``, unsplit, and split where the
    factor is > 1: the split-K shrink into sk partials, the expand-add summing ``o.tp`` into
    ``o.t_sum``, the split-D grad_rank into ``o.gep`` (sd partials), dA_dx summing them. The
    closures read ``o``'s buffers when called; the shrinks return their t / partials."""
    from adalora_fast.kernels import adapter_linear as ka

    fns = {
        ("_shrink_kernel", False): lambda: ka.shrink(o.x, o.A, p, o.seed),
        ("_expand_add_kernel", False): lambda: ka.expand_add(o.out, o.t, o.E, o.B, o.rk, 2.0),
        ("_grad_rank_kernel", False): lambda: ka.grad_rank(o.g, o.t, o.E, o.B, o.rk, 2.0, o.ge, o.dB, o.dE),
        ("_dA_dx_kernel", False): lambda: ka.dA_dx(o.x, o.ge, o.A, o.dx, o.dA, p, o.seed),
    }
    if sk > 1:
        fns[("_shrink_kernel", True)] = lambda: ka.shrink(o.x, o.A, p, o.seed, split=sk)
        fns[("_expand_add_kernel", True)] = lambda: ka.expand_add(o.out, o.tp, o.E, o.B, o.rk, 2.0, o.t_sum)
    if sd > 1:
        fns[("_grad_rank_kernel", True)] = lambda: ka.grad_rank(o.g, o.t, o.E, o.B, o.rk, 2.0, o.gep, o.dB, o.dE)
        fns[("_dA_dx_kernel", True)] = lambda: ka.dA_dx(o.x, o.gep, o.A, o.dx, o.dA, p, o.seed)
    return fns


def split_check(o, fns: dict) -> dict:
    """Runs each launch of :func:`layer_launches` once, the unsplit and the split form on the same
    inputs, and returns {what: (unsplit result, split result)}: t against the sum of the split
    shrink's partials, out and the t written by the summing expand-add, ge against the sum of the
    split grad_rank's partials, dB, dE, and dA, dx from dA_dx summing them. Leaves real t / ge and
    partials in ``o`` for the timings (out, dx, dA, dB, dE are scratch)."""
    pairs = {}
    o.t.copy_(fns[("_shrink_kernel", False)]())
    split_t = ("_shrink_kernel", True) in fns
    if split_t:
        parts = fns[("_shrink_kernel", True)]()
        if parts.shape != o.tp.shape:
            raise RuntimeError(
                f"the split shrink wrote {tuple(parts.shape)} partials, the plan says {tuple(o.tp.shape)}"
            )
        o.tp.copy_(parts)
        pairs["t"] = (o.t.clone(), o.tp.sum(0))
        out0 = o.out.clone()
        fns[("_expand_add_kernel", False)]()
        out1 = o.out.clone()
        o.out.copy_(out0)
        fns[("_expand_add_kernel", True)]()
        pairs["out"] = (out1, o.out.clone())
        pairs["t written by the expand-add"] = (o.t.clone(), o.t_sum.clone())
    res = {}
    for split in (False, True):
        if ("_grad_rank_kernel", split) not in fns:
            continue
        for acc in (o.dB, o.dE, o.dA):
            acc.zero_()
        dx0 = o.dx.clone()
        fns[("_grad_rank_kernel", split)]()
        fns[("_dA_dx_kernel", split)]()
        ge = o.gep.sum(0) if split else o.ge.clone()
        res[split] = (ge, o.dB.clone(), o.dE.clone(), o.dA.clone(), o.dx.clone())
        o.dx.copy_(dx0)
    if True in res:
        for i, what in enumerate(("ge", "dB", "dE", "dA", "dx")):
            pairs[what] = (res[False][i], res[True][i])
    return pairs


def mismatches(pairs: dict, fp32_tol: float = 1e-4, half_tol: float = 2e-2) -> list:
    """The names of :func:`split_check`'s pairs that differ: max |split - unsplit| over max |unsplit|
    above ``fp32_tol`` (fp32 results: only the partials' summation order differs) or ``half_tol``
    (bf16 / fp16 results: out, dx, where one rounding may flip)."""
    bad = []
    for what, (a, b) in pairs.items():
        tol = fp32_tol if a.dtype == torch.float32 else half_tol
        err = (b.float() - a.float()).abs().max().item() / max(a.float().abs().max().item(), 1e-6)
        if a.shape != b.shape or not err <= tol:
            bad.append(f"{what} ({err:.2g})")
    return bad


def measure(
    n: int,
    k: int,
    d: int,
    repeats: int,
    *,
    timer=None,
    device="cuda",
    dtype=torch.bfloat16,
    slots: int = None,
    p: float = 0.1,
    adapter_dtype=None,
) -> dict:
    """The four kernels at one shape (r = 12, dropout ``p``; x and g of ``dtype``, the adapters of
    ``adapter_dtype``, default ``dtype``), unsplit and split at the plan's factors on ``device``
    (``slots`` overrides ``split_slots(device)``; the tiles are the configuration's,
    ``adapter_linear.layer_kwargs``). Returns a dict: "S" (the shrink's
    and grad_rank's factors, 1 = the plan keeps the kernel unsplit), "unsplit" / "split" ({kernel:
    µs} by ``timer(fn, repeats)``, default CUDA events; split only where S > 1), "pairs" and "wrong"
    (:func:`split_check` and its :func:`mismatches`), "errors" ({what: message} of launches that
    raised; the others are still timed)."""
    from adalora_fast.kernels import adapter_linear as ka

    timer = timer or _time
    dev = torch.device(device)
    slots = ka.split_slots(dev) if slots is None else slots
    kws = ka.layer_kwargs(adapter_dtype or dtype, 12, dtype)
    bk, bd = kws["shrink"]["BLOCK_K"], kws["grad_rank"]["BLOCK_D"]
    (sk, ck), (sd, cd) = ka.split_plan(n, k, bk, slots), ka.split_plan(n, d, bd, slots)
    res = {"S": (sk, sd), "unsplit": {}, "split": {}, "pairs": {}, "wrong": [], "errors": {}}
    # the launchers take the factor forced (split_plan(..., 1, S)): it must give the plan's chunks
    for name, s, c, width, block in (("k", sk, ck, k, bk), ("d", sd, cd, d, bd)):
        if s > 1 and ka.split_plan(n, width, block, 1, s) != (s, c):
            res["errors"][f"plan over {name}"] = f"forcing S = {s} gives {ka.split_plan(n, width, block, 1, s)}"
    o = _operands(n, k, d, dev, dtype, sk, sd, adapter_dtype)
    fns = layer_launches(o, p, sk, sd)
    try:
        res["pairs"] = split_check(o, fns)
        res["wrong"] = mismatches(res["pairs"])
    except Exception as exc:  # noqa: BLE001 -- the timings below still run, each launch on its own
        res["errors"]["split check"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    for (kernel, split), fn in fns.items():
        try:
            res["split" if split else "unsplit"][kernel] = timer(fn, repeats)
        except Exception as exc:  # noqa: BLE001 -- one failing launch must not lose the other rows
            res["errors"][f"{kernel[1:-7]}{' split' if split else ''}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return res


# the candidate values per launch parameter, per kernel (their product is swept)
_AXES = {
    "shrink": {"BLOCK_N": (64, 32, 16), "BLOCK_K": (64, 128, 256), "num_stages": (3, 4, 5)},
    "grad_rank": {"BLOCK_N": (64, 32, 16), "BLOCK_D": (64, 128), "num_stages": (3, 4)},
    "dA_dx": {"ROW_BLOCKS": (4, 2, 1, 8), "BLOCK_K": (64, 128, 32), "BLOCK_N": (64,), "num_stages": (2, 3)},
    "expand_add": {"BLOCK_N": (64, 128, 32), "BLOCK_D": (128, 256, 64)},
}
SWEEP_KINDS = ("shrink", "grad_rank", "dA_dx", "expand_add")


def _configs(kind: str):
    """Launch configurations tried by ``--sweep`` for one kernel: the one its launcher ships first
    (``kernels/triton_ops/adapter_linear.py``; num_stages 3 is Triton's default), then the rest of :data:`_AXES`."""
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


def sweep_launch(kind: str, o, cfg: dict, p: float, t: torch.Tensor):
    """A closure launching ``kind``'s kernel unsplit with the launch parameters ``cfg``, the rest of
    its constexprs (R_PAD, UPCAST, DOT_PREC, SPLIT = False) as its launcher passes them
    (``launch_kwargs``) and its runtime arguments as the launcher's (chunk 0 / n_split 1 unsplit;
    the expand-add's T_SUM is t itself). The shrink writes ``t``, which the others read."""
    from adalora_fast.kernels import _launch
    from adalora_fast.kernels import adapter_linear as ka

    cdiv = ka.cdiv
    x, g, A, E, B, rk, seed, out, dx, ge, dA, dB, dE = (
        o.x, o.g, o.A, o.E, o.B, o.rk, o.seed, o.out, o.dx, o.ge, o.dA, o.dB, o.dE
    )  # fmt: skip
    (n, k), d, r = x.shape, g.shape[1], o.r
    c = dict(ka.launch_kwargs(kind, A.dtype, r, x.dtype), **cfg)
    if c["SPLIT"]:
        raise ValueError("sweep_launch: unsplit kernels only")
    da = ka.dropout_args(p)
    if kind == "shrink":
        grid = (cdiv(n, c["BLOCK_N"]),)
        args = (x, A, t, seed, n, k, r, x.stride(0), x.stride(1), *da, 0)
        kernel = ka._shrink_kernel
    elif kind == "grad_rank":
        grid = (cdiv(n, c["BLOCK_N"]),)
        args = (g, t, E, rk, B, ge, dB, dE, n, d, r, g.stride(0), g.stride(1), 2.0, 0, 0, 0)
        kernel = ka._grad_rank_kernel
    elif kind == "dA_dx":
        grid = (cdiv(n, c["BLOCK_N"] * c["ROW_BLOCKS"]), cdiv(k, c["BLOCK_K"]))
        args = (x, ge, A, dx, dA, seed, n, k, r, x.stride(0), x.stride(1), dx.stride(0), *da, 1, 1)
        kernel = ka._dA_dx_kernel
    elif kind == "expand_add":
        grid = (cdiv(n, c["BLOCK_N"]), cdiv(d, c["BLOCK_D"]))
        args = (t, E, rk, B, out, t, n, d, r, out.stride(0), 2.0, 1)
        kernel = ka._expand_add_kernel
    else:
        raise ValueError(kind)
    return lambda: _launch.launch(kernel, grid, *args, **c)


def sweep(
    n: int,
    k: int,
    d: int,
    repeats: int,
    *,
    timer=None,
    device="cuda",
    dtype=torch.bfloat16,
    limit: int = None,
    kinds=SWEEP_KINDS,
    verbose: bool = True,
) -> list:
    """[(kernel, config, p, µs or None, note)]: every configuration of :func:`_configs` (the first
    ``limit`` per kernel if given) at one shape, r = 12, unsplit. µs None: the launch raised (a
    config that does not compile: shared memory, registers), the note says what. Every shrink
    config must give the shipped config's t, every grad_rank config its ge (note "WRONG RESULT")."""
    timer = timer or _time
    o = _operands(n, k, d, device, dtype)
    t = torch.empty(n, o.r, device=o.x.device)
    rows = []
    ref = {}  # (kind, dropout p) -> the shipped config's t / ge
    for p in (0.1, 0.0):
        for kind in kinds:
            if kind == "expand_add" and p:
                continue  # no dropout in expand_add
            for cfg in itertools.islice(_configs(kind), limit):
                try:
                    us = timer(sweep_launch(kind, o, cfg, p, t), repeats)
                except Exception as exc:  # noqa: BLE001 -- a config that does not compile (shared memory, registers)
                    rows.append((kind, cfg, p, None, f"{type(exc).__name__}: {str(exc)[:80]}"))
                    continue
                note = ""
                res = {"shrink": t, "grad_rank": o.ge}.get(kind)
                if res is not None:  # every config must give the shipped config's result
                    got = ref.setdefault((kind, p), res.clone())
                    if not torch.allclose(res, got, rtol=1e-2, atol=1e-2):
                        note = "WRONG RESULT"
                rows.append((kind, cfg, p, us, note))
                if verbose:
                    print(f"sweep {k}->{d} p={p} {kind:<10} {cfg} {us:8.1f} us {note}", flush=True)
    return rows


def _line(shape: str, label: str, s, pred, lat: float = 0.0, meas: float = None) -> str:
    """One table row: predictions (MB, bw90, bw70, issue, latency) and, if timed, the measurement."""
    mb, bw90, bw70, iss = pred
    lo, hi = max(bw90, iss, lat), max(bw70, iss, lat)
    line = (
        f"{shape:>12} {label:<16} {s!s:>3} {mb:7.1f} {bw90:8.1f} {bw70:8.1f} {iss:7.1f} "
        f"{f'{lat:.1f}' if lat else '–':>7} {lo:6.1f}–{hi:<7.1f}"
    )
    if meas is not None:
        ratio = meas / lo if meas < lo else (meas / hi if meas > hi else 1.0)
        line += f" {meas:12.1f} {mb * 1e3 / meas:7.0f} {ratio:9.2f}"
    return line


def report(k: int, d: int, pred: dict, split_pred: dict, meas: dict = None) -> list:
    """The table's lines for one shape: each kernel unsplit then split (S: the factor timed, this
    device's plan; the paper's when nothing was measured), then the measured sums of the four."""
    shape = f"{k}→{d}"
    lines = []
    paper_s = cop.split_factors(k, d)
    dev_s = meas["S"] if meas else paper_s
    sums = {"unsplit": [0.0, 0.0], "split": [0.0, 0.0]}  # predicted lo, hi of the four
    for kernel in KERNELS:
        name = kernel[1:-7]
        m = meas["unsplit"].get(kernel) if meas else None
        lines.append(_line(shape, name, 1, pred[kernel], meas=m))
        i = SPLIT_BY[kernel]
        s, sp = dev_s[i], split_pred[kernel]
        _, bw90, bw70, iss = pred[kernel]
        sums["unsplit"][0] += max(bw90, iss)
        sums["unsplit"][1] += max(bw70, iss)
        if s == 1:
            sums["split"][0] += max(bw90, iss)
            sums["split"][1] += max(bw70, iss)
            lines.append(
                f"{shape:>12} {name + ' split':<16}   – the plan keeps S = 1 (unsplit) at N = {cop.N}, "
                f"{'k' if i == 0 else 'd'} = {(k, d)[i]}{' on this device' if meas else ''}: not timed"
            )
            continue
        sums["split"][0] += max(sp[2], sp[4], sp[5])
        sums["split"][1] += max(sp[3], sp[4], sp[5])
        m = meas["split"].get(kernel) if meas else None
        line = _line(shape, name + " split", s, sp[1:5], sp[5], m)
        if s != paper_s[i]:
            line += f"  (predicted for S = {paper_s[i]}, an H100's plan)"
        lines.append(line)
    (u_lo, u_hi), (s_lo, s_hi) = sums["unsplit"], sums["split"]
    total = f"{shape:>12} sum of the four: predicted unsplit {u_lo:.0f}–{u_hi:.0f} µs, split {s_lo:.0f}–{s_hi:.0f} µs"
    if meas:
        for what, msg in meas["errors"].items():
            lines.append(f"{shape:>12} {what}: FAILED: {msg}")
        if meas["pairs"]:
            wrong = meas["wrong"]
            lines.append(
                f"{shape:>12} split check ({', '.join(meas['pairs'])}): "
                + (f"WRONG RESULT: {', '.join(wrong)}" if wrong else "split = unsplit")
            )
        un = [meas["unsplit"].get(kn) for kn in KERNELS]
        # the split path: each kernel's split form where the plan splits it, else the unsplit one
        sp = [meas["split"].get(kn) if dev_s[SPLIT_BY[kn]] > 1 else un[j] for j, kn in enumerate(KERNELS)]
        if None not in un and None not in sp:
            total += f"; measured unsplit {sum(un):.1f} µs, split {sum(sp):.1f} µs"
        else:
            total += "; measured: a kernel is missing"
    lines.append(total)
    return lines


HEADER = (
    f"{'k→d':>12} {'kernel':<16} {'S':>3} {'MB':>7} {'bw@90%':>8} {'bw@70%':>8} {'issue':>7} {'latency':>7} "
    f"{'predicted µs':>14} {'measured µs':>12} {'GB/s':>7} {'meas/pred':>9}"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sass", help="a bench.compile_check --json result (default: compile the sm_90 binaries)")
    ap.add_argument("--n", type=int, default=cop.N, help="tokens per layer (the predictions assume 8192)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="also time every launch configuration of _configs "
        "(4096→4096 and 4096→11008, unsplit) and print the best per kernel",
    )
    ap.add_argument(
        "--adapters",
        choices=sorted(ADAPTERS),
        default="bf16",
        help="the adapters' dtype (x and g bf16): bf16 (autocast) or fp32 (PEFT's default: bf16x3 products)",
    )
    args = ap.parse_args(argv)
    if args.n != cop.N:
        cop.N = args.n
    adapter_dtype, config = ADAPTERS[args.adapters], cop.SASS_CONFIG
    if args.adapters == "fp32":
        if args.sweep:
            ap.error("--sweep times the bf16 launch configurations only")
        from adalora_fast.kernels import adapter_linear as ka

        # the binaries the launchers pick at torch's fp32 matmul precision now: bf16x3 at "highest"
        config = f"bfloat16/float32,{ka.layer_precision(torch.bfloat16, torch.float32, 12)},R16"
        print(f"adapters fp32 on a bf16 base: the binaries {config}")
    counts, split_counts = sass_counts(args.sass, config)
    on_gpu = torch.cuda.is_available()
    print(HEADER)
    for k, d in cop.SHAPES:
        pred = predictions(counts, k, d)
        split_pred = split_predictions(split_counts, k, d, latency=args.adapters == "bf16")
        meas = None
        if on_gpu:
            try:
                meas = measure(args.n, k, d, args.repeats, adapter_dtype=adapter_dtype)
            except Exception as exc:  # noqa: BLE001 -- the other shapes still run
                print(f"{f'{k}→{d}':>12} measure FAILED: {type(exc).__name__}: {str(exc)[:160]}")
        for line in report(k, d, pred, split_pred, meas):
            print(line, flush=True)
    if not on_gpu:
        print("gpu_check: no CUDA GPU: predictions only, nothing measured (exit status 2)", file=sys.stderr)
        return 2
    print(
        f"device: {torch.cuda.get_device_name()}; meas/pred 1.00 = inside the predicted range; "
        "split predictions assume an H100's plan and a latency bound scaled from its unsplit measurements"
    )
    if args.sweep:
        for k, d in cop.SHAPES[:2]:
            rows = sweep(args.n, k, d, max(10, args.repeats // 2))
            for kind in SWEEP_KINDS:
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
