"""The GPU session's kernel script, ``bench/gpu_check.py``, run without a GPU: its timed launches (the
four layer kernels unsplit and split, the ``--sweep``'s raw kernel launches) in Triton's interpreter
on CPU tensors, with a wall-clock timer in place of CUDA events, at tiny shapes.

Every launch must run (a launch with a stale argument list raises in the interpreter as it would
on the GPU, where ``gpu_check`` catches it and the row comes out empty), and the split forms must
give what the unsplit ones give. The table's split rows and the split predictions are checked
against ``bench/cost_on_paper.py`` with made-up SASS counts (no compile). On a GPU machine
(conftest's ``TRITON_DEVICE`` is CUDA) the same launches run compiled.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE

from adalora_fast.kernels import adapter_linear as ka
from bench import cost_on_paper as cop
from bench import gpu_check as gc
from tolerances import assert_close

DEV = TRITON_DEVICE
# 70 tokens (2 row tiles, the second partial); k = 1600: 25 tiles, the plan splits the shrink 3 ways
# (chunks of 9, 9, 7 tiles); d = 1088: 17 tiles, grad_rank 2 ways (9 + 8): different factors, so a
# launch given the other kernel's workspace fails
N, K, D = 70, 1600, 1088


def _once(fn, repeats):
    """A timer that runs ``fn`` ``repeats`` times (no warm-up) and says how many it ran."""
    for _ in range(repeats):
        fn()
    return float(repeats)


@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, torch.float32)],
    ids=["bf16", "fp32", "bf16-base-fp32-adapters"],  # the last: gpu_check --adapters fp32 (bf16x3)
)
def test_measure_runs_every_launch_and_split_equals_unsplit(dtype, adapter_dtype, monkeypatch):
    assert ka.split_plan(N, K, ka.BLOCK_K, ka.split_slots(DEV)) == (3, 9 * 64)
    assert ka.split_plan(N, D, ka.GRAD_BLOCK_D, ka.split_slots(DEV)) == (2, 9 * 64)
    precs, real = set(), ka._launch.launch
    monkeypatch.setattr(
        ka._launch, "launch", lambda k, g, *a, **kw: (precs.add(kw.get("DOT_PREC")), real(k, g, *a, **kw))
    )
    m = gc.measure(N, K, D, 1, timer=_once, device=DEV, dtype=dtype, adapter_dtype=adapter_dtype)
    if adapter_dtype is not None:
        assert precs == {"bf16x3"}, precs  # the binaries PEFT's default runs at torch's full-fp32 default
    assert m["errors"] == {}
    assert m["S"] == (3, 2)
    assert m["unsplit"] == dict.fromkeys(gc.KERNELS, 1.0)
    assert m["split"] == dict.fromkeys(gc.KERNELS, 1.0)
    assert m["wrong"] == []
    pairs = m["pairs"]
    assert set(pairs) == {"t", "out", "t written by the expand-add", "ge", "dB", "dE", "dA", "dx"}
    for what, (unsplit, split) in pairs.items():
        # fp32 results (t, ge, dB, dE, dA: the partials' summation order is all that differs) at the
        # fp32 tolerance; out and dx are in the operands' dtype
        assert_close(split, unsplit, what=what)
    # the check compared real results, not zeros
    o = gc._operands(N, K, D, DEV, dtype, adapter_dtype=adapter_dtype)
    assert o.A.dtype == o.E.dtype == o.B.dtype == (adapter_dtype or dtype) and o.x.dtype == dtype
    t = o.x.float() @ o.A.float().t()  # no dropout term here: only the magnitude matters
    assert pairs["t"][0].abs().max() > 0.1 * t.abs().max()
    assert pairs["ge"][0].abs().max() > 0 and pairs["dA"][0].abs().max() > 0


def test_measure_at_a_shape_the_plan_keeps_unsplit():
    """Narrow widths (fewer than 16 tiles): S = 1 each way, only the unsplit forms are timed, no
    split check; the table says so instead of a split row."""
    m = gc.measure(N, 320, 200, 1, timer=_once, device=DEV)
    assert m["S"] == (1, 1) and m["errors"] == {} and m["pairs"] == {} and m["split"] == {}
    assert m["unsplit"] == dict.fromkeys(gc.KERNELS, 1.0)
    # the device's plan may keep S = 1 where an H100's splits: the rows say so, nothing measured
    fake = {kn: (1.0, 2.0, 3.0, 1.0) for kn in gc.KERNELS}
    split_fake = {kn: (4, 1.0, 2.0, 3.0, 1.0, 2.5) for kn in gc.KERNELS}
    lines = gc.report(4096, 4096, fake, split_fake, dict(m, S=(1, 2), split={"_grad_rank_kernel": 2.0}))
    text = "\n".join(lines)
    assert "shrink split       – the plan keeps S = 1 (unsplit)" in text
    assert "expand_add split   – the plan keeps S = 1 (unsplit)" in text
    assert "(predicted for S = 4, an H100's plan)" in text  # grad_rank split 2 ways
    assert "dA_dx split" in text and "FAILED" not in text


def test_a_failing_split_launch_is_reported_and_the_others_still_timed(monkeypatch):
    real = ka.grad_rank

    def broken(g, t, E, B, rk, scaling, ge, dB, dE):
        if ge.dim() == 3:
            raise RuntimeError("stale arguments")
        return real(g, t, E, B, rk, scaling, ge, dB, dE)

    monkeypatch.setattr(ka, "grad_rank", broken)
    m = gc.measure(N, 320, D, 1, timer=_once, device=DEV)
    assert m["S"] == (1, 2)
    assert set(m["errors"]) == {"split check", "grad_rank split"}
    assert m["unsplit"] == dict.fromkeys(gc.KERNELS, 1.0)
    assert set(m["split"]) == {"_dA_dx_kernel"}
    fake = {kn: (1.0, 2.0, 3.0, 1.0) for kn in gc.KERNELS}
    split_fake = {kn: (2, 1.0, 2.0, 3.0, 1.0, 0.0) for kn in gc.KERNELS}
    text = "\n".join(gc.report(320, D, fake, split_fake, m))
    assert "grad_rank split: FAILED: RuntimeError: stale arguments" in text
    assert "measured: a kernel is missing" in text  # no split sum with a kernel missing


def test_mismatches_flags_a_split_result_that_differs():
    a = torch.ones(4, 3)
    assert gc.mismatches({"t": (a, a + 1e-6)}) == []
    assert gc.mismatches({"t": (a, a * 1.01)}) == ["t (0.01)"]
    h = torch.ones(4, 3, dtype=torch.bfloat16)
    assert gc.mismatches({"out": (h, h * 1.0078125)}) == []  # one bf16 rounding step
    assert gc.mismatches({"out": (h, h * 1.25)}) == ["out (0.25)"]


def test_sweep_configs_start_with_what_the_launchers_ship():
    for kind in gc.SWEEP_KINDS:
        shipped = next(gc._configs(kind))
        kw = ka.launch_kwargs(kind, torch.bfloat16, 12, torch.bfloat16)
        for key, value in shipped.items():
            assert kw.get(key, 3 if key == "num_stages" else None) == value, (kind, key)


def test_sweep_launches_run_and_agree_with_the_shipped_config():
    """The sweep's raw launches (the kernels called directly with the unsplit argument lists): the first
    configs of each kernel, both dropout rates, all run, and every shrink / grad_rank config gives
    the shipped config's t / ge."""
    rows = gc.sweep(N, 200, 330, 1, timer=_once, device=DEV, limit=4, verbose=False)
    assert [(r[0], r[2]) for r in rows] == [
        (kind, p) for p in (0.1, 0.0) for kind in gc.SWEEP_KINDS if not (kind == "expand_add" and p) for _ in range(4)
    ]
    assert {(r[1]["BLOCK_N"], r[1]["BLOCK_K"]) for r in rows if r[0] == "shrink"} == {(64, 64), (64, 128)}
    bad = [r for r in rows if r[3] is None or r[4]]
    assert bad == []


def test_sweep_launch_matches_the_launchers():
    """One raw launch per kernel at the shipped config against the single-kernel launcher's result."""
    o = gc._operands(N, 200, 330, DEV, torch.float32)
    t = torch.empty(N, o.r, device=DEV)
    cfgs = {kind: next(gc._configs(kind)) for kind in gc.SWEEP_KINDS}
    gc.sweep_launch("shrink", o, cfgs["shrink"], 0.1, t)()
    assert_close(t, ka.shrink(o.x, o.A, 0.1, o.seed), what="t")
    out0 = o.out.clone()
    gc.sweep_launch("expand_add", o, cfgs["expand_add"], 0.0, t)()
    out1 = out0.clone()
    ka.expand_add(out1, t, o.E, o.B, o.rk, 2.0)
    assert_close(o.out, out1, what="out")
    ge = torch.empty_like(o.ge)
    dB, dE = torch.zeros_like(o.dB), torch.zeros_like(o.dE)
    gc.sweep_launch("grad_rank", o, cfgs["grad_rank"], 0.1, t)()
    ka.grad_rank(o.g, t, o.E, o.B, o.rk, 2.0, ge, dB, dE)
    assert_close(o.ge, ge, what="ge")
    assert_close(o.dB, dB, what="dB")
    assert_close(o.dE, dE, what="dE")
    dx0, dA = o.dx.clone(), torch.zeros_like(o.dA)
    gc.sweep_launch("dA_dx", o, cfgs["dA_dx"], 0.1, t)()
    ka.dA_dx(o.x, ge, o.A, dx0, dA, 0.1, o.seed)
    assert_close(o.dA, dA, what="dA")
    assert_close(o.dx, dx0, what="dx")


def _fake_records():
    """compile_check-like records: made-up instruction counts and resources, per kernel."""
    return {
        kn: {"insns": 900 + 100 * i, "loop_insns": (500, 0, 220, 0)[i], "registers": 96 + 32 * i}
        | {"static_shared": 1024, "dyn_shared": 50000 - 10000 * i}
        for i, kn in enumerate(gc.KERNELS)
    }


def test_split_predictions_are_cost_on_papers_split_table():
    counts, split_counts = _fake_records(), _fake_records()
    table = cop.split_table(counts, split_counts)[0].splitlines()
    for k, d in cop.SHAPES:
        pred = gc.split_predictions(split_counts, k, d)
        for kn in gc.KERNELS:
            (row,) = [r for r in table if r.startswith(f"| {k}→{d} | {kn} |")]
            cells = [c.strip() for c in row.strip("|").split("|")]
            s, mb, bw90, bw70, iss, lat = pred[kn]
            assert s == cop.split_factors(k, d)[gc.SPLIT_BY[kn]]
            assert cells[6:11] == [
                f"{mb:.1f}",
                f"{bw90:.1f}",
                f"{bw70:.1f}",
                f"{iss:.1f}",
                f"{lat:.1f}" if lat else "–",
            ]
            lo, hi = max(bw90, iss, lat), max(bw70, iss, lat)
            assert cells[11] == f"{lo:.1f}–{hi:.1f}"


@pytest.mark.parametrize("adapters", ["bf16", "fp32"])
def test_main_without_a_gpu_prints_both_forms_and_exits_2(monkeypatch, capsys, adapters):
    configs = []
    monkeypatch.setattr(
        gc,
        "sass_counts",
        lambda path=None, config=None: (configs.append(config), (_fake_records(), _fake_records()))[1],
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--adapters", adapters]) == 2
    out, err = capsys.readouterr()
    assert "predictions only" in err
    # the SASS of the binaries the launchers pick: fp32 adapters on a bf16 base at torch's default: bf16x3
    assert configs == [cop.SASS_CONFIG if adapters == "bf16" else "bfloat16/float32,bf16x3,R16"]
    for k, d in cop.SHAPES:
        for kn in gc.KERNELS:
            name = kn[1:-7]
            assert f"{k}→{d} {name:<16}   1 " in out
            (row,) = [r for r in out.splitlines() if r.startswith(f"{f'{k}→{d}':>12} {name + ' split':<16}   4 ")]
            # the split shrink / grad_rank's latency bound is scaled from the bf16 kernels' H100 times
            latency = row.split()[8]
            assert (latency == "–") == (adapters == "fp32" or kn not in cop.SPLIT_KERNELS), row
