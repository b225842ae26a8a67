"""The four comparisons: one adapted layer, update_and_allocate (+ orthogonal penalty) against the
number of adapted layers, a whole training step, and memory. Each returns rows for the table.

A row: ``section, case, metric, unit, ours, peft_adalora, peft_lora, x_adalora, x_lora, spread``.
``x_*`` is how many times better adalora_fast is than that contender: PEFT time / our time for
times, our tokens/s / PEFT tokens/s for throughput, PEFT bytes / our bytes for memory (> 1: ours
is better). ``spread`` is the largest (max - min) / median over the rounds among the contenders.
The training-step rows add ``base``, the same model without adapters (the floor, see
``common.make_contender``), and ``<contender>_vs_base``: the contender's step time / the base's.
The eager fp32 step rows add ``peft_patched``, PEFT's own AdaLoRA built under ``af.patch_peft()``,
and ``peft_patched_vs_ours``: its step time / ours (target <= 1.05), with the lowest and highest of
that ratio taken round by round (``peft_patched_vs_ours_lo`` / ``_hi``).
"""

from __future__ import annotations

import gc
import itertools
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .common import (
    MASK_STEP,
    NOMASK_STEP,
    PATCHED,
    PROJECTIONS,
    STEP_CONTENDERS,
    STEP_CONTENDERS_PATCHED,
    LlamaShape,
    Timing,
    _sync,
    adapter_params,
    alternate,
    cache_flusher,
    contender_context,
    layer_fwd_bwd,
    llama,
    make_contender,
    projection_names,
    repeatable,
    saved_bytes_counter,
    schedule_kwargs,
)


@dataclass(frozen=True)
class StepSize:
    """One model size of the training-step sweep, timed at each of ``dropouts``."""

    shape: LlamaShape
    dropouts: tuple = (0.1, 0.0)
    inner: int = 10  # steps per timed sample; each sample holds exactly one masking step (see _step_numbers)
    share: bool = True  # also measure the penalty + update_and_allocate share of our step (first dropout)


@dataclass(frozen=True)
class FinalSize:
    """One final-phase comparison: ``init_r`` pruned to ``target_r`` per module on average, the step
    timed uncompacted, compacted (``model.compact(optimizer)``) and for the base model."""

    shape: LlamaShape
    init_r: int
    target_r: int
    dropouts: tuple = (0.1,)
    inner: int = 4  # steps per timed sample


@dataclass
class Plan:
    """Sizes of one run (the default, or ``--quick``). ``--quick`` keeps the default's rounds,
    warm-ups and sample length (``repeats``, ``warmup``, ``min_sample_s``) and only shrinks sizes."""

    name: str
    layer_tokens: int
    layer_shapes: tuple  # (k, d) pairs
    dropouts: tuple
    r: int
    alloc_counts: tuple
    alloc_shape: LlamaShape  # hidden / intermediate of the allocator models (layers set per count)
    step_sizes: tuple  # StepSize: the eager fp32 sweep, each against the base model
    step_shape: LlamaShape  # the bf16-base and autocast rows, and the per-layer memory rows
    dtype_dropouts: tuple  # dropouts of the bf16-base and autocast rows
    compiled_shape: LlamaShape | None  # the torch.compile rows (None: none); compile time apart
    compiled_dropouts: tuple
    repeats: int
    warmup: int
    min_sample_s: float
    dtype_inner: int = 10  # steps per sample of the bf16-base, autocast and compiled rows
    layer_dtype: torch.dtype | None = None  # the one-layer rows: the whole adapted layer cast to it (None: fp32)
    orth_max_layers: int = 224  # PEFT's penalty loop takes seconds per call beyond this
    final_sizes: tuple = ()  # FinalSize: the final-phase rows (compacted vs uncompacted vs base)
    quant4_shape: LlamaShape | None = None  # the 4-bit-base (QLoRA-style) step rows (None: none)
    quant4_dropouts: tuple = (0.1,)


_H128 = {"hidden": 128, "intermediate": 344, "heads": 2}
_H256 = {"hidden": 256, "intermediate": 688, "heads": 4}
_H1024 = {"hidden": 1024, "intermediate": 2752, "heads": 8}
_H512 = {"hidden": 512, "intermediate": 1376, "heads": 4}
# the final phase at the GLUE-like prunings of the paper (12 -> 3, 12 -> 8): a small vocabulary, so that
# the LM head does not drown the adapters' share of the step
_FINAL = tuple(
    FinalSize(LlamaShape(layers=2, vocab=1024, seq=128, batch=b, **h), 12, t, dropouts=(0.1, 0.0), inner=n)
    for h, b, n in ((_H512, 4, 4), (_H1024, 2, 2))
    for t in (3, 8)
)

DEFAULT = Plan(
    name="default",
    layer_tokens=1024,
    layer_shapes=((512, 512), (512, 1376), (1376, 512)),
    dropouts=(0.0, 0.1),
    r=12,
    alloc_counts=(7, 56, 224, 1024),
    alloc_shape=LlamaShape(hidden=128, layers=0, intermediate=344, heads=2),
    step_sizes=(
        StepSize(LlamaShape(layers=4, vocab=4096, seq=128, batch=4, **_H128)),
        StepSize(LlamaShape(layers=8, vocab=4096, seq=128, batch=4, **_H256)),
        # ~1.3 s a step on 2 cores: 2 steps per sample (a masking step in each), no share pass
        StepSize(LlamaShape(layers=4, vocab=4096, seq=256, batch=2, **_H1024), inner=2, share=False),
    ),
    step_shape=LlamaShape(layers=8, vocab=4096, seq=128, batch=4, **_H256),
    dtype_dropouts=(0.1,),
    # the compiled rows keep the size of the earlier runs the README cites (hidden 256, 4 layers)
    compiled_shape=LlamaShape(layers=4, vocab=4096, seq=128, batch=4, **_H256),
    compiled_dropouts=(0.1, 0.0),
    repeats=7,
    warmup=2,
    min_sample_s=0.05,
    final_sizes=_FINAL,
    quant4_shape=LlamaShape(layers=8, vocab=4096, seq=128, batch=4, **_H256),
)

QUICK = Plan(
    name="quick",
    layer_tokens=256,
    layer_shapes=((256, 256), (256, 688)),
    dropouts=(0.0, 0.1),
    r=12,
    alloc_counts=(7, 56, 224),
    alloc_shape=LlamaShape(hidden=128, layers=0, intermediate=344, heads=2),
    step_sizes=(
        StepSize(
            LlamaShape(hidden=64, layers=2, intermediate=172, heads=2, vocab=1024, seq=64, batch=2), dropouts=(0.1,)
        ),
        StepSize(LlamaShape(layers=2, vocab=1024, seq=64, batch=2, **_H128)),
    ),
    step_shape=LlamaShape(layers=2, vocab=1024, seq=64, batch=2, **_H128),
    dtype_dropouts=(0.1,),
    compiled_shape=LlamaShape(layers=1, vocab=1024, seq=64, batch=2, **_H128),
    compiled_dropouts=(0.1,),
    repeats=DEFAULT.repeats,
    warmup=DEFAULT.warmup,
    min_sample_s=DEFAULT.min_sample_s,
    final_sizes=(FinalSize(LlamaShape(layers=2, vocab=1024, seq=64, batch=2, **_H128), 12, 3),),
    quant4_shape=LlamaShape(layers=2, vocab=1024, seq=64, batch=2, **_H128),
)

_H2048 = {"hidden": 2048, "intermediate": 5504, "heads": 16}

# On a CUDA GPU: the LLaMA-7B projection shapes of kernels/COST.md for the one-layer rows, in bf16
# (the adapters too, so the Triton kernels run; fp32 adapters under torch's default full-fp32
# matmul precision take torch's cuBLAS path), and a 4-layer hidden-2048 model for the steps.
GPU = Plan(
    name="gpu",
    layer_tokens=8192,
    layer_shapes=((4096, 4096), (4096, 11008), (11008, 4096)),
    dropouts=(0.0, 0.1),
    r=12,
    alloc_counts=(7, 56, 224),
    alloc_shape=LlamaShape(layers=0, **_H1024),
    step_sizes=(StepSize(LlamaShape(layers=4, vocab=32000, seq=512, batch=4, **_H2048)),),
    step_shape=LlamaShape(layers=4, vocab=32000, seq=512, batch=4, **_H2048),
    dtype_dropouts=(0.1,),
    compiled_shape=None,
    compiled_dropouts=(),
    repeats=5,
    warmup=2,
    min_sample_s=0.02,
    layer_dtype=torch.bfloat16,
    quant4_shape=LlamaShape(layers=4, vocab=32000, seq=512, batch=4, **_H2048),
)


_ROW_KINDS = ("ours", "peft_adalora", "peft_lora", PATCHED, "base")  # the value columns of a row


def _row(section, case, metric, unit, vals: dict, timing: Timing | None = None, higher_is_better=False, **meta):
    """One table row. With ``timing``, the rounds' samples are kept in the row's unit (``samples``,
    for the plot's error bars and the JSON) with each contender's lowest and highest round
    (``<k>_lo``, ``<k>_hi``). With a ``base`` value, ``<k>_vs_base`` is the contender's figure over
    the base model's: time or bytes over the base's, for throughput rows base tok/s over the
    contender's (> 1: the contender costs more than the model without adapters)."""
    row = {"section": section, "case": case, "metric": metric, "unit": unit}
    ours = vals.get("ours")
    for k in _ROW_KINDS:
        row[k] = vals.get(k)
    for k, col in (("peft_adalora", "x_adalora"), ("peft_lora", "x_lora")):
        v = vals.get(k)
        if v is None or ours is None or ours == 0 or v == 0:
            row[col] = None
        else:
            row[col] = ours / v if higher_is_better else v / ours
    base = vals.get("base")
    for k in ("ours", "peft_adalora", "peft_lora", PATCHED):
        v = vals.get(k)
        ok = base is not None and v is not None and base > 0 and v > 0
        row[f"{k}_vs_base"] = (base / v if higher_is_better else v / base) if ok else None
    # the patched PEFT contender against our native path, as _vs_base reads (> 1: it costs more than ours)
    v = vals.get(PATCHED)
    ok = ours is not None and v is not None and ours > 0 and v > 0
    row[f"{PATCHED}_vs_ours"] = (ours / v if higher_is_better else v / ours) if ok else None
    row[f"{PATCHED}_vs_ours_lo"] = row[f"{PATCHED}_vs_ours_hi"] = None
    if ok and timing is not None and PATCHED in timing.samples and "ours" in timing.samples:
        # round by round: the two alternate, so one round's figures are a pair under the same load. The
        # samples are times in every row, so the pairs read as the ratio does (patched time / ours).
        pairs = [p / o for p, o in zip(timing.samples[PATCHED], timing.samples["ours"]) if o > 0 and p > 0]
        if pairs:
            row[f"{PATCHED}_vs_ours_lo"], row[f"{PATCHED}_vs_ours_hi"] = min(pairs), max(pairs)
    row["spread"] = max(timing.spread(n) for n in timing.samples) if timing is not None else None
    # best round per contender, in the row's unit (CSV/JSON only): on a shared, busy machine the
    # minimum is the better estimate of the uncontended figure; the table shows medians
    samples = {}
    for k in _ROW_KINDS:
        best = lo = hi = None
        if timing is not None and k in timing.samples and vals.get(k) is not None:
            med = timing.median(k)
            if med > 0 and min(timing.samples[k]) > 0:
                # each round's figure in the row's unit: the median maps to vals[k]
                samples[k] = [vals[k] * med / s if higher_is_better else vals[k] * s / med for s in timing.samples[k]]
                lo, hi = min(samples[k]), max(samples[k])
                best = hi if higher_is_better else lo
        row[f"{k}_best"] = best
        row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
    row["samples"] = samples or None
    row.update(meta)
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


def _one_layer(kind, k, d, r, p, device, seed=0, dtype=None):
    torch.manual_seed(seed)
    holder = _Holder(k, d).to(device)
    make_contender(kind, holder, r, p, ["proj"], causal_lm=False)
    layer = holder.proj  # both libraries replace the attribute in place
    if dtype is not None:
        layer.to(dtype)
    layer.train()
    return layer


def layer_cases(plan: Plan, device, tick) -> list:
    rows = []
    N = plan.layer_tokens
    for k, d in plan.layer_shapes:
        for p in plan.dropouts:
            dt = plan.layer_dtype
            layers = {
                kind: _one_layer(kind, k, d, plan.r, p, device, dtype=dt)
                for kind in ("ours", "peft_adalora", "peft_lora")
            }
            torch.manual_seed(1)
            x = torch.randn(N, k, device=device, dtype=dt, requires_grad=True)
            g = torch.randn(N, d, device=device, dtype=dt)
            case = f"N={N} k={k} d={d} r={plan.r} p={p}" + (f" {str(dt)[6:]}" if dt is not None else "")

            def fwd(layer, x=x):
                return lambda: layer(x)

            def fwd_bwd(layer, x=x, g=g):
                return layer_fwd_bwd(layer, x, g)

            for metric, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
                t = alternate(
                    {n: make(m) for n, m in layers.items()}, device, plan.repeats, plan.warmup, plan.min_sample_s
                )
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
            rows.append(
                _row("memory", case, "saved for backward / layer", "KiB", {n: v / 1024 for n, v in vals.items()})
            )
            if p > 0 and device.type == "cpu":
                # PEFT LoRA with its dropout copy of x taken out: the target for ours at p > 0. CPU only:
                # on CUDA PEFT LoRA at p = 0.1 saves just 1 byte per element more than at p = 0 (the
                # fused dropout's mask; measured on an H100), so this fp32-copy formula does not apply.
                x_copy = N * k * 4
                rows.append(
                    _row(
                        "memory",
                        case,
                        "PEFT LoRA minus dropout copy",
                        "KiB",
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
        shape = LlamaShape(
            hidden=s.hidden, layers=math.ceil(n / 7), intermediate=s.intermediate, heads=s.heads, vocab=256
        )
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
            rows.append(
                _row("update_and_allocate", case, label_c + " / layer", "us", {k: v * 1e3 / n for k, v in vals.items()})
            )
            key = ("mask" if step == MASK_STEP else "nomask") + ("_cold" if before else "")
            for who, kind in (("ours", "ours"), ("peft", "peft_adalora")):
                point[f"{who}_{key}_ms"] = vals[kind]
                point[f"{who}_{key}_lo_ms"] = min(t.samples[kind]) * 1e3  # the rounds' range: error bars
                point[f"{who}_{key}_hi_ms"] = max(t.samples[kind]) * 1e3
            tick()

        if n > plan.orth_max_layers:
            tick()
            vals = {
                "ours": _state_bytes_ours(models["ours"][0]) / 1024,
                "peft_adalora": _state_bytes_peft(models["peft_adalora"][0]) / 1024,
            }
            rows.append(_row("memory", case, "allocator state", "KiB", vals))
            curve.append(point)
            del models
            _free()
            continue

        def orth(kind, models=models):
            m, _, ps = models[kind]
            pen = (lambda: m.orth_penalty()) if kind == "ours" else (lambda: _peft_orth_penalty(m))

            def f():
                pen().backward()

            return f

        t = alternate({k: orth(k) for k in models}, device, plan.repeats, plan.warmup, plan.min_sample_s)
        vals = {k: t.median(k) * 1e3 for k in models}
        rows.append(_row("orth_penalty", case, "forward+backward", "ms", vals, t))
        for who, kind in (("ours", "ours"), ("peft", "peft_adalora")):
            point[f"{who}_orth_ms"] = vals[kind]
            point[f"{who}_orth_lo_ms"], point[f"{who}_orth_hi_ms"] = (
                min(t.samples[kind]) * 1e3,
                max(t.samples[kind]) * 1e3,
            )
        # the check that both compute the same number
        with torch.no_grad():
            a, b = float(models["ours"][0].orth_penalty()), float(_peft_orth_penalty(models["peft_adalora"][0]))
        point["orth_agree"] = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
        vals = {
            "ours": _state_bytes_ours(models["ours"][0]) / 1024,
            "peft_adalora": _state_bytes_peft(models["peft_adalora"][0]) / 1024,
        }
        rows.append(_row("memory", case, "allocator state", "KiB", vals))
        tick()
        curve.append(point)
        del models
        _free()
    return rows, curve


# ------------------------------------------------------------------------------ 3. training step
def _step_numbers(inner: int, deltaT: int = 10):
    """The schedule steps passed to update_and_allocate by successive calls: any ``inner``
    consecutive calls (one timed sample, wherever the warm-up left off) hold exactly
    ``max(1, inner // deltaT)`` masking steps, all in the budget-shrinking phase. With ``inner`` a
    multiple of deltaT the steps are consecutive, the schedule's own rate; with a smaller ``inner``
    (the largest model, where one step takes seconds) the counter skips ahead so that each sample
    still masks once: masking is then more frequent than in training, which counts against the
    AdaLoRA contenders, not for them."""
    start = MASK_STEP - deltaT
    if inner >= deltaT:
        if inner % deltaT:
            raise ValueError(f"steps per sample {inner}: a multiple of deltaT={deltaT}, or fewer than deltaT")
        it = itertools.count(start + 1)
    else:
        it = (start + deltaT * (i // inner) + (deltaT - inner) + i % inner + 1 for i in itertools.count())
    final_start = schedule_kwargs()["total_step"] - schedule_kwargs()["tfinal"]
    for n in it:
        if n >= final_start:
            raise RuntimeError(f"step {n} reached the final phase: the bench ran more steps than planned")
        yield n


def _step_fn(
    kind,
    shape: LlamaShape,
    plan: Plan,
    device,
    p,
    ids,
    inner: int,
    compiled=False,
    dtype=None,
    autocast=False,
    quant4=False,
):
    """One training step of contender ``kind`` as closures over one model: ``(step, parts, model)``.

    ``step()``: forward (through ``torch.compile`` when ``compiled``; under
    ``torch.autocast(bfloat16)`` when ``autocast``), ``loss.backward()``, AdamW on the adapters,
    ``update_and_allocate`` (the AdaLoRA contenders), ``zero_grad``. The orthogonal penalty is in the
    loss, as each library adds it. ``dtype``: the base model's dtype (the adapters stay fp32, PEFT's
    default). ``quant4``: every projection a bitsandbytes 4-bit layer (:func:`quantize_4bit`). The
    base contender only runs forward and backward (nothing to train).

    ``parts()`` (the AdaLoRA contenders, eager): the same step with the penalty taken out of the
    model's loss and run as its own forward+backward right after the loss's backward (the same
    gradients: the penalty's graph meets the loss's only at the adapter leaves), timing it and
    ``update_and_allocate``; returns seconds ``(whole step, penalty, update_and_allocate)``.
    """
    base = llama(shape, device)
    if dtype is not None:
        base = base.to(dtype)
    if quant4:
        quantize_4bit(base, device)
    m, upd = make_contender(kind, base, plan.r, p, PROJECTIONS)
    m.train()
    fwd = torch.compile(m) if compiled else m
    params = adapter_params(m)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    numbers = _step_numbers(inner)

    def forward():
        if autocast:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fwd(input_ids=ids, labels=ids)
        return fwd(input_ids=ids, labels=ids)

    def step():
        forward().loss.backward()
        if opt is not None:
            opt.step()
        if upd is not None:
            upd(next(numbers))
        if opt is not None:
            opt.zero_grad()

    parts = None
    if kind in ("ours", "peft_adalora") and not compiled:
        cfg = m.peft_config[m.trainable_adapter_name if kind == "ours" else "default"]
        penalty = m.orth_penalty if kind == "ours" else (lambda: _peft_orth_penalty(m))

        def parts():
            w = cfg.orth_reg_weight
            cfg.orth_reg_weight = 0.0  # the model leaves the penalty out of its loss
            try:
                _sync(device)
                t0 = time.perf_counter()
                forward().loss.backward()
                _sync(device)
                t1 = time.perf_counter()
                (w * penalty()).backward()
                _sync(device)
                t2 = time.perf_counter()
                opt.step()
                _sync(device)
                t3 = time.perf_counter()
                upd(next(numbers))
                _sync(device)
                t4 = time.perf_counter()
                opt.zero_grad()
                _sync(device)
                t5 = time.perf_counter()
            finally:
                cfg.orth_reg_weight = w
            return t5 - t0, t2 - t1, t4 - t3

    return step, parts, m


def _step_case(shape: LlamaShape, r: int, p) -> str:
    return f"hidden={shape.hidden}, {shape.layers} layers x 7 proj, {shape.batch}x{shape.seq} tokens, r={r}, p={p}"


def _share_rows(section, case, parts, plan: Plan, inner: int, device, meta: dict) -> list:
    """The orthogonal penalty and update_and_allocate inside our own training step (same model,
    right after its timed rounds): ``warmup`` untimed steps, then ``repeats`` samples of ``inner``
    steps through ``parts``; per sample, (penalty + update_and_allocate time) / step time."""
    for _ in range(plan.warmup):
        parts()
    pen, upd, share = [], [], []
    for _ in range(plan.repeats):
        tot = tp = tu = 0.0
        for _ in range(inner):
            a, b, c = parts()
            tot, tp, tu = tot + a, tp + b, tu + c
        pen.append(tp / inner)
        upd.append(tu / inner)
        share.append((tp + tu) / tot)
    rows = []
    for metric, unit, xs, scale in (
        ("orth penalty fwd+bwd inside the step", "ms", pen, 1e3),
        ("update_and_allocate inside the step", "ms", upd, 1e3),
        ("penalty + update_and_allocate share of the step", "%", share, 100.0),
    ):
        t = Timing(samples={"ours": xs})
        rows.append(_row(section, case, metric, unit, {"ours": t.median("ours") * scale}, t, **meta))
    return rows


def _step_rows(
    section,
    shape: LlamaShape,
    plan: Plan,
    device,
    p,
    inner: int,
    tick,
    share=False,
    memory=True,
    dtype=None,
    autocast=False,
    variant="fp32",
    quant4=False,
    kinds=STEP_CONTENDERS,
) -> list:
    """One alternation of the contenders' training steps (``kinds``: base, ours, PEFT AdaLoRA, PEFT
    LoRA, and PEFT AdaLoRA under ``af.patch_peft()`` where ``kinds`` names ``peft_patched``): step
    time and throughput rows, then our penalty + update_and_allocate share (``share``) and the
    activation memory of one forward (``memory``). With ``peft_patched``, every other contender is
    built and run with PEFT's patching suspended (``common.contender_context``), and PEFT is unpatched
    before this returns."""
    torch.manual_seed(3)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
    fns, parts, models = {}, {}, {}
    try:
        for kind in kinds:
            with contender_context(kind):
                fns[kind], parts[kind], models[kind] = _step_fn(
                    kind, shape, plan, device, p, ids, inner, dtype=dtype, autocast=autocast, quant4=quant4
                )
        t = alternate(fns, device, plan.repeats, plan.warmup, fixed_inner=inner, tick=tick, around=contender_context)
        case = _step_case(shape, plan.r, p)
        meta = {"hidden": shape.hidden, "layers": shape.layers, "p": p, "variant": variant}
        med = {k: t.median(k) for k in fns}
        rows = [
            _row(section, case, "step time", "ms", {k: v * 1e3 for k, v in med.items()}, t, **meta),
            _row(
                section,
                case,
                "throughput",
                "tok/s",
                {k: shape.tokens / v for k, v in med.items()},
                t,
                higher_is_better=True,
                **meta,
            ),
        ]
        if share:
            with contender_context("ours"):
                rows += _share_rows(section, case, parts["ours"], plan, inner, device, meta)
            tick()
        if memory:
            # activation memory of one forward (loss included), parameters left out
            vals = {}
            for kind, m in models.items():
                with contender_context(kind), saved_bytes_counter(exclude=list(m.parameters())) as c:
                    out = m(input_ids=ids, labels=ids)
                vals[kind] = c["bytes"] / 2**20
                del out
            rows.append(_row("memory", case, "saved for backward / step", "MiB", vals, **meta))
    finally:
        if PATCHED in kinds:
            import adalora_fast as af

            af.unpatch_peft()
    del fns, parts, models
    _free()
    return rows


def step_cases(plan: Plan, device, tick) -> list:
    """The training step: the fp32 size sweep (both dropouts), a bf16 base with fp32 adapters,
    fp32 under ``torch.autocast(bfloat16)``, and each contender under ``torch.compile``; every
    row against the base model (no adapters) alternated in the same rounds. The fp32 sweep also
    times PEFT's AdaLoRA under ``af.patch_peft()`` (``peft_patched``) in the same rounds; the other
    step sections leave it out (it adds a fifth contender's time to each row)."""
    rows = []
    for size in plan.step_sizes:
        for j, p in enumerate(size.dropouts):
            rows += _step_rows(
                "train step",
                size.shape,
                plan,
                device,
                p,
                size.inner,
                tick,
                share=size.share and j == 0,
                kinds=STEP_CONTENDERS_PATCHED,
            )
    for p in plan.dtype_dropouts:
        rows += _step_rows(
            "train step (bf16 base)",
            plan.step_shape,
            plan,
            device,
            p,
            plan.dtype_inner,
            tick,
            memory=False,
            dtype=torch.bfloat16,
            variant="bf16 base",
        )
        rows += _step_rows(
            "train step (autocast bf16)",
            plan.step_shape,
            plan,
            device,
            p,
            plan.dtype_inner,
            tick,
            memory=False,
            autocast=True,
            variant="autocast",
        )
    if plan.compiled_shape is not None:
        for p in plan.compiled_dropouts:
            rows += _compiled_step_rows(plan, device, p, tick)
    return rows


def _compiled_step_rows(plan: Plan, device, p, tick) -> list:
    """The same step with each contender's model under ``torch.compile`` (inductor, default mode),
    the base model too. Compile time is reported apart: the wall time of the first two steps (the
    compile, and a recompile if the second step needs one), minus two steady-state steps."""
    shape = plan.compiled_shape
    torch._dynamo.reset()
    torch.manual_seed(3)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
    fns, first = {}, {}
    for kind in STEP_CONTENDERS:
        fns[kind], _, _ = _step_fn(kind, shape, plan, device, p, ids, plan.dtype_inner, compiled=True)
        t0 = time.perf_counter()
        fns[kind]()
        fns[kind]()
        _sync(device)
        first[kind] = time.perf_counter() - t0
    t = alternate(fns, device, plan.repeats, plan.warmup, fixed_inner=plan.dtype_inner, tick=tick)
    med = {k: t.median(k) for k in fns}
    case = _step_case(shape, plan.r, p)
    meta = {"hidden": shape.hidden, "layers": shape.layers, "p": p, "variant": "compiled"}
    rows = [
        _row("train step (compiled)", case, "step time", "ms", {k: v * 1e3 for k, v in med.items()}, t, **meta),
        _row(
            "train step (compiled)",
            case,
            "throughput",
            "tok/s",
            {k: shape.tokens / v for k, v in med.items()},
            t,
            higher_is_better=True,
            **meta,
        ),
        _row(
            "compile",
            case,
            "compile time (first 2 steps - 2 steps)",
            "s",
            {k: max(0.0, first[k] - 2 * med[k]) for k in fns},
            **meta,
        ),
    ]
    del fns
    torch._dynamo.reset()
    _free()
    return rows


# ------------------------------------------------------------------------------ the 4-bit base
def quantize_4bit(model, device) -> None:
    """Every projection of ``model`` (``PROJECTIONS``) replaced by a bitsandbytes ``Linear4bit``
    (NF4, quantized from its weight; compute in fp32 on the CPU, bf16 on CUDA, QLoRA's usual), and
    the model marked ``is_loaded_in_4bit`` as transformers marks a 4-bit checkpoint: PEFT picks its
    4-bit layers (LoRA's and AdaLoRA's) by that flag."""
    import bitsandbytes as bnb

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in PROJECTIONS:
            q = bnb.nn.Linear4bit(
                m.in_features,
                m.out_features,
                bias=m.bias is not None,
                compute_dtype=compute,
                quant_type="nf4",
                device="cpu",
            )
            q.weight = bnb.nn.Params4bit(m.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            if m.bias is not None:
                q.bias = nn.Parameter(m.bias.data.to("cpu"), requires_grad=False)
            model.set_submodule(name, q.to(device))
    model.is_loaded_in_4bit = True


def quant4_cases(plan: Plan, device, tick) -> list:
    """The training step on a QLoRA-style base (every projection 4-bit, see :func:`quantize_4bit`):
    ours, PEFT AdaLoRA and PEFT LoRA on the same 4-bit model, against that model without adapters,
    alternated in the same rounds. bitsandbytes' 4-bit matmul runs the base in all four."""
    if plan.quant4_shape is None:
        return []
    rows = []
    for p in plan.quant4_dropouts:
        rows += _step_rows(
            "train step (4-bit base)",
            plan.quant4_shape,
            plan,
            device,
            p,
            plan.dtype_inner,
            tick,
            memory=False,
            variant="4-bit base",
            quant4=True,
        )
    return rows


# ------------------------------------------------------------------------------ 4. the final phase
def _trainable_and_adamw_bytes(model, opt) -> int:
    """Bytes of the trainable parameters and of their AdamW state (the importance state is freed at
    the final mask with or without compaction, so it is not counted)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    st = sum(v.nbytes for p in ps for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))
    return sum(p.nbytes for p in ps) + st


def _final_phase_models(size: FinalSize, device, p):
    """Our model in the final phase (the final mask fixed on the scores of one reduction-phase step),
    its AdamW, and a copy compacted with its own copy of the optimizer. Returns
    ((model, opt) uncompacted, (model, opt) compacted, the first final-phase step)."""
    import copy

    import adalora_fast as af

    sk = schedule_kwargs()
    final_start = sk["total_step"] - sk["tfinal"]
    base = llama(size.shape, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = af.get_peft_model(
            base,
            af.AdaLoraConfig(
                init_r=size.init_r,
                target_r=size.target_r,
                lora_alpha=32,
                lora_dropout=p,
                target_modules=PROJECTIONS,
                **sk,
            ),
        )
    m.train()
    opt = torch.optim.AdamW(adapter_params(m), lr=1e-4)
    torch.manual_seed(4)
    ids = torch.randint(0, size.shape.vocab, (size.shape.batch, size.shape.seq), device=device)
    for step in (sk["tinit"] + 1, final_start):  # one importance update, then the final mask on its scores
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        m.update_and_allocate(step)
        opt.zero_grad()
    mc = copy.deepcopy(m)
    opt_c = torch.optim.AdamW(adapter_params(mc), lr=1e-4)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() holds the live tensors
    mc.compact(opt_c)
    return (m, opt), (mc, opt_c), final_start + 1


def final_phase_cases(plan: Plan, device, tick) -> list:
    """The final phase (mask frozen at ``target_r`` per module on average) with and without
    ``model.compact(optimizer)``, against the base model, alternated in the same rounds: step time
    (forward, backward, AdamW, update_and_allocate, zero_grad), the adapters' overhead over the base
    compacted / uncompacted (goal: <= target_r / init_r + 0.10), and the bytes of the trainable
    parameters + AdamW state."""
    rows = []
    for size in plan.final_sizes:
        shape = size.shape
        for p in size.dropouts:
            torch.manual_seed(3)
            ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
            (mu, ou), (mc, oc), first = _final_phase_models(size, device, p)
            base, _ = make_contender("base", llama(shape, device), size.init_r, p, PROJECTIONS)
            base.train()

            def stepper(m, opt, counter):
                def step():
                    m(input_ids=ids, labels=ids).loss.backward()
                    if opt is not None:
                        opt.step()
                        m.update_and_allocate(next(counter))
                        opt.zero_grad()

                return step

            fns = {
                "uncompacted": stepper(mu, ou, itertools.count(first)),
                "compacted": stepper(mc, oc, itertools.count(first)),
                "base": stepper(base, None, None),
            }
            t = alternate(fns, device, plan.repeats, plan.warmup, fixed_inner=size.inner, tick=tick)
            med = {k: t.median(k) for k in fns}
            layers = mc.adapted_layers()
            kept, n_mod = sum(m.r["default"] for _, m in layers), len(layers)
            case = (
                f"hidden={shape.hidden}, {shape.layers} layers x 7 proj, {shape.batch}x{shape.seq} tokens, "
                f"r={size.init_r}->{size.target_r} (kept {kept} of {size.init_r * n_mod}), p={p}"
            )
            meta = {
                "hidden": shape.hidden,
                "layers": shape.layers,
                "p": p,
                "init_r": size.init_r,
                "target_r": size.target_r,
                "kept_fraction": kept / (size.init_r * n_mod),
            }
            for key, label in (("uncompacted", "step time, uncompacted"), ("compacted", "step time, compacted")):
                tk = Timing(samples={"ours": t.samples[key], "base": t.samples["base"]})
                rows.append(
                    _row(
                        "final phase",
                        case,
                        label,
                        "ms",
                        {"ours": med[key] * 1e3, "base": med["base"] * 1e3},
                        tk,
                        **meta,
                    )
                )
            # the overhead from the medians, and from each contender's best round (on a busy machine
            # the best round is the better estimate of the uncontended time; the target reads it)
            goal = meta["kept_fraction"] + 0.10
            for how, v in (("medians", med), ("best rounds", {k: min(t.samples[k]) for k in fns})):
                over_u, over_c = v["uncompacted"] - v["base"], v["compacted"] - v["base"]
                rows.append(
                    _row(
                        "final phase",
                        case,
                        f"adapter overhead over base, compacted / uncompacted ({how})",
                        "x",
                        {"ours": over_c / over_u if over_u > 0 else None},
                        goal=goal,
                        how=how,
                        **meta,
                    )
                )
            for key, (m, opt) in (("uncompacted", (mu, ou)), ("compacted", (mc, oc))):
                rows.append(
                    _row(
                        "final phase",
                        case,
                        f"trainable params + AdamW state, {key}",
                        "MiB",
                        {"ours": _trainable_and_adamw_bytes(m, opt) / 2**20},
                        **meta,
                    )
                )
            del fns, mu, mc, ou, oc, base
            _free()
    return rows


def count_ticks(plan: Plan) -> int:
    layer = len(plan.layer_shapes) * len(plan.dropouts) * 2
    mem = 6
    alloc = len(plan.alloc_counts) * 5
    step = sum(len(s.dropouts) * plan.repeats + (1 if s.share else 0) for s in plan.step_sizes)
    step += 2 * len(plan.dtype_dropouts) * plan.repeats
    if plan.compiled_shape is not None:
        step += len(plan.compiled_dropouts) * plan.repeats
    step += sum(len(f.dropouts) for f in plan.final_sizes) * plan.repeats
    if plan.quant4_shape is not None:
        step += len(plan.quant4_dropouts) * plan.repeats
    return layer + mem + alloc + step
