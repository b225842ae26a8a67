"""The one place every Triton kernel of ``adalora_fast.kernels`` is launched from.

Every launcher in this package calls :func:`launch`; tests wrap it (``monkeypatch.setattr``) to
count launches per op, and ``python -m bench.host_path`` stubs it to measure the host path.

On a GPU the first launch of each argument specialisation goes through Triton's JIT (which compiles
or finds the binary); later ones launch that compiled kernel directly (:func:`_launch_cuda`): the
JIT's per-call work (binding the arguments, the specialisation key of every argument, the option
string, the knobs, the device and stream lookups) is host time of the order of the kernel itself on
small layers. The direct launch keys the binary by everything the JIT specialises on (each tensor's
dtype and 16-byte alignment, each integer's value 1 / divisibility by 16 / width, the constexprs and
options) and calls the compiled kernel's launcher exactly as the JIT does.
``ADALORA_FAST_DIRECT_LAUNCH=1`` (read at import) turns the direct path on; by default every
launch takes the JIT path. ``INTERPRET`` is True under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, read once at import, as Triton itself does); kernels then get
``UPCAST=True`` and upcast every half-precision load to fp32 (the interpreter's bf16 arithmetic
and bf16 ``tl.dot`` are wrong), while on the GPU half operands go to the tensor cores as they are.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def to_device_table(vals, device) -> torch.Tensor:
    """An int64 pointer/geometry table on ``device`` (pinned, non-blocking host-to-device copy on CUDA)."""
    t = torch.tensor(vals, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            # the captured copy would read this host buffer again at every replay, after it is freed
            raise RuntimeError(
                "adalora_fast (triton): a pointer table would be copied from host memory during CUDA graph "
                "capture; run the captured region once eagerly first (the tables of the layer ops and the "
                "orthogonal penalty are then cached) and keep update_and_allocate out of the graph"
            )
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def launch_device(args) -> torch.device:
    """The one device of every tensor argument of a launch; a clear error when they differ.

    (Pointer tables hold raw addresses: their builders check the tensors they point to.)"""
    dev = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if dev is None:
                dev = a.device
            elif a.device != dev:
                devs = sorted({str(t.device) for t in args if isinstance(t, torch.Tensor)})
                raise ValueError(f"a Triton launch needs all its tensors on one device, got {devs}")
    if dev is None:
        raise ValueError("a Triton launch needs at least one tensor argument")
    return dev


def launch(kernel, grid, *args, _device=None, **kwargs):
    """Launch ``kernel`` on ``grid`` (the hook tests wrap to count launches), on its tensors' device.

    Triton launches on the *current* CUDA device and its current stream: with layers spread over
    GPUs (``device_map``) a layer on cuda:1 would run on cuda:0. The launch is guarded by the
    tensors' device (``torch.cuda.device``), so it runs there, on that device's current stream.
    The guard is entered only when that device is not the current one: every launch of a training
    step goes through this wrapper, and setting the device and entering the guard cost host time
    of the order of Triton's own launch (``bench/gpu_profile.py --cprofile`` shows it).

    ``_device``: the launcher vouches that every tensor argument is on this device (the layer's
    launchers, whose tensors were checked once per layer configuration): the per-argument check of
    :func:`launch_device` is skipped."""
    dev = _device if _device is not None else launch_device(args)
    if dev.type != "cuda":
        kernel[grid](*args, **kwargs)  # the interpreter, on CPU tensors
    elif dev.index != torch._C._cuda_getDevice():
        with torch.cuda.device(dev):
            _launch_cuda(kernel, grid, dev.index, args, kwargs)
    else:
        _launch_cuda(kernel, grid, dev.index, args, kwargs)


# ---------------------------------------------------------------------------------- direct launches (CUDA)
# Opt-in until the direct path has run on a GPU: it rebuilds the JIT's specialisation key by hand,
# and a key that misses what the JIT specialises on would launch a binary built for other arguments.
DIRECT = os.environ.get("ADALORA_FAST_DIRECT_LAUNCH", "0").strip() in ("1", "true", "yes")
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_compiled: dict = {}  # (kernel, device, argument key, kwargs) -> (compiled kernel, constexpr values)
_trailing: dict = {}  # (kernel, number of positional args) -> names of the constexprs after them, or None
_hooks = None  # triton.knobs.runtime (launch hooks), or False where this Triton has none


def arg_key(args) -> tuple | None:
    """What Triton's JIT specialises a launch on, per positional argument (a superset of it): a
    tensor's dtype and whether its address is 16-byte aligned; an integer's equality to 1,
    divisibility by 16 and whether it fits in int32; a float as such. None for anything else (that
    launch stays on the JIT path)."""
    key = []
    for a in args:
        t = type(a)
        if t is int:
            key.append((a == 1) | ((a & 15) == 0) << 1 | (not _I32_MIN <= a <= _I32_MAX) << 2)
        elif t is float:
            key.append(-1)
        elif isinstance(a, torch.Tensor):
            key.append(a.dtype)
            key.append((a.data_ptr() & 15) == 0)
        else:
            return None
    return tuple(key)


def _trailing_constexprs(kernel, n: int):
    """Names of ``kernel``'s constexpr parameters if they are exactly those after its first ``n``
    (how every launcher here passes them: runtime arguments positionally, constexprs by keyword)."""
    k = (kernel, n)
    if k not in _trailing:
        params = getattr(kernel, "params", None)
        names = None
        if (
            params is not None
            and len(params) >= n
            and not any(p.is_constexpr for p in params[:n])
            and all(p.is_constexpr for p in params[n:])
        ):
            names = tuple(p.name for p in params[n:])
        _trailing[k] = names
    return _trailing[k]


def _runtime_hooks():
    global _hooks
    if _hooks is None:
        try:
            from triton import knobs

            _hooks = knobs.runtime
        except Exception:  # a Triton without knobs: JIT launches only
            _hooks = False
    return _hooks


def _launch_cuda(kernel, grid, device: int, args: tuple, kwargs: dict) -> None:
    """One launch on CUDA device ``device`` (the current one): the compiled kernel directly when this
    specialisation was launched before, else Triton's JIT (whose compiled kernel is kept)."""
    if not DIRECT:
        kernel[grid](*args, **kwargs)
        return
    akey = arg_key(args)
    try:
        key = (kernel, device, akey, tuple(kwargs.items())) if akey is not None else None
        hit = _compiled.get(key) if key is not None else None
    except TypeError:  # an unhashable keyword value: the JIT path
        key = hit = None
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        names = _trailing_constexprs(kernel, len(args)) if key is not None else None
        hooks = _runtime_hooks()
        if names is not None and hooks and compiled is not None and hasattr(compiled, "packed_metadata"):
            if len(_compiled) >= 4096:
                _compiled.clear()
            _compiled[key] = (compiled, tuple(kwargs[n] for n in names))
        return
    compiled, cvals = hit
    bound = args + cvals  # every parameter in order, constexprs included, as the JIT passes them
    n = len(grid)
    g1 = grid[1] if n > 1 else 1
    g2 = grid[2] if n > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    hooks = _hooks
    enter = hooks.launch_enter_hook
    # the launch metadata only feeds the enter hooks (profilers): built only when one is installed
    meta = (
        compiled.launch_metadata(grid, stream, *bound) if enter is not None and getattr(enter, "calls", True) else None
    )
    compiled.run(
        grid[0],
        g1,
        g2,
        stream,
        compiled.function,
        compiled.packed_metadata,
        meta,
        enter,
        hooks.launch_exit_hook,
        *bound,
    )


def check_deterministic(what: str) -> None:
    """Raise if ``torch.use_deterministic_algorithms(True)`` is on: ``what`` sums with fp32 atomics,
    whose order (hence the last bits of the result) changes from run to run."""
    if torch.are_deterministic_algorithms_enabled():
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(
                f"adalora_fast (triton): {what} accumulates with fp32 atomics and is not deterministic", stacklevel=3
            )
            return
        raise RuntimeError(
            f"adalora_fast (triton): {what} accumulates with fp32 atomics and is not deterministic, and "
            "torch.use_deterministic_algorithms(True) is set; use ADALORA_FAST_BACKEND=torch (the same math "
            "in deterministic torch ops)"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``, following torch's switch.

    fp32 operands: full fp32 (``"ieee"``: FMA on the CUDA cores) unless torch allows TF32 for fp32
    matmuls (``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high" | "medium")``), then ``"tf32"`` on the tensor cores
    (~1e-3 relative on the adapter term). Torch's default is full fp32, so ours is too. Read at each
    launch; it is a constexpr (one binary per setting). ``tf32x3`` is not offered: it spills in most
    fp32 configurations on sm_80 and sm_90. Half operands always use the tensor cores ("tf32" is passed
    and ignored for them). In the interpreter every dot is an exact fp32 numpy product.
    """
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_precisions(dtype: torch.dtype) -> tuple:
    """Every value :func:`dot_precision` can return for ``dtype`` (the binaries to compile-check)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def pad_rank(r: int) -> int:
    """The padded rank a matrix kernel is compiled for: 16 or 64 (``tl.dot`` needs >= 16)."""
    for rp in RANK_PADS:
        if r <= rp:
            return rp
    raise NotImplementedError(
        f"rank r={r}: the Triton kernels support r <= {RANK_PADS[-1]} (padded to one of {RANK_PADS}); "
        "use ADALORA_FAST_BACKEND=torch for larger ranks"
    )


RANK_PADS = (16, 64)  # two binaries per kernel and dtype pair; r in (16, 64] pads to 64 (still memory-bound)
