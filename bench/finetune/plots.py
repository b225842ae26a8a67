"""The fine-tune's three pictures: the training loss curves, the final rank of every adapted module,
and the total rank over the steps against the budget schedule. Each contender has the name and the
colour it has in the bench's own picture (``report.LABELS``, ``report.COLORS``)."""

from __future__ import annotations

import statistics
from typing import List, Sequence

from ..report import COLORS, LABELS
from .plan import ADALORA, KINDS, METHODS, Plan

STEP_AXIS = "optimizer step (0-based, as update_and_allocate counts)"


def _smooth(xs: Sequence[float], w: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _seeds_text(rs: List[dict]) -> str:
    return f"mean of {len(rs)} seeds" if len(rs) > 1 else f"seed {rs[0]['seed']}"


def _steps_axes(ax, plan: Plan, ylabel: str, title: str) -> None:
    """An x axis over the run's steps with AdaLoRA's warm-up and final phase shaded and the three
    phases named along the top."""
    end = plan.total_step - plan.tfinal
    ax.axvspan(0, plan.tinit, color="0.92", zorder=0)
    ax.axvspan(end, plan.total_step, color="0.92", zorder=0)
    for x0, x1, name in (
        (0, plan.tinit, "AdaLoRA warm-up"),
        (plan.tinit, end, "budget reduction"),
        (end, plan.total_step, "final (mask fixed)"),
    ):
        ax.text(
            (x0 + x1) / 2,
            0.985,
            name,
            ha="center",
            va="top",
            fontsize=8,
            color="0.35",
            transform=ax.get_xaxis_transform(),
        )
    ax.set_xlim(0, plan.total_step)
    ax.set_xlabel(STEP_AXIS)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)


def loss_figure(results: List[dict], plan: Plan, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        n = min(len(r["ce"]) for r in rs)
        mean = [statistics.fmean(r["ce"][i] for r in rs) for i in range(n)]
        steps = list(range(n))
        ax.plot(steps, mean, color=COLORS[method], alpha=0.18, lw=0.8)
        ax.plot(
            steps,
            _smooth(mean, plan.smooth),
            color=COLORS[method],
            lw=2,
            label=f"{LABELS[method]} ({_seeds_text(rs)}, {plan.smooth}-step moving average)",
        )
    _steps_axes(ax, plan, "training cross-entropy (nats, without the orthogonal penalty)", title)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # room for the phase names
    ax.legend(fontsize=8, loc="lower left")
    return fig


def ranks_figure(results: List[dict], plan: Plan, title: str):
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in ADALORA if any(r["method"] == m for r in results)]
    layers = 1 + max(int(k.split(":")[0]) for r in results if "final_ranks" in r for k in r["final_ranks"])
    kinds = [k for k, _ in KINDS]
    fig, axes = plt.subplots(
        1, len(methods), figsize=(5.2 * len(methods) + 1.2, 4.4), constrained_layout=True, squeeze=False
    )
    im = None
    for ax, method in zip(axes[0], methods):
        rs = [r for r in results if r["method"] == method]
        grid = np.zeros((len(kinds), layers))
        for r in rs:
            for key, v in r["final_ranks"].items():
                layer, kind = key.split(":", 1)
                grid[kinds.index(kind), int(layer)] += v / len(rs)
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=plan.init_r, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            txt = f"{v:.0f}" if len(rs) == 1 or abs(v - round(v)) < 1e-9 else f"{v:.1f}"
            ax.text(
                j, i, txt, ha="center", va="center", fontsize=8, color="white" if v < 0.6 * plan.init_r else "black"
            )
        ax.set_xticks(range(layers))
        ax.set_xticklabels([str(i) for i in range(layers)])
        ax.set_yticks(range(len(kinds)))
        ax.set_yticklabels(kinds)
        ax.set_xlabel("layer")
        # the contender's colour on its panel's title: the heatmap's own colours are ranks
        ax.set_title(
            f"{LABELS[method]} ({_seeds_text(rs)})\ntotal rank {statistics.fmean(r['final_total_rank'] for r in rs):.0f}",
            fontsize=10,
            color=COLORS[method],
        )
    axes[0][0].set_ylabel("adapted module")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"final rank (of init_r={plan.init_r})", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return fig


def budget_figure(results: List[dict], plan: Plan, title: str):
    import matplotlib.pyplot as plt

    from adalora_fast import AdaLoraConfig, budget_schedule

    rs = [r for r in results if r["method"] in ADALORA]
    if not rs:
        return None
    init_bgt, target_bgt = rs[0]["init_bgt"], rs[0]["target_bgt"]
    cfg = AdaLoraConfig(**plan.adalora_kwargs())
    steps = list(range(plan.total_step))
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    ax.plot(
        steps,
        [budget_schedule(s, cfg, init_bgt, target_bgt)[0] for s in steps],
        color="0.2",
        lw=1.5,
        label="cubic budget schedule (adalora_fast.budget_schedule)",
    )
    markers = {"ours": "o", "peft_adalora": "x"}
    for method in ADALORA:
        for i, r in enumerate(x for x in rs if x["method"] == method):
            xs, ys = zip(*r["total_rank"]) if r["total_rank"] else ((), ())
            ax.plot(
                xs,
                ys,
                ls="none",
                marker=markers[method],
                ms=6 if method == "ours" else 7,
                mfc="none",
                color=COLORS[method],
                alpha=0.9,
                label=(
                    f"{LABELS[method]}: total rank kept by its mask after update_and_allocate, every "
                    f"{plan.deltaT} steps, {_seeds_text([x for x in rs if x['method'] == method]).replace('mean of ', '')}"
                )
                if i == 0
                else None,
            )
    _steps_axes(ax, plan, f"total rank, summed over {len(rs[0]['final_ranks'])} modules", title)
    span = init_bgt - target_bgt
    ax.set_ylim(target_bgt - 0.25 * span, init_bgt + 0.2 * span)
    ax.legend(fontsize=8, loc="lower left")
    return fig


# (file suffix, figure, the methods of which at least one must have run)
FIGURES = (("loss", loss_figure, METHODS), ("ranks", ranks_figure, ADALORA), ("budget", budget_figure, ADALORA))


def write_plots(stem: str, results: List[dict], plan: Plan, title: str, methods: Sequence[str]):
    """``<stem>-loss.png``, ``-ranks.png``, ``-budget.png`` (those the methods run can draw). Returns
    ({suffix: path}, [a line per figure not written]): a plot failure must not lose the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, failed = {}, []
    for key, make, needs in FIGURES:
        if not any(m in methods for m in needs):
            continue
        try:
            fig = make(results, plan, title)
            if fig is None:
                continue
            fig.savefig(f"{stem}-{key}.png", dpi=130)
            plt.close(fig)
            files[key] = f"{stem}-{key}.png"
        except Exception as exc:
            failed.append(f"({key} plot not written: {exc!r})")
    return files, failed
