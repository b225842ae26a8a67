"""Table, CSV, plot and the target checks of a benchmark run."""

from __future__ import annotations

import csv
import datetime
import os
from typing import Optional

COLUMNS = [
    "section", "case", "metric", "unit", "ours", "peft_adalora", "peft_lora", "x_adalora", "x_lora", "spread",
    "ours_best", "peft_adalora_best", "peft_lora_best",
]


def _fmt(v, unit=None) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 10:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(rows: list) -> str:
    head = ["section", "case", "metric", "unit", "adalora_fast", "PEFT AdaLoRA", "PEFT LoRA", "x AdaLoRA", "x LoRA", "spread"]
    body = []
    for r in rows:
        body.append(
            [
                r["section"], r["case"], r["metric"], r["unit"], _fmt(r["ours"]), _fmt(r["peft_adalora"]),
                _fmt(r["peft_lora"]), _ratio(r["x_adalora"]), _ratio(r["x_lora"]),
                "-" if r["spread"] is None else f"{100 * r['spread']:.0f}%",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {4, 5, 6, 7, 8, 9}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and r["section"] != prev:
            out.append("")
        prev = r["section"]
        out.append(line(cells))
    return "\n".join(out)


def write_csv(rows: list, path: str, meta: dict) -> None:
    with open(path, "x", newline="") as f:  # never over an earlier run's file
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS}, )


def _find(rows, section, metric, case_has="", unit=None):
    for r in rows:
        if r["section"] == section and r["metric"] == metric and case_has in r["case"] and (unit is None or r["unit"] == unit):
            return r
    return None


def targets(rows: list, curve: list) -> list:
    """The tracker's targets, each as {name, value, goal, met}."""
    out = []

    def add(name, value, goal, met, note=""):
        out.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})

    for r in rows:
        if r["section"] == "train step" and r["metric"] == "step time":
            p = r["case"].rsplit("p=", 1)[-1]
            v = r["ours"] / r["peft_lora"]
            add(f"train step p={p}: ours / PEFT LoRA time", v, "<= 1.00", v <= 1.0)
            add(f"train step p={p}: PEFT AdaLoRA / ours time", r["x_adalora"], ">= 1.15", r["x_adalora"] >= 1.15)
        if r["section"] == "train step (compiled)" and r["metric"] == "step time":
            p = r["case"].rsplit("p=", 1)[-1]
            v = r["ours"] / r["peft_lora"]
            add(f"compiled train step p={p}: ours / PEFT LoRA compiled time", v, "<= 1.00", v <= 1.0)
    for label in ("masking step", "non-masking step", "masking step, in training order", "non-masking step, in training order"):
        r = _find(rows, "update_and_allocate", label, "224 layers", unit="ms")
        if r is not None:
            add(f"update_and_allocate, 224 layers, {label}: PEFT / ours", r["x_adalora"], ">= 20", r["x_adalora"] >= 20)
    if curve:
        by = {p["layers"]: p for p in curve}
        hi = max(by)
        ref = 224 if 224 in by and hi != 224 else min((n for n in by if n >= 56), default=min(by))
        if hi != ref:
            for key in ("nomask", "mask", "nomask_cold", "mask_cold"):
                if f"ours_{key}_ms" not in by[ref]:
                    continue
                a = by[ref][f"ours_{key}_ms"] / ref
                b = by[hi][f"ours_{key}_ms"] / hi
                label = ("masking" if key.startswith("mask") else "non-masking") + (", in training order" if key.endswith("cold") else "")
                add(f"update_and_allocate per layer, {label}: {hi} / {ref} layers", b / a, "<= 1.25 (near-flat)", b / a <= 1.25)
    r = _find(rows, "orth_penalty", "forward+backward", "224 layers")
    if r is not None:
        add("orth penalty fwd+bwd, 224 layers: PEFT / ours", r["x_adalora"], ">= 10", r["x_adalora"] >= 10)
    for r in rows:
        if r["section"] == "memory" and r["metric"] == "PEFT LoRA minus dropout copy":
            v = r["ours"] / r["peft_lora"]
            extra = (r["ours"] - r["peft_lora"]) * 1024
            note = f"ours {'+' if extra >= 0 else '-'}{abs(extra):.0f} B" if abs(extra) > 0.5 else "equal"
            add(f"saved bytes {r['case'].split()[0]} p=0.1: ours / (PEFT LoRA - dropout copy)", v, "<= 1.00", v <= 1.0, note)
    for r in rows:
        if r["section"] == "memory" and r["metric"] == "allocator state" and "224 layers" in r["case"]:
            v = r["ours"] / r["peft_adalora"]
            add("allocator state bytes, 224 layers: ours / PEFT", v, "<= 0.667", v <= 2 / 3 + 1e-9)
    return out


def targets_table(ts: list) -> str:
    w = max(len(t["target"]) for t in ts) if ts else 10
    lines = [f"{'target'.ljust(w)}  {'value':>8}  {'goal':<20}  met  note"]
    for t in ts:
        lines.append(f"{t['target'].ljust(w)}  {t['value']:8.4f}  {t['goal']:<20}  {'yes' if t['met'] else 'NO ':3}  {t['note']}")
    return "\n".join(lines)


def _log_layers_axes(ax, xs, ylabel: str, title: str, legend_size: int) -> None:
    """Log-log axes over the numbers of adapted layers, ticked at each measured count."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("adapted layers")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot(rows: list, curve: list, path: str, title: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    xs = [p["layers"] for p in curve]
    style = {"ours": dict(color="tab:blue"), "peft": dict(color="tab:red")}
    for who, lab in (("ours", "adalora_fast"), ("peft", "PEFT AdaLoRA")):
        ax.plot(xs, [p[f"{who}_mask_ms"] for p in curve], "o-", label=f"{lab}, masking step", **style[who])
        ax.plot(xs, [p[f"{who}_nomask_ms"] for p in curve], "s--", label=f"{lab}, non-masking step", **style[who])
    _log_layers_axes(ax, xs, "update_and_allocate, ms (median)", "update_and_allocate vs number of adapted layers", 8)

    ax = axes[1]
    for who, lab in (("ours", "adalora_fast"), ("peft", "PEFT AdaLoRA")):
        ax.plot(xs, [1e3 * p[f"{who}_mask_ms"] / p["layers"] for p in curve], "o-", label=f"{lab}, masking", **style[who])
        ax.plot(xs, [1e3 * p[f"{who}_nomask_ms"] / p["layers"] for p in curve], "s--", label=f"{lab}, non-masking", **style[who])
        if who == "ours" and all("ours_mask_cold_ms" in p for p in curve):
            ax.plot(xs, [1e3 * p["ours_mask_cold_ms"] / p["layers"] for p in curve], "o-", label=f"{lab}, masking, in training order", color="tab:cyan")
            ax.plot(xs, [1e3 * p["ours_nomask_cold_ms"] / p["layers"] for p in curve], "s--", label=f"{lab}, non-masking, in training order", color="tab:cyan")
        oc = [p for p in curve if f"{who}_orth_ms" in p]
        ax.plot([p["layers"] for p in oc], [1e3 * p[f"{who}_orth_ms"] / p["layers"] for p in oc], "^:", label=f"{lab}, orth penalty f+b", **style[who])
    _log_layers_axes(ax, xs, "µs per adapted layer", "per-layer cost (flat = scales linearly)", 7)

    ax = axes[2]
    steps = [r for r in rows if r["section"] == "train step" and r["metric"] == "throughput"]
    names = [("ours", "adalora_fast", "tab:blue"), ("peft_adalora", "PEFT AdaLoRA", "tab:red"), ("peft_lora", "PEFT LoRA", "tab:gray")]
    width = 0.8 / len(names)
    for j, (k, lab, col) in enumerate(names):
        vals = [r[k] for r in steps]
        pos = [i + (j - 1) * width for i in range(len(steps))]
        bars = ax.bar(pos, vals, width, label=lab, color=col)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels(["dropout " + r["case"].rsplit("p=", 1)[-1] for r in steps])
    ax.set_ylabel("training tokens / s (median)")
    ax.set_title("whole training step" + (f"\n{steps[0]['case'].rsplit(', p=', 1)[0]}" if steps else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_paths(out_dir: str, tag: str, date: str, suffix: str = "") -> tuple:
    """(csv, png) paths named by device and the run's start time, to the second: a run never
    overwrites results written before it (the README cites some); an existing name gets -2, -3..."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("T%H%M%S")
    base = os.path.join(out_dir, f"{tag}-{date}{stamp}{suffix}")
    stem, n = base, 1
    while os.path.exists(stem + ".csv") or os.path.exists(stem + ".png"):
        n += 1
        stem = f"{base}-{n}"
    return stem + ".csv", stem + ".png"
