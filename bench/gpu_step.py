"""A GPU session's one script: the training step, eager and captured, and the four layer kernels.

    python -m bench.gpu_step [--budget-s 480] [--steps 20] [--no-kernels]
    python -m bench.gpu_step --dry-run      # on the CPU at a tiny size: checks that every part runs

For each step model, a training step (forward with the orthogonal penalty in the loss, backward,
AdamW on the trainable parameters; ``update_and_allocate`` for ours, outside any graph) of:

* **base**: the same model without adapters (weights frozen; the embeddings' output requires grad,
  ``bench/common.make_contender``), the floor;
* **PEFT LoRA** at the same r = 12, dropout 0.1, eager;
* **ours eager**: adalora_fast, dropout 0.1, the eager host path;
* **ours captured**: the same forward, backward and a ``capturable`` AdamW step captured once in a
  CUDA graph (``torch.cuda.graph``) and replayed, ``update_and_allocate`` eager after each replay.

Step models: the hidden-2048 LLaMA of the GPU plan (4 layers, 4 x 512 tokens; fp32, a bf16 base with
fp32 adapters, and fp32 under bf16 autocast) and a LLaMA-7B-like model (hidden 4096, intermediate
11008, 32 heads, 2 layers, 4 x 512 tokens, bf16 base with fp32 adapters). Printed per row: ms per
step (CUDA events, median over samples), the host ms per step (the time the Python step call takes
to return: the host path while the GPU keeps up), kernels per step and the device ms per step
(torch.profiler, one profiled step), and ours / LoRA, ours / base. Then ``bench.gpu_check``: the
four layer kernels at the LLaMA-7B shapes against their predicted bounds (``kernels/COST.md``), each
unsplit and split (the split-K shrink / split-D grad_rank at the factor this device's plan picks, the
expand-add / dA_dx summing their partials), with its check that the split forms give the unsplit
results.

Every part checks the remaining budget (``--budget-s``, default 8 minutes) and is skipped, with a
line saying so, when it would not fit. ``--dry-run`` runs the same code on the CPU with a tiny model,
no CUDA graph and no kernel timing: it proves the script runs, it measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from bench.common import PROJECTIONS, LlamaShape, adapter_params, llama, make_contender, schedule_kwargs  # noqa: F401

H2048 = LlamaShape(layers=4, vocab=32000, seq=512, batch=4, hidden=2048, intermediate=5504, heads=16)
L7B = LlamaShape(layers=2, vocab=32000, seq=512, batch=4, hidden=4096, intermediate=11008, heads=32)
TINY = LlamaShape(layers=1, vocab=256, seq=16, batch=2, hidden=64, intermediate=172, heads=2)
PLAN = (("hidden-2048", H2048, ("fp32", "bf16", "autocast")), ("llama-7b-like", L7B, ("bf16",)))
KINDS = ("base", "peft_lora", "ours", "ours_captured")
R, P = 12, 0.1


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Step:
    """One contender's training step over one model: ``run()`` one eager step (or one replay)."""

    def __init__(self, kind: str, shape: LlamaShape, variant: str, dev: torch.device, ids: torch.Tensor):
        self.kind, self.dev, self.ids = kind, dev, ids
        base = llama(shape, dev)
        if variant == "bf16":
            base = base.to(torch.bfloat16)
        self.autocast = variant == "autocast"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model, self.update = make_contender(
                "ours" if kind == "ours_captured" else kind, base, R, P, PROJECTIONS
            )
        self.model.train()
        self.params = adapter_params(self.model)
        captured = kind == "ours_captured" and dev.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, capturable=captured) if self.params else None
        self.n = 5000  # a step number of the schedule's budget-shrinking phase (bench/common.MASK_STEP)
        self.graph = None
        if captured:
            self._capture()

    def _fwd_bwd_opt(self):
        if self.autocast:
            with torch.autocast(self.dev.type, dtype=torch.bfloat16):
                loss = self.model(input_ids=self.ids, labels=self.ids).loss
        else:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        return loss

    def _capture(self):
        for q in self.params:  # static gradient buffers: zeroed in place inside the graph
            q.grad = torch.zeros_like(q)

        def body():
            for q in self.params:
                q.grad.zero_()
            return self._fwd_bwd_opt()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the caches
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = body()

    def run(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._fwd_bwd_opt()
        if self.update is not None:
            self.n += 1
            self.update(self.n)
        if self.opt is not None and self.graph is None:
            self.opt.zero_grad()


def measure(step: Step, steps: int) -> dict:
    """ms per step (median of samples), host ms per step, kernels and device ms per step."""
    dev = step.dev
    for _ in range(3):
        step.run()
    _sync(dev)
    samples, host = [], []
    per = max(1, steps // 5)
    for _ in range(5):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        for _ in range(per):
            h0 = time.perf_counter()
            step.run()
            host.append(time.perf_counter() - h0)
        if dev.type == "cuda":
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / per)
        else:
            samples.append((time.perf_counter() - t0) * 1e3 / per)
    kernels = device_ms = None
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step.run()
            _sync(dev)
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = len(ev)
        device_ms = sum(e.device_time for e in ev) / 1e3
    return {
        "ms": statistics.median(samples),
        "spread": (max(samples) - min(samples)) / statistics.median(samples),
        "host_ms": statistics.median(host) * 1e3,
        "kernels": kernels,
        "device_ms": device_ms,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the CPU at a tiny size: checks that every part runs")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole script")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--no-kernels", action="store_true", help="skip bench.gpu_check (the four kernels)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        print("gpu_step: no CUDA GPU (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if on_gpu else "cpu")
    plan = PLAN if on_gpu else (("tiny (dry run)", TINY, ("fp32", "bf16", "autocast")),)
    steps = args.steps if on_gpu else 2
    if on_gpu:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 3.0:  # the SMs idle at a low clock: warm them first
            a @ a
        _sync(dev)
        del a
    rows = []
    print(
        f"{'model':<16} {'variant':<9} {'contender':<14} {'ms/step':>9} {'host ms':>8} {'kernels':>8} "
        f"{'device ms':>9} {'spread':>7}"
    )
    for name, shape, variants in plan:
        for variant in variants:
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 45:
                print(f"{name:<16} {variant:<9} skipped: {left:.0f} s of the budget left")
                continue
            torch.manual_seed(0)
            ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=dev)
            res = {}
            for kind in KINDS:
                if kind == "ours_captured" and not on_gpu:
                    continue
                try:
                    step = Step(kind, shape, variant, dev, ids)
                    res[kind] = measure(step, steps)
                except Exception as exc:  # noqa: BLE001 -- one failing row must not lose the others
                    print(f"{name:<16} {variant:<9} {kind:<14} FAILED: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                finally:
                    step = None
                    if on_gpu:
                        torch.cuda.empty_cache()
                r = res[kind]
                fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
                print(
                    f"{name:<16} {variant:<9} {kind:<14} {r['ms']:9.2f} {r['host_ms']:8.2f} {fmt(r['kernels'], '8d')} "
                    f"{fmt(r['device_ms'], '9.2f')} {r['spread'] * 100:6.0f}%",
                    flush=True,
                )
            rows.append((name, variant, res))
    print("\nratios (ms per step): ours / PEFT LoRA, ours / base; per adapted layer: host ms over base's")
    for name, variant, res in rows:
        if {"ours", "peft_lora", "base"} <= set(res):
            n_layers = (H2048 if name == "hidden-2048" else L7B if name.startswith("llama") else TINY).layers * 7
            line = (
                f"{name:<16} {variant:<9} eager ours/LoRA {res['ours']['ms'] / res['peft_lora']['ms']:.2f}, "
                f"ours/base {res['ours']['ms'] / res['base']['ms']:.2f}"
            )
            if "ours_captured" in res:
                c = res["ours_captured"]["ms"]
                line += f"; captured ours/LoRA {c / res['peft_lora']['ms']:.2f}, ours/base {c / res['base']['ms']:.2f}"
            over = {k: (res[k]["host_ms"] - res["base"]["host_ms"]) / n_layers for k in ("ours", "peft_lora")}
            line += f"; host ms per layer over base: ours {over['ours']:.3f}, LoRA {over['peft_lora']:.3f}"
            print(line)
    if not args.no_kernels:
        left = args.budget_s - (time.perf_counter() - t_start)
        if not on_gpu:
            print("\nkernels: not timed in a dry run (bench.gpu_check needs a GPU)")
        elif left < 60:
            print(f"\nkernels: skipped, {left:.0f} s of the budget left")
        else:
            from bench import gpu_check

            print("\nthe four layer kernels at the LLaMA-7B shapes (bench.gpu_check):", flush=True)
            gpu_check.main(["--repeats", "30"])
    print(
        f"\ngpu_step done in {time.perf_counter() - t_start:.0f} s"
        + (" (dry run: nothing measured)" if not on_gpu else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
