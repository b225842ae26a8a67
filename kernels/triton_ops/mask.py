"""Masking of every lora_E in one launch (``adalora_fast::apply_mask``, ``ops/mask.py``).

``_apply_mask_kernel``: E[i] = keep[i] ? E[i] : 0 for every layer, one program per layer, reading
its E through a pointer table (one int64 row per layer: E's address, its rank, its first position
in ``keep``); reads Σr bools, RMW of Σr values. The selection of the triplets to keep
(``keep_mask_to_budget``) is a stable sort on the device and has no kernel of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import TL_DTYPE

MASK_BLOCK = 64


@triton.jit
def _apply_mask_kernel(ETAB, KEEP, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Program i: E_i[j] = 0 where keep[trip_i + j] is False (E_i contiguous [r_i, 1])."""
    i = tl.program_id(0)
    ep = tl.load(ETAB + i * 3).to(tl.pointer_type(DTYPE))
    r = tl.load(ETAB + i * 3 + 1)
    trip = tl.load(ETAB + i * 3 + 2)
    for j0 in range(0, r, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        jm = j < r
        keep = tl.load(KEEP + trip + j, mask=jm, other=1) != 0
        ev = tl.load(ep + j, mask=jm)
        tl.store(ep + j, tl.where(keep, ev, tl.zeros_like(ev)), mask=jm)


# ----------------------------------------------------------------------------------------------
# launcher: tensors and ints only


def apply_mask(lora_E: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """E_i *= keep (in place, no host sync; E_i contiguous [r_i, 1], keep [Σr] bool in list order):
    one launch per distinct E dtype (normally one)."""
    keep = keep.contiguous()
    by_dtype: dict = {}
    acc = 0
    for e in lora_E:
        r = e.shape[0]
        if r > 0:
            if not e.is_contiguous():
                raise ValueError("apply_mask: lora_E tensors must be contiguous")
            if e.dtype not in TL_DTYPE:
                raise TypeError(
                    f"apply_mask (triton): lora_E of dtype {e.dtype}; the kernel is built for "
                    f"{', '.join(str(d) for d in TL_DTYPE)}"
                )
            by_dtype.setdefault(e.dtype, []).extend([e.data_ptr(), int(r), acc])
        acc += int(r)
    for dt, vals in by_dtype.items():
        tab = _launch.to_device_table(vals, keep.device)
        _launch.launch(
            _apply_mask_kernel, (len(vals) // 3,), tab, keep, DTYPE=TL_DTYPE[dt], BLOCK=MASK_BLOCK, num_warps=1
        )


def compile_variants():
    """Every config the launcher picks (see ``adapter_linear.compile_variants``)."""
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        yield (
            f"apply_mask[{str(dt)[6:]}]",
            _apply_mask_kernel,
            {"ETAB": "*i64", "KEEP": "*i1", "DTYPE": "constexpr", "BLOCK": "constexpr"},
            {"DTYPE": TL_DTYPE[dt], "BLOCK": MASK_BLOCK},
            1,
        )
