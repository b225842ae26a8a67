"""Shared pieces of the benchmark: device, timing (alternating contenders), models, memory hooks.

Timing rule for every comparison: all contenders live in one process, each is warmed up, then
the contenders are *alternated* (ABCABC...) for ``repeats`` rounds; one sample is ``inner``
back-to-back calls (``inner`` chosen from the warm-up so a sample lasts ``min_sample_s``), and
the figure reported is the median over the rounds of the time per call. On the CPU samples are
taken with ``time.perf_counter``; on CUDA with CUDA events around the sample and a synchronize
(the same alternation; ``triton.testing.do_bench`` cannot alternate contenders).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ("ours", "peft_adalora", "peft_lora")
# the training-step comparisons add the same model without adapters, the floor (see make_contender)
STEP_CONTENDERS = ("base",) + CONTENDERS
# the eager fp32 step rows add PEFT's own AdaLoRA run by adalora_fast (af.patch_peft()), last
PATCHED = "peft_patched"
STEP_CONTENDERS_PATCHED = STEP_CONTENDERS + (PATCHED,)
# their names and colours in tables and pictures: report.LABELS, report.COLORS


# ---------------------------------------------------------------------------------- device
def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_tag(device: torch.device) -> str:
    """Short name for file names: ``cpu`` or the GPU's name (``cuda-nvidia-h100-80gb-hbm3``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return device.type


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_info(device: torch.device) -> dict:
    import adalora_fast as af

    info = {
        "device": device_tag(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "backend": af.backend_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cpu":
        try:  # the optional C++ CPU kernel (fused dropout + shrink), when the package has one
            from adalora_fast.ops import cpu_ext

            info["cpu_ext"] = "yes" if cpu_ext.available() else "no (torch fallback)"
        except ImportError:
            info["cpu_ext"] = "absent"
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def setup_threads(n: Optional[int] = None) -> int:
    """Use every core the process may run on (2 on the reference machine), or ``n``."""
    if n:
        torch.set_num_threads(n)
        return torch.get_num_threads()
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """A callable that evicts the caches: it reads and writes a buffer of twice the CPU's last-level
    cache (sysfs; 64 MiB if unknown), or 256 MB on a GPU as ``triton.testing.do_bench`` does.

    The allocator benchmark runs it, then an AdamW step, before each "in training order" call:
    in training the forward and backward stream far more than the cache holds between two
    ``update_and_allocate`` calls, and the optimizer step that comes just before touches p and g.
    """
    if device.type == "cuda":
        nbytes = 256 * 2**20
    else:
        nbytes = 64 * 2**20
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                txt = f.read().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1)
            nbytes = max(nbytes, 2 * int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            pass
    buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)

    def flush() -> None:
        buf.add_(1.0)  # a read and a write of every line (a plain memset may bypass the cache)

    return flush


def time_sample(
    fn: Callable[[], object], inner: int, device: torch.device, before: Optional[Callable[[], None]] = None
) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls: back to back, or with ``before()`` (untimed)
    before each call."""
    if before is not None:
        total = 0.0
        for _ in range(inner):
            before()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            total += time.perf_counter() - t0
        return total / inner
    if device.type == "cuda":
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


@dataclass
class Timing:
    samples: Dict[str, List[float]] = field(default_factory=dict)  # seconds per call, per round
    inner: Dict[str, int] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def spread(self, name: str) -> float:
        """(max - min) / median over the rounds: how noisy the figure is."""
        s = self.samples[name]
        m = statistics.median(s)
        return (max(s) - min(s)) / m if m > 0 else 0.0


def alternate(
    contenders: Dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    fixed_inner: Optional[int] = None,
    tick: Optional[Callable[[], None]] = None,
    before: Optional[Callable[[str], None]] = None,
    around: Optional[Callable[[str], ContextManager]] = None,
) -> Timing:
    """Warm each contender up, then time them in turn (A B C A B C ...) for ``repeats`` rounds.
    With ``before``, ``before(name)`` runs untimed before every call of contender ``name`` (at
    most 10 calls per sample then). With ``around``, the warm-up and each sample of contender
    ``name`` run inside ``with around(name):``, entered and left outside the timed calls
    (:func:`contender_context`: PEFT patched for one contender, PEFT's own code for the others)."""
    res = Timing()

    def ctx(name):
        return around(name) if around is not None else contextlib.nullcontext()

    for name, fn in contenders.items():
        with ctx(name):
            for _ in range(warmup):
                fn()
            _sync(device)
            if fixed_inner is not None:
                res.inner[name] = fixed_inner
            else:
                t = time_sample(fn, 1, device)
                res.inner[name] = max(1, min(10 if before else 1000, math.ceil(min_sample_s / max(t, 1e-7))))
        res.samples[name] = []
    for _ in range(repeats):
        for name, fn in contenders.items():
            prep = (lambda n=name: before(n)) if before is not None else None
            with ctx(name):
                res.samples[name].append(time_sample(fn, res.inner[name], device, prep))
        if tick is not None:
            tick()
    return res


# ---------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int = 4096
    seq: int = 128
    batch: int = 4

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> str:
        return (
            f"LlamaForCausalLM (random init) hidden={self.hidden} intermediate={self.intermediate} "
            f"layers={self.layers} heads={self.heads} vocab={self.vocab}, batch={self.batch} x seq={self.seq}"
        )


def llama(shape: LlamaShape, device: torch.device, seed: int = 0):
    """A randomly initialised LLaMA-style causal LM (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 16),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(device)


def projection_names(n_layers_adapted: int) -> list:
    """Full module names of the first ``n`` projections of a LLaMA model, layer by layer."""
    names = []
    i = 0
    while len(names) < n_layers_adapted:
        for p in PROJECTIONS:
            part = "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            names.append(f"model.layers.{i}.{part}.{p}")
        i += 1
    return names[:n_layers_adapted]


def schedule_kwargs(total_step: int = 10_000) -> dict:
    """An AdaLoRA schedule whose middle phase (budget shrinking, a mask every 10 steps) is long."""
    return dict(tinit=10, tfinal=1000, deltaT=10, total_step=total_step)


MASK_STEP = 5000  # in the budget-shrinking phase, a multiple of deltaT: masks
NOMASK_STEP = 5001  # same phase, not a multiple of deltaT: importance update only


def _embeddings_output_requires_grad(module, inputs, output):
    return output.requires_grad_(True)


def contender_context(kind: str) -> ContextManager:
    """The context every call of contender ``kind`` runs in (its build, warm-up, timed samples and
    memory pass). ``peft_patched`` runs while ``af.patch_peft()`` is active; every other contender
    inside ``peft_patch.suspended()``, so that PEFT AdaLoRA runs PEFT's own code (not even through
    the patched methods' per-object dispatch) and no contender's optimizer step goes through the
    patch's global optimizer hook. Nothing when PEFT is not patched."""
    if kind == PATCHED:
        return contextlib.nullcontext()
    from adalora_fast import peft_patch

    return peft_patch.suspended()


def make_contender(kind: str, base, r: int, dropout: float, targets, lora_alpha: int = 32, causal_lm: bool = True):
    """Wrap ``base`` with one contender's adapters. Returns (model, update_fn or None).

    ``kind="peft_patched"``: PEFT AdaLoRA built exactly as ``peft_adalora`` (same config), after
    ``adalora_fast.patch_peft()``, which stays active: the caller runs the other contenders inside
    :func:`contender_context` and calls ``adalora_fast.unpatch_peft()`` when done. It steps as the
    PEFT contender does, with ``model.base_model.update_and_allocate(step)`` (the first explicit call
    hands the schedule to the caller; the automatic optimizer-hook schedule then stands down).

    ``kind="base"`` is the floor of the training-step comparisons: the same model with no adapters,
    every weight frozen, and the *output of the input embeddings* made to require grad (a forward
    hook, what transformers' ``enable_input_require_grads`` does; the embedding weight itself stays
    frozen). ``loss.backward()`` then runs the backward of every layer (the input gradient through
    each frozen projection, attention, the norms and the LM head) down to the embeddings' output,
    computing no weight gradient. It does a little more than the adapter models must: their layer-0
    q/k/v inputs do not require grad, so they skip those three input gradients (3 of the 7 x layers
    projections' dx) and the first norm's backward; the base row is slightly above the true floor.
    """
    if kind == "base":
        for q in base.parameters():
            q.requires_grad_(False)
        base.get_input_embeddings().register_forward_hook(_embeddings_output_requires_grad)
        return base, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "ours":
            import adalora_fast as af

            cfg = af.AdaLoraConfig(
                init_r=r,
                target_r=max(1, (2 * r) // 3),
                lora_alpha=lora_alpha,
                lora_dropout=dropout,
                target_modules=targets,
                **schedule_kwargs(),
            )
            m = af.get_peft_model(base, cfg)
            return m, m.update_and_allocate
        import peft

        task = {"task_type": "CAUSAL_LM"} if causal_lm else {}
        if kind == PATCHED:
            import adalora_fast as af

            af.patch_peft()
        if kind in ("peft_adalora", PATCHED):
            cfg = peft.AdaLoraConfig(
                init_r=r,
                target_r=max(1, (2 * r) // 3),
                lora_alpha=lora_alpha,
                lora_dropout=dropout,
                target_modules=targets,
                **schedule_kwargs(),
                **task,
            )
            m = peft.get_peft_model(base, cfg)
            from adalora_fast import peft_patch

            # the plain contender must be PEFT's own model, the patched one accelerated
            if (peft_patch.state_of(m) is not None) != (kind == PATCHED):
                raise RuntimeError(f"{kind} built {'un' if kind == PATCHED else ''}accelerated: see contender_context")
            return m, m.base_model.update_and_allocate
        if kind == "peft_lora":
            cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=targets, **task)
            return peft.get_peft_model(base, cfg), None
    raise ValueError(kind)


def repeatable(kind: str, model, update):
    """``update`` for timing one schedule step again and again. Ours refuses a repeated step (it
    would update the importance averages twice in a real run), so its last step is forgotten before
    each call: the same work as a fresh step, plus one attribute write. PEFT accepts repeats."""
    if kind != "ours":
        return update

    def again(step, alloc=model.rankallocator):
        alloc.last_step = None
        update(step)

    return again


def adapter_params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def layer_fwd_bwd(layer, x, g):
    """A closure running one forward+backward of ``layer`` on ``x`` with output gradient ``g``,
    gradients cleared first so each call does the same work (no accumulation into old grads)."""
    ps = adapter_params(layer)

    def step():
        x.grad = None
        for q in ps:
            q.grad = None
        layer(x).backward(g)

    return step


# ---------------------------------------------------------------------------------- memory
@contextlib.contextmanager
def saved_bytes_counter(exclude: Optional[list] = None):
    """Count the bytes autograd saves for backward inside the block: unique storages, parameters
    (and anything in ``exclude``) left out, a tensor saved twice (x by the base matmul and by the
    adapter) counted once. Yields a dict whose ``bytes`` is filled when the block exits."""
    skip = {t.untyped_storage().data_ptr() for t in (exclude or [])}
    seen: dict = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    out = {"bytes": 0, "tensors": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())
    out["tensors"] = len(seen)
