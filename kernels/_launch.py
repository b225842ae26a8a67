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


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` on ``grid`` (the hook tests wrap to count launches)."""
    kernel[grid](*args, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype``.

    fp32 operands use ``tf32x3`` (three TF32 tensor-core products, ~fp32 accuracy), so the adapter
    term keeps fp32 precision as PEFT's fp32 matmul does, and still runs on the tensor cores (the
    kernels are memory-bound; the 3x FLOPs are hidden). Half operands ignore this setting.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
