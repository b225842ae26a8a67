"""The host path of one adapted layer on the CUDA code path, measured on a CPU.

    python -m bench.host_path [--repeats 15] [--settings bf16,fp32_adapters,autocast] [--json]

On a GPU a small training step is bound by the host: Python, the dispatcher and kernel launches,
not the kernels. This measures that host work without a GPU: the Triton implementation is forced
(``ADALORA_FAST_BACKEND=triton`` under ``TRITON_INTERPRET=1``, ``ADALORA_FAST_CPU_EXT=0``) and the
one launch hook (``kernels/triton_ops/_launch.launch``) is stubbed to count launches and run
nothing, so on tiny tensors (k = d = 64, 16 tokens, one thread) what the clock sees is the host
work of each contender. Per layer step (forward + backward, x requiring grad):

* **host us**: median over alternating rounds of the bare frozen ``nn.Linear`` ("base"), PEFT
  LoRA and ours (AdaLoraLinear) at r = 12, dropout 0.1;
* **overhead us**: a contender's time minus the base's (what the adapter adds on the host);
  **ours / LoRA overhead**: the target is <= 0.5;
* **launches**: device launches per layer step: the leaf ATen ops of the profiler's op tree that
  run a kernel (views, allocations and host reads left out; ``aten::dropout`` counted as one, the
  fused kernel CUDA runs, where the CPU decomposes it into three ops), plus the stubbed Triton
  launches; the target is ours <= PEFT LoRA's.

Settings: ``bf16`` (base and adapters bf16), ``fp32_adapters`` (bf16 base, fp32 adapters: PEFT's
default), ``autocast`` (an fp32 layer under ``torch.autocast(bfloat16)``). Host time a real
launch adds on a GPU is not here (the stub runs nothing): add the launch counts times what one
launch costs on the host (``bench/README.md``).

The environment must be set before ``triton`` is imported, so ``python -m bench`` runs this module
in a child process (:func:`run_in_subprocess`).
"""

from __future__ import annotations

import os

_ENV = {"ADALORA_FAST_BACKEND": "triton", "TRITON_INTERPRET": "1", "ADALORA_FAST_CPU_EXT": "0"}

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

SETTINGS = ("bf16", "fp32_adapters", "autocast")
KINDS = ("base", "peft_lora", "ours")
# ops that run no kernel: allocations, views, metadata, host reads
_NO_KERNEL = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "detach_",
    "alias",
    "lift_fresh",
    "_local_scalar_dense",
    "item",
    "is_same_size",
    "size",
    "stride",
    "sym_size",
    "sym_stride",
    "numel",
    "dim",
    "view",
    "_unsafe_view",
    "reshape",
    "as_strided",
    "t",
    "transpose",
    "permute",
    "expand",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "resolve_conj",
    "resolve_neg",
    "_reshape_alias",
    "contiguous",
    "unbind",
    "split",
    "split_with_sizes",
    "chunk",
    "narrow",
    "view_as",
    "to",
    "_to_copy",
    "clone",
    "copy",
    "is_nonzero",
    "result_type",
    "set_",
    "_has_compatible_shallow_copy_type",
}
# composite ops whose CUDA implementation is one fused kernel, where the CPU decomposes them
_FUSED_ON_CUDA = {"dropout", "native_dropout", "feature_dropout"}


def _env_ok() -> bool:
    return all(os.environ.get(k) == v for k, v in _ENV.items()) and "triton" not in sys.modules


def build(kind: str, setting: str, k: int, d: int, r: int, p: float):
    """(layer, dtype of x) for one contender in one setting."""
    import torch
    from torch import nn

    from bench.common import make_contender

    torch.manual_seed(0)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(k, d, bias=False)

    holder = Holder()
    if kind == "base":
        layer = holder.proj.requires_grad_(False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_contender(kind, holder, r, p, ["proj"], causal_lm=False)
        layer = holder.proj
        for name, q in layer.named_parameters():
            if "lora_E" in name:  # E = 0 at init: nonzero, as after a few steps (the same work either way)
                nn.init.normal_(q.data)
    if setting == "bf16":
        layer.to(torch.bfloat16)
        xdt = torch.bfloat16
    elif setting == "fp32_adapters":
        (layer if kind == "base" else layer.base_layer).to(torch.bfloat16)
        xdt = torch.bfloat16
    else:
        xdt = torch.float32
    layer.train()
    return layer, xdt


def _step_fn(layer, x, g, autocast: bool):
    import torch

    ps = [q for q in layer.parameters() if q.requires_grad]

    def step():
        x.grad = None
        for q in ps:
            q.grad = None
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
        else:
            out = layer(x)
        out.backward(g)

    return step


class _Stub:
    """The launch hook replaced: the host work of ``_launch.launch`` up to the Triton call (which
    device the tensors are on), then a count instead of the launch."""

    def __init__(self):
        from adalora_fast.kernels import _launch

        self.count = 0
        self.names: list = []
        self.record = False
        self._launch = _launch
        self._real = _launch.launch
        device_of = _launch.launch_device

        def stub(kernel, grid, *args, _device=None, **kwargs):
            if _device is None:
                device_of(args)
            self.count += 1
            if self.record:
                self.names.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)

        self.stub = stub

    def __enter__(self):
        self._launch.launch = self.stub
        return self

    def __exit__(self, *exc):
        self._launch.launch = self._real


def count_launches(step, stub: _Stub) -> dict:
    """Device launches of one call of ``step``: profiler leaf ops that run a kernel + stubbed launches."""
    from torch.profiler import ProfilerActivity, profile

    step()
    stub.count, stub.names, stub.record = 0, [], True
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    stub.record = False
    ops: list = []

    def walk(ev) -> int:
        """Counts the ops of ``ev``'s subtree that run a kernel: an op whose children run none (an
        ``mm`` allocating its output) runs its own; one whose children do (``linear``) runs none."""
        name = ev.name.split("::", 1)[1] if ev.name.startswith("aten::") else None
        if name in _FUSED_ON_CUDA:
            ops.append(name)
            return 1
        below = sum(walk(c) for c in ev.cpu_children)
        if below == 0 and name is not None and name not in _NO_KERNEL:
            ops.append(name)
            return 1
        return below

    for ev in prof.events():
        if ev.cpu_parent is None:
            walk(ev)
    return {
        "aten": len(ops),
        "triton": stub.count,
        "total": len(ops) + stub.count,
        "aten_ops": sorted(ops),
        "triton_kernels": list(stub.names),
    }


def direct_launch_us(n: int = 20000) -> float:
    """Host microseconds of one direct launch's bookkeeping on the GPU path (``_launch._launch_cuda``
    after the first launch: the argument key of a shrink-like launch, the lookup, the stream, the
    call) with a stand-in compiled kernel: all of a launch but the driver call itself."""
    import torch

    from adalora_fast.kernels import _launch

    class P:
        def __init__(self, name, c):
            self.name, self.is_constexpr = name, c

    class Compiled:
        packed_metadata = function = None

        def launch_metadata(self, *a):
            return None

        def run(self, *a):
            pass

    class Kernel:
        params = [P(f"a{i}", False) for i in range(12)] + [
            P(n, True) for n in ("BLOCK_N", "BLOCK_K", "R_PAD", "UPCAST")
        ]

        def __getitem__(self, grid):
            return lambda *a, **k: Compiled()

    x, a, t, s = torch.zeros(16, 64), torch.zeros(12, 64), torch.zeros(16, 12), torch.zeros(1, dtype=torch.int64)
    args = (x, a, t, s, 16, 64, 12, 64, 1, 6554, 1.1, 1)
    kw = dict(BLOCK_N=64, BLOCK_K=64, R_PAD=16, UPCAST=False, num_warps=4, num_stages=5)
    real = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    saved = dict(_launch._compiled)
    torch._C._cuda_getCurrentRawStream = lambda device: 0
    try:
        k = Kernel()
        _launch._launch_cuda(k, (1,), 0, args, kw)
        t0 = time.thread_time()
        for _ in range(n):
            _launch._launch_cuda(k, (1,), 0, args, kw)
        return (time.thread_time() - t0) / n * 1e6
    finally:
        if real is not None:
            torch._C._cuda_getCurrentRawStream = real
        _launch._compiled.clear()
        _launch._compiled.update(saved)


def _time(fn, inner: int) -> float:
    """Seconds of this thread's CPU time per call: on a shared machine, time the thread spent
    descheduled is left out (the work is all on this one thread: one torch thread, no kernels)."""
    t0 = time.thread_time()
    for _ in range(inner):
        fn()
    return (time.thread_time() - t0) / inner


def measure(
    settings=SETTINGS,
    repeats: int = 15,
    warmup: int = 20,
    sample_s: float = 0.05,
    k: int = 64,
    d: int = 64,
    n: int = 16,
    r: int = 12,
    p: float = 0.1,
) -> list:
    """One row per setting (see the module docstring); times in microseconds."""
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the stubbed kernels leave their outputs unwritten
    per_launch = direct_launch_us()
    rows = []
    with _Stub() as stub:
        for setting in settings:
            torch.manual_seed(1)
            steps = {}
            for kind in KINDS:
                layer, xdt = build(kind, setting, k, d, r, p)
                x = torch.randn(n, k, dtype=xdt, requires_grad=True)
                g = torch.randn(n, d, dtype=xdt if setting != "autocast" else torch.bfloat16)
                steps[kind] = _step_fn(layer, x, g, setting == "autocast")
            launches = {kind: count_launches(fn, stub) for kind, fn in steps.items()}
            inner = {}
            for kind, fn in steps.items():
                for _ in range(warmup):
                    fn()
                inner[kind] = max(1, int(sample_s / max(_time(fn, 5), 1e-7)))
            samples = {kind: [] for kind in KINDS}
            for _ in range(repeats):
                for kind, fn in steps.items():
                    samples[kind].append(_time(fn, inner[kind]) * 1e6)
            med = {kind: statistics.median(s) for kind, s in samples.items()}
            spread = max((max(s) - min(s)) / statistics.median(s) for s in samples.values())
            # the overhead from each round's own base (the contenders of a round ran back to back)
            over_rounds = {
                kind: [a - b for a, b in zip(samples[kind], samples["base"])] for kind in ("peft_lora", "ours")
            }
            over = {kind: statistics.median(v) for kind, v in over_rounds.items()}
            ratios = [o / lo for o, lo in zip(over_rounds["ours"], over_rounds["peft_lora"]) if lo > 0]
            rows.append(
                dict(
                    setting=setting,
                    base_us=med["base"],
                    peft_lora_us=med["peft_lora"],
                    ours_us=med["ours"],
                    peft_lora_overhead_us=over["peft_lora"],
                    ours_overhead_us=over["ours"],
                    overhead_ratio=over["ours"] / over["peft_lora"] if over["peft_lora"] > 0 else None,
                    overhead_ratio_lo=min(ratios) if ratios else None,
                    overhead_ratio_hi=max(ratios) if ratios else None,
                    # ours with each stubbed Triton launch charged the direct launch's measured bookkeeping
                    direct_launch_us=per_launch,
                    ours_overhead_charged_us=over["ours"] + launches["ours"]["triton"] * per_launch,
                    launches_base=launches["base"]["total"],
                    launches_peft_lora=launches["peft_lora"]["total"],
                    launches_ours=launches["ours"]["total"],
                    launch_detail={kd: launches[kd] for kd in KINDS},
                    spread=spread,
                    samples=samples,
                    k=k,
                    d=d,
                    n=n,
                    r=r,
                    p=p,
                    repeats=repeats,
                )
            )
    return rows


def table(rows: list) -> str:
    head = (
        f"{'setting':<14} {'base us':>8} {'LoRA us':>8} {'ours us':>8} {'LoRA +us':>9} {'ours +us':>9} "
        f"{'ours/LoRA +':>11} {'(rounds)':>11} {'launches base/LoRA/ours':>24} {'spread':>7}"
    )
    lines = [head]
    charged = []
    for r in rows:
        ratio = f"{r['overhead_ratio']:.2f}" if r["overhead_ratio"] is not None else "-"
        rng = (
            f"{r['overhead_ratio_lo']:.2f}-{r['overhead_ratio_hi']:.2f}"
            if r.get("overhead_ratio_lo") is not None
            else "-"
        )
        lines.append(
            f"{r['setting']:<14} {r['base_us']:8.1f} {r['peft_lora_us']:8.1f} {r['ours_us']:8.1f} "
            f"{r['peft_lora_overhead_us']:9.1f} {r['ours_overhead_us']:9.1f} {ratio:>11} {rng:>11} "
            f"{r['launches_base']:>8}/{r['launches_peft_lora']}/{r['launches_ours']:<8} {r['spread'] * 100:6.0f}%"
        )
        if r.get("ours_overhead_charged_us") is not None and r["peft_lora_overhead_us"] > 0:
            charged.append(f"{r['setting']} {r['ours_overhead_charged_us'] / r['peft_lora_overhead_us']:.2f}")
    if charged:
        lines.append(
            f"ours/LoRA + with each Triton launch charged its direct-launch bookkeeping "
            f"({rows[0]['direct_launch_us']:.1f} us, measured; the driver call not): {', '.join(charged)}"
        )
    return "\n".join(lines)


SECTION = "host path (CUDA code path, on the CPU)"
SETTING_LABELS = {
    "bf16": "bf16 base + bf16 adapters",
    "fp32_adapters": "bf16 base + fp32 adapters",
    "autocast": "fp32 layer under autocast bf16",
}


def bench_rows(repeats: int = 15) -> list:
    """The rows ``python -m bench`` prints (its table format, ``cases._row``), measured in a child
    process: per setting the host time per layer step, the adapter's host overhead over the bare
    layer (x LoRA = PEFT LoRA's / ours: the target is >= 2) and the device launches per layer step."""
    from .cases import _row
    from .common import Timing

    rows = []
    for r in run_in_subprocess([f"--repeats={repeats}"]):
        case = f"{SETTING_LABELS.get(r['setting'], r['setting'])}, k=d={r['k']}, N={r['n']}, r={r['r']}, p={r['p']:g}"
        samples = {"ours": r["samples"]["ours"], "peft_lora": r["samples"]["peft_lora"], "base": r["samples"]["base"]}
        t = Timing(samples={k: [v * 1e-6 for v in s] for k, s in samples.items()})
        rows.append(
            _row(
                SECTION,
                case,
                "host us per layer step (fwd+bwd)",
                "us",
                {"ours": r["ours_us"], "peft_lora": r["peft_lora_us"], "base": r["base_us"]},
                t,
                setting=r["setting"],
            )
        )
        over = _row(
            SECTION,
            case,
            "adapter host overhead us (minus base)",
            "us",
            {"ours": r["ours_overhead_us"], "peft_lora": r["peft_lora_overhead_us"]},
            setting=r["setting"],
        )
        over["spread"] = r["spread"]
        rows.append(over)
        rows.append(
            _row(
                SECTION,
                case,
                "device launches per layer step",
                "launches",
                {"ours": r["launches_ours"], "peft_lora": r["launches_peft_lora"], "base": r["launches_base"]},
                setting=r["setting"],
            )
        )
    return rows


def targets(rows: list) -> list:
    """The host-path targets in ``report.targets``' format: the adapter's host overhead at most half
    PEFT LoRA's, and no more device launches than PEFT LoRA, per setting."""
    out = []
    for r in rows:
        if r.get("section") != SECTION or r["ours"] is None or r["peft_lora"] is None:
            continue
        where = f"host path {r.get('setting')}"
        if r["metric"].startswith("adapter host overhead"):
            v = r["ours"] / r["peft_lora"] if r["peft_lora"] > 0 else float("inf")
            out.append(
                {
                    "target": f"{where}: ours / PEFT LoRA host overhead",
                    "value": v,
                    "goal": "<= 0.50",
                    "met": v <= 0.5,
                    "note": "CPU, Triton path forced, launches stubbed",
                }
            )
        elif r["metric"].startswith("device launches"):
            out.append(
                {
                    "target": f"{where}: launches ours / PEFT LoRA",
                    "value": r["ours"] / r["peft_lora"],
                    "goal": "<= 1.00",
                    "met": r["ours"] <= r["peft_lora"],
                    "note": "",
                }
            )
    return out


def run_in_subprocess(args=()) -> list:
    """The rows, measured in a child process with the environment this measurement needs."""
    env = dict(os.environ, **_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "bench.host_path", "--json", *args],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["rows"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_path", description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="the rows as JSON on stdout")
    ap.add_argument("--ops", action="store_true", help="also list the counted ops of each contender")
    args = ap.parse_args(argv)
    if not _env_ok():  # re-run with the environment set before triton is imported
        rows = run_in_subprocess([f"--settings={args.settings}", f"--repeats={args.repeats}"])
    else:
        rows = measure(tuple(args.settings.split(",")), repeats=args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.json:
        json.dump({"rows": rows, "loadavg_1min": load}, sys.stdout)
        return 0
    print(
        f"host path per layer step (fwd+bwd), k=d={rows[0]['k']}, N={rows[0]['n']}, r={rows[0]['r']}, "
        f"p={rows[0]['p']}, 1 thread, {rows[0]['repeats']} rounds; load avg {load:.2f}"
    )
    print(table(rows))
    if args.ops:
        for r in rows:
            for kind, det in r["launch_detail"].items():
                print(
                    f"  {r['setting']:<14} {kind:<10} {det['total']:3d}: {' '.join(det['aten_ops'])} | "
                    f"{' '.join(det['triton_kernels'])}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
