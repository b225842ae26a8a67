"""The one place every Triton kernel of ``adalora_fast.kernels`` is launched from.

Every launcher in this package calls :func:`launch`; tests wrap it (``monkeypatch.setattr``) to
count launches per op. ``INTERPRET`` is True under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, read once at import, as Triton itself does); kernels then get
``UPCAST=True`` and upcast every half-precision load to fp32 (the interpreter's bf16 arithmetic
and bf16 ``tl.dot`` are wrong), while on the GPU half operands go to the tensor cores as they are.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def to_device_table(vals, device) -> torch.Tensor:
    """An int64 pointer/geometry table on ``device`` (pinned, non-blocking host-to-device copy on CUDA)."""
    t = torch.tensor(vals, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` on ``grid`` (the hook tests wrap to count launches)."""
    kernel[grid](*args, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``.

    fp32 operands run as TF32 on the tensor cores (``tl.dot``'s default; like torch with
    ``allow_tf32``): ~1e-3 relative error on the adapter term only (the base GEMM is untouched).
    ``tf32x3`` (fp32-accurate) was tried and doubles the registers of every fp32 tile: it spilled
    in most fp32 configurations on sm_80 and sm_90. Half operands ignore this setting.
    In the interpreter every dot is an exact fp32 numpy product.
    """
    return "tf32"


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
