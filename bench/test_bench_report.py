"""The bench's own machinery, without timing anything: the plans, the step counter, the base
contender, the targets and the figure (error bars, legends, the load warning), from small fake
results. ``python -m pytest bench -q -k report`` runs only these."""

import dataclasses
import itertools

import pytest
import torch

from . import cases, report
from .common import (
    MASK_STEP,
    PATCHED,
    PROJECTIONS,
    STEP_CONTENDERS_PATCHED,
    LlamaShape,
    Timing,
    contender_context,
    llama,
    make_contender,
)

KINDS = ("base", "ours", "peft_adalora", "peft_lora")


def test_quick_keeps_the_default_rounds_and_warmups_at_smaller_sizes():
    d, q = cases.DEFAULT, cases.QUICK
    assert (q.repeats, q.warmup, q.min_sample_s) == (d.repeats, d.warmup, d.min_sample_s)
    assert q.dtype_inner == d.dtype_inner
    assert len(q.step_sizes) <= len(d.step_sizes)
    assert max(s.shape.hidden for s in q.step_sizes) < max(s.shape.hidden for s in d.step_sizes)
    assert q.step_shape.hidden * q.step_shape.layers < d.step_shape.hidden * d.step_shape.layers


def test_default_sweep_covers_the_target_sizes_and_both_dropouts():
    hidden = {s.shape.hidden for s in cases.DEFAULT.step_sizes}
    assert {128, 256, 1024} <= hidden
    for s in cases.DEFAULT.step_sizes:
        assert set(s.dropouts) == {0.1, 0.0}
        assert s.shape.tokens == 512


def test_gpu_plan_times_bf16_layers_at_llama_shapes_and_runs_its_layer_rows():
    """The GPU plan (chosen on CUDA): LLaMA-7B projection shapes in bf16 (so the Triton kernels run,
    not the fp32 torch path); its one-layer rows, shrunk, run here on the CPU in bf16."""
    import dataclasses

    g = cases.GPU
    assert g.layer_dtype == torch.bfloat16 and g.layer_tokens == 8192
    assert (4096, 11008) in g.layer_shapes and set(g.dropouts) == {0.0, 0.1}
    assert g.compiled_shape is None and g.repeats >= 5
    small = dataclasses.replace(g, layer_tokens=16, layer_shapes=((32, 24),), repeats=1, warmup=1, min_sample_s=0.0)
    rows = cases.layer_cases(small, torch.device("cpu"), lambda: None)
    assert len(rows) == 4 and all(r["case"].endswith("bfloat16") for r in rows)
    assert all(r[k] > 0 for r in rows for k in ("ours", "peft_adalora", "peft_lora"))


@pytest.mark.parametrize("inner", [1, 2, 5, 10, 20])
def test_each_sample_holds_one_masking_step_per_ten(inner):
    """Wherever the warm-up leaves off, any ``inner`` consecutive steps hold max(1, inner // 10)
    masking steps (multiples of deltaT=10), and the steps increase."""
    steps = list(itertools.islice(cases._step_numbers(inner), 200))
    assert all(b > a for a, b in itertools.pairwise(steps))
    for i in range(len(steps) - inner):
        window = steps[i : i + inner]
        assert sum(s % 10 == 0 for s in window) == max(1, inner // 10), (i, window)
    if inner >= 10:
        assert steps[:10] == list(range(MASK_STEP - 9, MASK_STEP + 1))


def test_step_numbers_refuse_an_uneven_sample():
    with pytest.raises(ValueError):
        next(cases._step_numbers(15))


def test_base_contender_runs_backward_through_the_frozen_layers():
    shape = LlamaShape(hidden=32, layers=2, intermediate=64, heads=2, vocab=64, seq=8, batch=2)
    m, upd = make_contender("base", llama(shape, torch.device("cpu")), 4, 0.1, PROJECTIONS)
    assert upd is None and not any(p.requires_grad for p in m.parameters())
    seen = {}
    m.model.layers[0].register_forward_hook(
        lambda mod, inp, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))
    loss = m(input_ids=ids, labels=ids).loss
    seen["h"].retain_grad()
    loss.backward()
    assert seen["h"].grad is not None and seen["h"].grad.abs().sum() > 0  # reached the first layer's output
    assert all(p.grad is None for p in m.parameters())  # and computed no weight gradient


def _timing(samples: dict) -> Timing:
    return Timing(samples={k: list(v) for k, v in samples.items()})


def _step_row(hidden, p, variant, ms: dict, section="train step"):
    """A step-time row from per-round milliseconds (as cases._step_rows builds it)."""
    t = _timing({k: [x / 1e3 for x in v] for k, v in ms.items()})
    vals = {k: t.median(k) * 1e3 for k in ms}
    return cases._row(
        section, f"hidden={hidden} p={p}", "step time", "ms", vals, t, hidden=hidden, layers=8, p=p, variant=variant
    )


ROUNDS = {
    "base": [100.0, 104.0, 98.0, 101.0, 120.0],
    "ours": [110.0, 111.0, 109.0, 113.0, 140.0],
    "peft_adalora": [130.0, 131.0, 133.0, 129.0, 150.0],
    "peft_lora": [120.0, 119.0, 122.0, 121.0, 145.0],
}


def test_row_keeps_rounds_and_ratios_to_base():
    r = _step_row(256, 0.1, "fp32", ROUNDS)
    assert r["base"] == pytest.approx(101.0)
    assert r["ours_vs_base"] == pytest.approx(111.0 / 101.0)
    assert (r["ours_lo"], r["ours_hi"]) == (pytest.approx(109.0), pytest.approx(140.0))
    assert r["samples"]["peft_lora"] == pytest.approx(ROUNDS["peft_lora"])
    text = report.table([r])
    assert "ours/base" in text and "LoRA/base" in text and f"{111.0 / 101.0:.3f}" in text


def _share_row(hidden, value):
    t = _timing({"ours": [value / 100] * 3})
    return cases._row(
        "train step",
        f"hidden={hidden}",
        report.SHARE_METRIC,
        "%",
        {"ours": value},
        t,
        hidden=hidden,
        layers=8,
        p=0.1,
        variant="fp32",
    )


def test_targets_and_their_bounds():
    rows = [
        _step_row(256, 0.1, "fp32", ROUNDS),
        _step_row(256, 0.0, "fp32", ROUNDS),
        _step_row(1024, 0.1, "fp32", ROUNDS),
        _step_row(256, 0.1, "bf16 base", ROUNDS, section="train step (bf16 base)"),
        _step_row(256, 0.1, "autocast", ROUNDS, section="train step (autocast bf16)"),
        _step_row(256, 0.1, "compiled", ROUNDS, section="train step (compiled)"),
        _share_row(256, 1.5),
        _share_row(128, 3.0),  # printed in the table, no target at hidden 128
        cases._row(
            "orth_penalty", "224 layers (hidden=128)", "forward+backward", "ms", {"ours": 5.0, "peft_adalora": 30.0}
        ),
    ]
    ts = {t["target"]: t for t in report.targets(rows, [])}
    goals = {name: t["goal"] for name, t in ts.items() if "ours / base" in name}
    assert goals == {
        "step hidden 256 x8 p=0.1: ours / base time": "<= 1.20",
        "step hidden 256 x8 p=0: ours / base time": "<= 1.15",
        "step hidden 1024 x8 p=0.1: ours / base time": "<= 1.06",
        "step hidden 256 x8 p=0.1 bf16 base: ours / base time": "<= 1.50",
    }
    # ours no slower than PEFT LoRA in every step row: eager sizes, bf16 base, autocast, compiled
    assert sum(name.endswith("ours / PEFT LoRA time") for name in ts) == 6
    assert ts["step hidden 256 x8 p=0.1: ours / base time"]["met"]  # 111 / 101
    assert not ts["step hidden 1024 x8 p=0.1: ours / base time"]["met"]
    share = ts["step hidden 256 x8 p=0.1: (orth penalty + update_and_allocate) / step, %"]
    assert share["value"] == pytest.approx(1.5) and share["met"]
    assert sum("(orth penalty + update_and_allocate)" in name for name in ts) == 1
    assert not any("orth penalty fwd+bwd" in name for name in ts)  # the isolated penalty target is retired
    assert not any("PEFT patched" in name for name in ts)  # only rows that timed the patched contender


# PEFT AdaLoRA under af.patch_peft(): median 114 against ours 111
PATCHED_ROUNDS = {**ROUNDS, PATCHED: [112.0, 118.0, 111.0, 114.0, 139.0]}


def test_patched_contender_against_ours_in_the_row_table_csv_and_targets(tmp_path):
    import csv

    r = _step_row(256, 0.1, "fp32", PATCHED_ROUNDS)
    pairs = [p / o for p, o in zip(PATCHED_ROUNDS[PATCHED], ROUNDS["ours"])]
    assert r[PATCHED] == pytest.approx(114.0)
    assert r["peft_patched_vs_ours"] == pytest.approx(114.0 / 111.0)
    assert (r["peft_patched_vs_ours_lo"], r["peft_patched_vs_ours_hi"]) == (
        pytest.approx(min(pairs)),
        pytest.approx(max(pairs)),
    )
    assert r["peft_patched_vs_base"] == pytest.approx(114.0 / 101.0)
    assert (r["peft_patched_lo"], r["peft_patched_hi"]) == (pytest.approx(111.0), pytest.approx(139.0))
    # the throughput row reads the same (our tok/s over its tok/s = its time over ours)
    t = _timing({k: [x / 1e3 for x in v] for k, v in PATCHED_ROUNDS.items()})
    tp = cases._row("train step", "c", "throughput", "tok/s", {k: 512 / t.median(k) for k in t.samples}, t, True)
    assert tp["peft_patched_vs_ours"] == pytest.approx(114.0 / 111.0)
    assert tp["peft_patched_vs_ours_lo"] == pytest.approx(min(pairs))
    text = report.table([r])
    assert "PEFT patched" in text and "patched/ours" in text
    assert f"{114.0 / 111.0:.3f} [{min(pairs):.2f}-{max(pairs):.2f}]" in text
    path = str(tmp_path / "x.csv")
    report.write_csv([r], path, {"plan": "fake"})
    with open(path) as f:
        row = next(csv.DictReader(line for line in f if not line.startswith("#")))
    assert float(row["peft_patched"]) == pytest.approx(114.0)
    assert float(row["peft_patched_vs_ours"]) == pytest.approx(114.0 / 111.0)
    slow = _step_row(1024, 0.0, "fp32", {**ROUNDS, PATCHED: [x * 1.2 for x in ROUNDS["ours"]]})
    ts = {t["target"]: t for t in report.targets([r, slow], [])}
    fast = ts["step hidden 256 x8 p=0.1: PEFT patched / ours time"]
    assert fast["goal"] == "<= 1.05" and fast["met"] and fast["value"] == pytest.approx(114.0 / 111.0)
    assert fast["note"] == f"rounds {min(pairs):.3f}-{max(pairs):.3f}"
    late = ts["step hidden 1024 x8 p=0: PEFT patched / ours time"]
    assert late["value"] == pytest.approx(1.2) and not late["met"]


def test_contender_context_keeps_peft_adalora_peft_own_code():
    """The patched contender runs with PEFT patched; PEFT AdaLoRA (and the others) with the patching
    suspended: PEFT's original methods, and a PEFT model built there is not accelerated."""
    from peft.tuners.adalora import SVDLinear

    import adalora_fast as af
    from adalora_fast import peft_patch

    original = SVDLinear.__dict__["forward"]
    shape = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, vocab=64, seq=8, batch=2)
    cpu = torch.device("cpu")
    try:
        with contender_context(PATCHED):
            patched, _ = make_contender(PATCHED, llama(shape, cpu), 4, 0.1, PROJECTIONS)
        assert peft_patch.state_of(patched) is not None and SVDLinear.__dict__["forward"] is not original
        with contender_context("peft_adalora"):
            assert SVDLinear.__dict__["forward"] is original and not peft_patch.is_patched()
            plain, _ = make_contender("peft_adalora", llama(shape, cpu), 4, 0.1, PROJECTIONS)
        assert peft_patch.state_of(plain) is None and peft_patch.state_of(patched) is not None
        with pytest.raises(RuntimeError, match="peft_adalora built accelerated"):
            make_contender("peft_adalora", llama(shape, cpu), 4, 0.1, PROJECTIONS)  # outside its context
    finally:
        af.unpatch_peft()
    assert SVDLinear.__dict__["forward"] is original


def test_step_rows_time_the_patched_contender_beside_peft_own_and_unpatch(monkeypatch):
    """A whole step alternation with the patched contender, shrunk: its figures and ratio in the rows,
    PEFT AdaLoRA's layers never reaching the patched forward (not even its per-object dispatch), our
    op running the patched model's layers, and PEFT unpatched afterwards."""
    from peft.tuners.adalora import SVDLinear

    from adalora_fast import peft_patch

    calls = {"accelerated": 0, "peft's own": 0}
    dispatch = peft_patch._svd_linear_forward

    def spy(self, x, *args, **kwargs):
        calls["accelerated" if self.__dict__.get(peft_patch._ATTR) else "peft's own"] += 1
        return dispatch(self, x, *args, **kwargs)

    monkeypatch.setattr(peft_patch, "_svd_linear_forward", spy)  # what patch_peft() installs
    original = SVDLinear.__dict__["forward"]
    shape = LlamaShape(hidden=32, layers=1, intermediate=64, heads=2, vocab=64, seq=8, batch=2)
    plan = dataclasses.replace(cases.QUICK, repeats=2, warmup=1)
    rows = cases._step_rows(
        "train step", shape, plan, torch.device("cpu"), 0.1, 2, lambda: None, kinds=STEP_CONTENDERS_PATCHED
    )
    step = next(r for r in rows if r["metric"] == "step time")
    assert step[PATCHED] > 0 and len(step["samples"][PATCHED]) == 2
    assert step["peft_patched_vs_ours"] == pytest.approx(step[PATCHED] / step["ours"])
    assert step["peft_patched_vs_ours_lo"] <= step["peft_patched_vs_ours_hi"]
    mem = next(r for r in rows if r["section"] == "memory")
    assert mem[PATCHED] == pytest.approx(mem["ours"], rel=0.05)  # our op saves what ours saves
    # warm-up + 2 rounds x 2 steps + the memory pass, 7 layers each: all through our op
    assert calls == {"accelerated": 7 * (1 + 2 * 2 + 1), "peft's own": 0}
    assert not peft_patch.is_patched() and SVDLinear.__dict__["forward"] is original


def test_busy_warning_from_the_load_or_a_wild_round():
    calm = _step_row(256, 0.1, "fp32", ROUNDS)  # spread (140 - 109) / 111 < 1
    assert report.busy_warning([calm], 0.5, 1.0, 2) is None
    assert "load average 3.0 at start" in report.busy_warning([calm], 3.0, 1.0, 2)
    wild = _step_row(256, 0.0, "fp32", {**ROUNDS, "peft_lora": [120.0, 119.0, 900.0, 121.0, 145.0]})
    assert "spread up to" in report.busy_warning([calm, wild], 0.5, 1.0, 2)
    assert report.busy_warning([calm, wild], None, None, 2) is not None  # no load average (not Linux)


def _curve():
    pts = []
    for n in (7, 56, 224):
        p = {"layers": n}
        for who, scale in (("ours", 1.0), ("peft", 20.0)):
            for key in ("mask", "nomask", "mask_cold", "nomask_cold", "orth"):
                mid = 0.01 * n * scale
                p[f"{who}_{key}_ms"], p[f"{who}_{key}_lo_ms"], p[f"{who}_{key}_hi_ms"] = mid, 0.9 * mid, 1.3 * mid
        pts.append(p)
    return pts


@pytest.fixture(scope="module")
def fig():
    rows = [
        _step_row(128, 0.1, "fp32", PATCHED_ROUNDS),  # the patched contender in one row only: gaps elsewhere
        _step_row(256, 0.0, "fp32", ROUNDS),
        _step_row(256, 0.1, "bf16 base", ROUNDS, section="train step (bf16 base)"),
    ]
    f = report.figure(rows, _curve(), "fake run", warning="WARNING: busy")
    f.canvas.draw()
    yield f
    import matplotlib.pyplot as plt

    plt.close(f)


def test_figure_draws_the_load_warning(fig):
    assert any(t.get_text() == "WARNING: busy" for t in fig.texts)


def test_step_ratio_error_bars_span_the_paired_rounds(fig):
    """The ratio panel's error bar for ours spans the lowest to the highest of (ours / base) taken
    round by round (the contenders alternate, so one round's figures are a pair)."""
    ax = fig.axes[3]
    bars = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    ours = next(c for c in bars if c.get_label() == "adalora_fast / base")
    segs = ours.errorbar.lines[2][0].get_segments()
    ratios = [a / b for a, b in zip(ROUNDS["ours"], ROUNDS["base"])]
    assert len(segs) == 3
    for seg in segs:
        assert seg[0][1] == pytest.approx(min(ratios)) and seg[1][1] == pytest.approx(max(ratios))


def test_curves_have_error_bars_and_peft_in_training_order(fig):
    labels = [h.get_label() for h in fig.axes[0].containers]
    assert "PEFT AdaLoRA, masking, in training order" in labels
    assert "PEFT AdaLoRA, non-masking, in training order" in labels
    c = next(h for h in fig.axes[0].containers if h.get_label() == "adalora_fast, masking, back to back")
    segs = c.lines[2][0].get_segments()
    assert [s[0][1] for s in segs] == pytest.approx([0.9 * 0.01 * n for n in (7, 56, 224)])
    assert [s[1][1] for s in segs] == pytest.approx([1.3 * 0.01 * n for n in (7, 56, 224)])


def test_no_legend_over_data(fig):
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        a, b = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
        overlap_w = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_h = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_w <= 0 or overlap_h <= 0, ax.get_title()


def test_plot_writes_a_png(tmp_path):
    rows = [_step_row(128, 0.1, "fp32", ROUNDS)]
    path = report.plot(rows, [], str(tmp_path / "x.png"), "fake")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _colour(artist):
    from matplotlib.colors import to_rgba

    get = getattr(artist, "get_color", None) or artist.get_facecolor
    return to_rgba(get())


def test_one_colour_per_contender_in_every_picture(fig):
    """PEFT AdaLoRA (and each other contender) has one colour: in the step bars, in every
    update_and_allocate curve (back to back and in training order), and in the fine-tune's loss curves."""
    from matplotlib.colors import to_rgba

    from .finetune.plan import QUICK
    from .finetune.plots import loss_figure

    for c in fig.axes[0].containers:  # the update_and_allocate curves: "<contender>, <what was timed>"
        kind = next(k for k, name in report.LABELS.items() if c.get_label().startswith(name + ","))
        assert _colour(c.lines[0]) == to_rgba(report.COLORS[kind]), c.get_label()
    for c in fig.axes[3].containers:  # the ratio bars: "<contender> / base"
        if getattr(c, "patches", None):
            kind = next(k for k, name in report.LABELS.items() if c.get_label() == f"{name} / base")
            assert _colour(c.patches[0]) == to_rgba(report.COLORS[kind])
    results = [{"method": m, "seed": 0, "ce": [1.1, 1.0, 0.9, 0.8]} for m in ("ours", "peft_adalora", "peft_lora")]
    f = loss_figure(results, QUICK, "fake fine-tune")
    try:
        named = [line for line in f.axes[0].get_lines() if not line.get_label().startswith("_")]
        assert len(named) == 3
        for line, m in zip(named, ("ours", "peft_adalora", "peft_lora")):
            assert line.get_label().startswith(report.LABELS[m] + " (")
            assert _colour(line) == to_rgba(report.COLORS[m])
    finally:
        import matplotlib.pyplot as plt

        plt.close(f)


def test_finetune_csv_goes_through_the_report_writer(tmp_path):
    """The fine-tune's CSV: the report's ``# key: value`` lines, one row per run, then mean / std /
    min / max per method; the per-step lists stay out of it (they go to the JSON)."""
    import csv
    import json

    from .finetune.plan import QUICK
    from .finetune.results import CSV_COLUMNS, PER_SEED, summarise, write_files

    results = []
    for m, base in (("ours", 0.8), ("peft_lora", 0.7)):
        for seed in (0, 1):
            r = {k: base + 0.01 * seed for k in PER_SEED}
            r.update(
                method=m,
                seed=seed,
                step_s=[0.1, 0.2],
                ce=[1.0, 0.9],
                trainable_params=10,
                final_total_rank=96,
                final_adapter_params=1000,
            )
            results.append(r)
    summary = summarise(results)
    stem = str(tmp_path / "run")
    files = write_files(stem, results, summary, {"plan": "fake", "device": "cpu"}, QUICK, {"rows": 1})
    with open(files["csv"]) as f:
        lines = f.read().splitlines()
    assert lines[:2] == ["# plan: fake", "# device: cpu"]
    rows = list(csv.DictReader(lines[2:]))
    assert list(rows[0]) == CSV_COLUMNS
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("ours", "0"),
        ("ours", "1"),
        ("peft_lora", "0"),
        ("peft_lora", "1"),
        *((m, s) for m in ("ours", "peft_lora") for s in ("mean", "std", "min", "max")),
    ]
    mean = next(r for r in rows if r["method"] == "ours" and r["seed"] == "mean")
    assert float(mean["accuracy"]) == pytest.approx(0.805) and float(mean["final_total_rank"]) == 96
    assert next(r for r in rows if r["seed"] == "std")["final_total_rank"] == ""
    with open(files["json"]) as f:
        assert json.load(f)["runs"][0]["ce"] == [1.0, 0.9]
    with pytest.raises(FileExistsError):  # never over an earlier run's files
        write_files(stem, results, summary, {}, QUICK, {})
    assert report.new_stem(str(tmp_path), "run", (".csv",)) == stem + "-2"
