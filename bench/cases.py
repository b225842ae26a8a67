"""The four comparisons: one adapted layer, update_and_allocate (+ orthogonal penalty) against the
number of adapted layers, a whole training step, and memory. Each returns rows for the table.

A row: ``section, case, metric, unit, ours, peft_adalora, peft_lora, x_adalora, x_lora, spread``.
``x_*`` is how many times better adalora_fast is than that contender: PEFT time / our time for
times, our tokens/s / PEFT tokens/s for throughput, PEFT bytes / our bytes for memory (> 1: ours
is better). ``spread`` is the largest (max - min) / median over the rounds among the contenders.
"""

from __future__ import annotations

import gc
import time
import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .common import (
    MASK_STEP,
    NOMASK_STEP,
    PROJECTIONS,
    LlamaShape,
    Timing,
    adapter_params,
    alternate,
    cache_flusher,
    layer_fwd_bwd,
    llama,
    make_contender,
    projection_names,
    repeatable,
    saved_bytes_counter,
)


@dataclass
class Plan:
    """Sizes of one run (the default, or ``--quick``)."""

    name: str
    layer_tokens: int
    layer_shapes: tuple  # (k, d) pairs
    dropouts: tuple
    r: int
    alloc_counts: tuple
    alloc_shape: LlamaShape  # hidden / intermediate of the allocator models (layers set per count)
    step_shape: LlamaShape
    step_dropouts: tuple
    repeats: int
    warmup: int
    min_sample_s: float
    step_inner: int  # steps per timed sample (a multiple of deltaT=10 gives one mask per sample)
    orth_max_layers: int = 224  # PEFT's penalty loop takes seconds per call beyond this
    compiled: bool = True  # also time the three under torch.compile (inductor); compile time apart


DEFAULT = Plan(
    name="default",
    layer_tokens=1024,
    layer_shapes=((512, 512), (512, 1376), (1376, 512)),
    dropouts=(0.0, 0.1),
    r=12,
    alloc_counts=(7, 56, 224, 1024),
    alloc_shape=LlamaShape(hidden=128, layers=0, intermediate=344, heads=2),
    step_shape=LlamaShape(hidden=256, layers=4, intermediate=688, heads=4, vocab=4096, seq=128, batch=4),
    step_dropouts=(0.1, 0.0),
    repeats=7,
    warmup=2,
    min_sample_s=0.05,
    step_inner=10,
)

QUICK = Plan(
    name="quick",
    layer_tokens=256,
    layer_shapes=((256, 256), (256, 688)),
    dropouts=(0.0, 0.1),
    r=12,
    alloc_counts=(7, 56, 224),
    alloc_shape=LlamaShape(hidden=128, layers=0, intermediate=344, heads=2),
    step_shape=LlamaShape(hidden=128, layers=2, intermediate=344, heads=2, vocab=1024, seq=64, batch=2),
    step_dropouts=(0.1,),
    repeats=5,
    warmup=1,
    min_sample_s=0.01,
    step_inner=10,
)


def _row(section, case, metric, unit, vals: dict, timing: Optional[Timing] = None, higher_is_better=False):
    row = {"section": section, "case": case, "metric": metric, "unit": unit}
    ours = vals.get("ours")
    for k in ("ours", "peft_adalora", "peft_lora"):
        row[k] = vals.get(k)
    for k, col in (("peft_adalora", "x_adalora"), ("peft_lora", "x_lora")):
        v = vals.get(k)
        if v is None or ours is None or ours == 0 or v == 0:
            row[col] = None
        else:
            row[col] = ours / v if higher_is_better else v / ours
    row["spread"] = max(timing.spread(n) for n in timing.samples) if timing is not None else None
    # best round per contender, in the row's unit (CSV/JSON only): on a shared, busy machine the
    # minimum is the better estimate of the uncontended figure; the table shows medians
    for k in ("ours", "peft_adalora", "peft_lora"):
        best = None
        if timing is not None and k in timing.samples and vals.get(k) is not None:
            med, low = timing.median(k), min(timing.samples[k])
            if med > 0 and low > 0:
                best = vals[k] * med / low if higher_is_better else vals[k] * low / med
        row[f"{k}_best"] = best
    return row


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ 1. one layer
class _Holder(nn.Module):
    def __init__(self, k, d):
        super().__init__()
        self.proj = nn.Linear(k, d, bias=False)


def _one_layer(kind, k, d, r, p, device, seed=0):
    torch.manual_seed(seed)
    holder = _Holder(k, d).to(device)
    make_contender(kind, holder, r, p, ["proj"], causal_lm=False)
    layer = holder.proj  # both libraries replace the attribute in place
    layer.train()
    return layer


def layer_cases(plan: Plan, device, tick) -> list:
    rows = []
    N = plan.layer_tokens
    for k, d in plan.layer_shapes:
        for p in plan.dropouts:
            layers = {kind: _one_layer(kind, k, d, plan.r, p, device) for kind in ("ours", "peft_adalora", "peft_lora")}
            torch.manual_seed(1)
            x = torch.randn(N, k, device=device, requires_grad=True)
            g = torch.randn(N, d, device=device)
            case = f"N={N} k={k} d={d} r={plan.r} p={p}"

            def fwd(layer):
                return lambda: layer(x)

            def fwd_bwd(layer):
                return layer_fwd_bwd(layer, x, g)

            for metric, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
                t = alternate({n: make(m) for n, m in layers.items()}, device, plan.repeats, plan.warmup, plan.min_sample_s)
                rows.append(_row("layer", case, metric, "ms", {n: t.median(n) * 1e3 for n in layers}, t))
                tick()
            del layers, x, g
            _free()
    return rows


def layer_memory_cases(plan: Plan, device, tick) -> list:
    """Bytes saved for backward by one adapted layer (x requires grad, as inside a model)."""
    rows = []
    N = plan.step_shape.tokens
    h, i = plan.step_shape.hidden, plan.step_shape.intermediate
    for k, d, name in ((h, h, "q_proj"), (h, i, "up_proj"), (i, h, "down_proj")):
        for p in (0.0, 0.1):
            vals = {}
            for kind in ("ours", "peft_adalora", "peft_lora"):
                layer = _one_layer(kind, k, d, plan.r, p, device)
                x = torch.randn(N, k, device=device, requires_grad=True)
                with saved_bytes_counter(exclude=list(layer.parameters())) as c:
                    out = layer(x)
                vals[kind] = c["bytes"]
                del out, layer
            case = f"{name} N={N} k={k} d={d} r={plan.r} p={p}"
            rows.append(_row("memory", case, "saved for backward / layer", "KiB", {n: v / 1024 for n, v in vals.items()}))
            if p > 0:
                # PEFT LoRA with its dropout copy of x taken out: the target for ours at p > 0.
                x_copy = N * k * 4
                rows.append(
                    _row(
                        "memory", case, "PEFT LoRA minus dropout copy", "KiB",
                        {"ours": vals["ours"] / 1024, "peft_lora": (vals["peft_lora"] - x_copy) / 1024},
                    )
                )
            tick()
    return rows


# ------------------------------------------------------------------------------ 2. allocator
def _peft_orth_penalty(pm) -> torch.Tensor:
    """PEFT 0.21's regulariser, the loop of ``AdaLoraModel.forward`` copied line for line
    (less the DeepSpeed ZeRO-3 ``gather_params_ctx`` branch, which runs only on empty shards)."""
    inner = pm.base_model
    adapter = inner.trainable_adapter_name
    regu_loss = 0
    num_param = 0
    for n, p in inner.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and adapter in n:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            I = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))  # noqa: E741
            I.requires_grad = False
            num_param += 1
            regu_loss += torch.norm(para_cov - I, p="fro")
    if num_param > 0:
        regu_loss = regu_loss / num_param
    else:
        regu_loss = 0
    return regu_loss


def _state_bytes_ours(model) -> int:
    a = model.rankallocator
    return sum(t.nbytes for t in (a.m1, a.m2) if t is not None)


def _state_bytes_peft(pm) -> int:
    a = pm.base_model.rankallocator
    return sum(t.nbytes for d in (a.ipt, a.exp_avg_ipt, a.exp_avg_unc) for t in d.values())


def allocator_cases(plan: Plan, device, tick) -> tuple:
    """update_and_allocate at a masking and a non-masking step, and the orthogonal penalty
    forward+backward, for each number of adapted layers. Returns (rows, curve) for the plot."""
    rows, curve = [], []
    s = plan.alloc_shape
    flusher = cache_flusher(device)
    for n in plan.alloc_counts:
        shape = LlamaShape(hidden=s.hidden, layers=math.ceil(n / 7), intermediate=s.intermediate, heads=s.heads, vocab=256)
        targets = PROJECTIONS if n % 7 == 0 else projection_names(n)
        models = {}
        for kind in ("ours", "peft_adalora"):
            base = llama(shape, device)
            m, upd = make_contender(kind, base, plan.r, 0.0, targets)
            upd = repeatable(kind, m, upd)
            ps = adapter_params(m)
            torch.manual_seed(2)
            for q in ps:
                q.grad = torch.randn_like(q) * 1e-2  # as after loss.backward()
            models[kind] = (m, upd, ps)
        opts = {kind: torch.optim.AdamW(ps, lr=1e-4) for kind, (m, upd, ps) in models.items()}

        def in_training_order(kind):
            flusher()
            opts[kind].step()
        n_ours = len(models["ours"][0].rankallocator.layout.ranks)
        assert n_ours == n, (n_ours, n)
        case = f"{n} layers (hidden={s.hidden}, inter={s.intermediate}, r={plan.r})"
        point = {"layers": n}
        # back to back: the state stays in cache when it fits (224 layers: 22 MB of traffic per
        # call, in a 32 MB L3); in training order: caches flushed, then an AdamW step, untimed.
        for (step, label), before in itertools.product(
            ((NOMASK_STEP, "non-masking step"), (MASK_STEP, "masking step")), (None, in_training_order)
        ):
            fns = {kind: (lambda u=upd, st=step: u(st)) for kind, (m, upd, ps) in models.items()}
            t = alternate(fns, device, plan.repeats, plan.warmup, plan.min_sample_s, before=before)
            vals = {k: t.median(k) * 1e3 for k in fns}
            label_c = label + (", in training order" if before else "")
            rows.append(_row("update_and_allocate", case, label_c, "ms", vals, t))
            rows.append(_row("update_and_allocate", case, label_c + " / layer", "us", {k: v * 1e3 / n for k, v in vals.items()}))
            key = ("mask" if step == MASK_STEP else "nomask") + ("_cold" if before else "")
            point[f"ours_{key}_ms"] = vals["ours"]
            point[f"peft_{key}_ms"] = vals["peft_adalora"]
            tick()

        if n > plan.orth_max_layers:
            tick()
            vals = {"ours": _state_bytes_ours(models["ours"][0]) / 1024, "peft_adalora": _state_bytes_peft(models["peft_adalora"][0]) / 1024}
            rows.append(_row("memory", case, "allocator state", "KiB", vals))
            curve.append(point)
            del models
            _free()
            continue

        def orth(kind):
            m, _, ps = models[kind]
            pen = (lambda: m.orth_penalty()) if kind == "ours" else (lambda: _peft_orth_penalty(m))

            def f():
                pen().backward()

            return f

        t = alternate({k: orth(k) for k in models}, device, plan.repeats, plan.warmup, plan.min_sample_s)
        vals = {k: t.median(k) * 1e3 for k in models}
        rows.append(_row("orth_penalty", case, "forward+backward", "ms", vals, t))
        point["ours_orth_ms"], point["peft_orth_ms"] = vals["ours"], vals["peft_adalora"]
        # the check that both compute the same number
        with torch.no_grad():
            a, b = float(models["ours"][0].orth_penalty()), float(_peft_orth_penalty(models["peft_adalora"][0]))
        point["orth_agree"] = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
        vals = {"ours": _state_bytes_ours(models["ours"][0]) / 1024, "peft_adalora": _state_bytes_peft(models["peft_adalora"][0]) / 1024}
        rows.append(_row("memory", case, "allocator state", "KiB", vals))
        tick()
        curve.append(point)
        del models
        _free()
    return rows, curve


# ------------------------------------------------------------------------------ 3. training step
def _step_fn(kind, plan: Plan, device, p, ids, compiled: bool):
    """(one training step of contender ``kind`` as a closure, its model): forward (through
    ``torch.compile`` when ``compiled``), backward, AdamW, update_and_allocate, zero_grad."""
    m, upd = make_contender(kind, llama(plan.step_shape, device), plan.r, p, PROJECTIONS)
    m.train()
    fwd = torch.compile(m) if compiled else m
    opt = torch.optim.AdamW(adapter_params(m), lr=1e-4)
    counter = [MASK_STEP - 10]

    def step():
        counter[0] += 1
        out = fwd(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        if upd is not None:
            upd(counter[0])
        opt.zero_grad()

    return step, m


def step_cases(plan: Plan, device, tick) -> list:
    rows = []
    s = plan.step_shape
    kinds = ("ours", "peft_adalora", "peft_lora")
    for p in plan.step_dropouts:
        torch.manual_seed(3)
        ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
        fns, models = {}, {}
        for kind in kinds:
            fns[kind], models[kind] = _step_fn(kind, plan, device, p, ids, compiled=False)
        # steps per sample = a multiple of deltaT, so every sample holds the same number of masking steps
        t = alternate(fns, device, plan.repeats, plan.warmup, fixed_inner=plan.step_inner, tick=tick)
        case = f"{s.layers} layers x 7 proj, hidden={s.hidden}, tokens={s.tokens}, r={plan.r}, p={p}"
        med = {k: t.median(k) for k in fns}
        rows.append(_row("train step", case, "step time", "ms", {k: v * 1e3 for k, v in med.items()}, t))
        rows.append(_row("train step", case, "throughput", "tok/s", {k: s.tokens / v for k, v in med.items()}, t, higher_is_better=True))
        if plan.compiled:
            rows += _compiled_step_rows(plan, device, p, ids, case, kinds, tick)
        # activation memory of one forward (loss included), parameters left out
        vals = {}
        for kind, m in models.items():
            with saved_bytes_counter(exclude=list(m.parameters())) as c:
                out = m(input_ids=ids, labels=ids)
            vals[kind] = c["bytes"] / 2**20
            del out
        rows.append(_row("memory", case, "saved for backward / step", "MiB", vals))
        del fns, models
        _free()
    return rows


def _compiled_step_rows(plan: Plan, device, p, ids, case, kinds, tick) -> list:
    """The same step with each contender's model under ``torch.compile`` (inductor, default mode).
    Compile time is reported apart: the wall time of the first two steps (the compile, and a
    recompile if the second step needs one), minus two steady-state steps."""
    torch._dynamo.reset()
    fns, first = {}, {}
    for kind in kinds:
        fns[kind], _ = _step_fn(kind, plan, device, p, ids, compiled=True)
        t0 = time.perf_counter()
        fns[kind]()
        fns[kind]()
        first[kind] = time.perf_counter() - t0
    t = alternate(fns, device, plan.repeats, plan.warmup, fixed_inner=plan.step_inner, tick=tick)
    med = {k: t.median(k) for k in fns}
    rows = [
        _row("train step (compiled)", case, "step time", "ms", {k: v * 1e3 for k, v in med.items()}, t),
        _row("train step (compiled)", case, "throughput", "tok/s", {k: plan.step_shape.tokens / v for k, v in med.items()},
             t, higher_is_better=True),
        _row("compile", case, "compile time (first 2 steps - 2 steps)", "s",
             {k: max(0.0, first[k] - 2 * med[k]) for k in fns}),
    ]
    del fns
    torch._dynamo.reset()
    _free()
    return rows


def count_ticks(plan: Plan) -> int:
    layer = len(plan.layer_shapes) * len(plan.dropouts) * 2
    mem = 6
    alloc = len(plan.alloc_counts) * 5
    step = len(plan.step_dropouts) * plan.repeats * (2 if plan.compiled else 1)
    return layer + mem + alloc + step
