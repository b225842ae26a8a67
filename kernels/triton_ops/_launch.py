"""The one place every Triton kernel of ``adalora_fast.kernels`` is launched from.

Every launcher in this package calls :func:`launch`; tests wrap it (``monkeypatch.setattr``) to
count launches per op. ``INTERPRET`` is True under Triton's CPU interpreter
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


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` on ``grid`` (the hook tests wrap to count launches), on its tensors' device.

    Triton launches on the *current* CUDA device and its current stream: with layers spread over
    GPUs (``device_map``) a layer on cuda:1 would run on cuda:0. The launch is guarded by the
    tensors' device (``torch.cuda.device``), so it runs there, on that device's current stream.
    The guard is entered only when that device is not the current one: every launch of a training
    step goes through this wrapper, and setting the device and entering the guard cost host time
    of the order of Triton's own launch (``bench/gpu_profile.py --cprofile`` shows it)."""
    dev = launch_device(args)
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def check_deterministic(what: str) -> None:
    """Raise if ``torch.use_deterministic_algorithms(True)`` is on: ``what`` sums with fp32 atomics,
    whose order (hence the last bits of the result) changes from run to run."""
    if torch.are_deterministic_algorithms_enabled():
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(f"adalora_fast (triton): {what} accumulates with fp32 atomics and is not deterministic",
                          stacklevel=3)
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
