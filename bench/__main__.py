"""``python -m bench``: adalora_fast vs PEFT AdaLoRA vs PEFT LoRA, throughput and memory.

    python -m bench             # the default run (about a quarter of an hour on a 2-core CPU)
    python -m bench --quick     # the same rounds and warm-ups at smaller sizes (the CI smoke test)
    python -m bench --json      # the figures as JSON on stdout (the table goes to stderr)
    python -m bench finetune    # a real fine-tune: accuracy, time and ranks (see bench/finetune/)

Writes ``bench/results/<device>-<date>T<time>.csv`` and ``.png`` (``-quick`` added for ``--quick``);
a run never overwrites an earlier one's files.
On a CUDA machine it runs on the GPU at the GPU plan's sizes (``cases.GPU``: LLaMA-7B projection shapes in bf16,
a 4-layer hidden-2048 model for the steps); otherwise on the CPU (torch path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:
        from .finetune import main as finetune_main

        return finetune_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="smaller sizes, fewer cases, the same rounds and warm-ups (CI)"
    )
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (table to stderr)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), help="output folder"
    )
    ap.add_argument("--no-files", action="store_true", help="write no CSV/PNG")
    ap.add_argument("--only", default=None, help="comma list of sections: layer,alloc,step,quant4,final,memory,host")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (>= 5 recommended)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: every core this process may use)"
    )
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tqdm import tqdm

    from . import cases, report
    from .common import device_info, pick_device, setup_threads

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    setup_threads(args.threads)
    device = pick_device(args.device)
    plan = cases.QUICK if args.quick else (cases.GPU if device.type == "cuda" else cases.DEFAULT)
    if args.repeats:
        import dataclasses

        plan = dataclasses.replace(plan, repeats=args.repeats)
    only = set(args.only.split(",")) if args.only else {"layer", "alloc", "step", "quant4", "final", "memory", "host"}
    info = device_info(device)
    log = sys.stderr if args.json else sys.stdout

    rows, curve = [], []
    bar = tqdm(
        total=cases.count_ticks(plan), desc=f"bench {plan.name} on {info['device']}", file=sys.stderr, leave=False
    )

    def tick():
        bar.update(1)

    if "layer" in only:
        bar.set_postfix_str("one layer")
        rows += cases.layer_cases(plan, device, tick)
    if "alloc" in only:
        bar.set_postfix_str("update_and_allocate")
        r, curve = cases.allocator_cases(plan, device, tick)
        rows += r
    if "step" in only:
        bar.set_postfix_str("training step")
        rows += cases.step_cases(plan, device, tick)
    if "quant4" in only:
        bar.set_postfix_str("training step, 4-bit base")
        rows += cases.quant4_cases(plan, device, tick)
    if "final" in only:
        bar.set_postfix_str("final phase")
        rows += cases.final_phase_cases(plan, device, tick)
    if "memory" in only:
        bar.set_postfix_str("memory")
        rows += cases.layer_memory_cases(plan, device, tick)
    if "host" in only:  # the host path on the CUDA code path, measured on the CPU (a child process)
        bar.set_postfix_str("host path")
        from . import host_path

        rows += host_path.bench_rows(repeats=plan.repeats if args.quick else max(plan.repeats, 15))
    bar.close()
    order = {
        "layer": 0,
        "update_and_allocate": 1,
        "orth_penalty": 2,
        "train step": 3,
        "train step (bf16 base)": 4,
        "train step (autocast bf16)": 5,
        "train step (4-bit base)": 5.5,
        "train step (compiled)": 6,
        "compile": 7,
        "final phase": 8,
        "memory": 9,
    }
    rows.sort(key=lambda r: order.get(r["section"], 10))

    elapsed = time.perf_counter() - t_start
    date = datetime.date.today().isoformat()
    meta = dict(info)
    meta.update(
        plan=plan.name,
        date=date,
        elapsed_s=round(elapsed, 1),
        repeats=plan.repeats,
        warmup=plan.warmup,
        step_models="; ".join(
            f"{s.shape.describe()}, dropout {'/'.join(f'{p:g}' for p in s.dropouts)}, {s.inner} steps per sample"
            for s in plan.step_sizes
        ),
        step_dtype_model=(
            f"{plan.step_shape.describe()}, dropout {'/'.join(f'{p:g}' for p in plan.dtype_dropouts)}; "
            "bf16 base: the base weights in bf16, the adapters fp32 (PEFT's default); autocast: fp32 model, "
            "forward under torch.autocast(bfloat16)"
        ),
        step_compiled_model=plan.compiled_shape.describe() if plan.compiled_shape is not None else None,
        step_4bit_model=(
            f"{plan.quant4_shape.describe()}, dropout {'/'.join(f'{p:g}' for p in plan.quant4_dropouts)}; every "
            "projection a bitsandbytes Linear4bit (NF4), the adapters fp32"
            if plan.quant4_shape is not None
            else None
        ),
        step_base="the same model without adapters: weights frozen, embeddings' output requires grad "
        "(backward runs through every layer to it); ours/base etc. = step time / base step time",
        allocator_models=(
            f"LlamaForCausalLM (random init) hidden={plan.alloc_shape.hidden} intermediate={plan.alloc_shape.intermediate}, "
            f"ceil(n/7) layers, the first n projections adapted, init_r={plan.r}, random grads"
        ),
        layer_bench=f"one nn.Linear (no bias) adapted, N={plan.layer_tokens} tokens, r={plan.r}, x requires grad"
        + (f", the layer (adapters too) and x in {str(plan.layer_dtype)[6:]}" if plan.layer_dtype is not None else ""),
        schedule="tinit=10 tfinal=1000 deltaT=10 total_step=10000; masking step 5000, non-masking step 5001",
        timing=(
            "alternating contenders in one process, warm-up, median over rounds of time per call; "
            + ("CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter")
        ),
        ratios="x = PEFT time / ours, ours tok/s / PEFT tok/s, PEFT bytes / ours (> 1: adalora_fast better)",
    )
    ts = report.targets(rows, curve)
    if "host" in only:
        ts += host_path.targets(rows)
    load_after = os.getloadavg()[0] if load_before is not None else None
    if load_before is not None:
        meta["loadavg_1min"] = f"{load_before:.2f} at start, {load_after:.2f} at end, {os.cpu_count()} CPUs"
    busy = report.busy_warning(rows, load_before, load_after, os.cpu_count() or 1)
    if busy:
        meta["warning"] = busy

    text = []
    text.append(
        f"adalora_fast bench ({plan.name}) on {info['device_name']} [{info['device']}], {info['threads']} threads, "
        f"backend={info['backend']}"
        + (f" (C++ CPU ext: {info['cpu_ext']})" if "cpu_ext" in info else "")
        + f", torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}"
    )
    text.append(f"threads          : {info['threads']} torch threads, {os.cpu_count()} CPUs")
    if "loadavg_1min" in meta:
        text.append(f"load avg (1 min) : {meta['loadavg_1min']}")
    if busy:
        text.append(f"WARNING          : {busy}")
    text.append(f"train step models: {meta['step_models'].replace('; ', chr(10) + ' ' * 19)}")
    text.append(f"  bf16/autocast  : {meta['step_dtype_model']}")
    if meta["step_compiled_model"]:
        text.append(f"  compiled       : {meta['step_compiled_model']}")
    if meta.get("step_4bit_model"):
        text.append(f"  4-bit base     : {meta['step_4bit_model']}")
    text.append(f"  base           : {meta['step_base']}")
    text.append(f"allocator models : {meta['allocator_models']}")
    text.append(f"layer bench      : {meta['layer_bench']}")
    text.append(f"timing           : {meta['timing']}; {plan.warmup} warm-up calls, {plan.repeats} rounds")
    text.append(f"ratios           : {meta['ratios']}")
    text.append("")
    text.append(report.table(rows))
    if ts:
        text.append("")
        text.append(report.targets_table(ts))
    files = {}
    if not args.no_files:
        csv_path, png_path = report.default_paths(args.out, info["device"], date, "-quick" if args.quick else "")
        report.write_csv(rows, csv_path, meta)
        files["csv"] = csv_path
        if curve or any(r["section"].startswith("train step") for r in rows):
            load = f", load average {meta['loadavg_1min']}" if "loadavg_1min" in meta else ""
            try:
                report.plot(
                    rows,
                    curve,
                    png_path,
                    f"adalora_fast vs PEFT on {info['device_name']} ({info['threads']} threads{load}), "
                    f"{date}, {plan.name} plan, {plan.repeats} rounds",
                    warning=busy and f"WARNING: {busy}",
                )
                files["png"] = png_path
            except Exception as exc:  # a plot failure must not lose the figures
                text.append(f"(plot not written: {exc})")
    text.append("")
    text.append(f"done in {elapsed:.0f} s" + (f"; wrote {', '.join(files.values())}" if files else ""))
    print("\n".join(text), file=log)
    if args.json:
        json.dump(
            {"meta": meta, "rows": rows, "allocator_curve": curve, "targets": ts, "files": files}, sys.stdout, indent=1
        )
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
