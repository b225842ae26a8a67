"""The fine-tune's results: the summary over seeds, its text table, and the CSV and JSON files
(the CSV through the bench report's writer, the contenders named as in every bench table)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from typing import List, Sequence, Tuple

from ..report import LABELS, text_table, write_csv
from .plan import METHODS, Plan

# the figures summarised over seeds (mean, std, min, max), as the table and the CSV give them
PER_SEED = (
    "accuracy",
    "macro_f1",
    "final_train_ce",
    "median_step_ms",
    "final_phase_step_ms",
    "train_s",
    "eval_s",
    "total_s",
)
CSV_COLUMNS = ["method", "seed", *PER_SEED, "trainable_params", "final_total_rank", "final_adapter_params"]


def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: List[dict]) -> List[dict]:
    out = []
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        s = {"method": method, "seeds": len(rs)}
        for key in PER_SEED:
            vals = [r[key] for r in rs]
            s[key], s[key + "_std"] = _mean_std(vals)
            s[key + "_min"], s[key + "_max"] = min(vals), max(vals)
        s["all_steps_median_ms"] = 1e3 * statistics.median([t for r in rs for t in r["step_s"]])
        s["total_s_all_seeds"] = sum(r["total_s"] for r in rs)
        s["trainable_params"] = rs[0]["trainable_params"]
        s["final_total_rank"] = statistics.fmean(r["final_total_rank"] for r in rs)
        s["final_adapter_params"] = statistics.fmean(r["final_adapter_params"] for r in rs)
        out.append(s)
    return out


def table(summary: List[dict]) -> str:
    head = [
        "method",
        "seeds",
        "test acc",
        "macro-F1",
        "final train CE",
        "step ms (median)",
        "final-phase step ms",
        "train s/seed",
        "total s (all seeds)",
        "trainable params",
        "final total rank",
    ]
    body = []
    for s in summary:
        body.append(
            [
                LABELS[s["method"]],
                str(s["seeds"]),
                f"{s['accuracy']:.4f} ± {s['accuracy_std']:.4f}",
                f"{s['macro_f1']:.4f} ± {s['macro_f1_std']:.4f}",
                f"{s['final_train_ce']:.3f} ± {s['final_train_ce_std']:.3f}",
                f"{s['all_steps_median_ms']:.0f}",
                f"{s['final_phase_step_ms']:.0f}",
                f"{s['train_s']:.1f}",
                f"{s['total_s_all_seeds']:.0f}",
                f"{s['trainable_params']:,}",
                f"{s['final_total_rank']:.0f}",
            ]
        )
    return text_table(head, body, right=set(range(1, len(head))))


def csv_rows(results: List[dict], summary: List[dict]) -> List[dict]:
    """One row per (method, seed), then per method rows seed=mean / std / min / max."""
    rows = list(results)
    for s in summary:
        for stat, suffix in (("mean", ""), ("std", "_std"), ("min", "_min"), ("max", "_max")):
            row = {"method": s["method"], "seed": stat, **{k: s[k + suffix] for k in PER_SEED}}
            if stat == "mean":
                row.update(
                    trainable_params=s["trainable_params"],
                    final_total_rank=s["final_total_rank"],
                    final_adapter_params=s["final_adapter_params"],
                )
            rows.append(row)
    return rows


def write_files(stem: str, results: List[dict], summary: List[dict], meta: dict, plan: Plan, data_stats: dict) -> dict:
    """``<stem>.csv`` (the figures) and ``<stem>.json`` (everything, per-step records included);
    returns {"csv": path, "json": path}."""
    write_csv(csv_rows(results, summary), stem + ".csv", meta, CSV_COLUMNS)
    with open(stem + ".json", "x") as f:  # never over an earlier run's file
        json.dump(
            {"meta": meta, "plan": dataclasses.asdict(plan), "data": data_stats, "summary": summary, "runs": results},
            f,
            indent=1,
        )
    return {"csv": stem + ".csv", "json": stem + ".json"}
