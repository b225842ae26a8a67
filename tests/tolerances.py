"""The one tolerance helper of the suite: an implementation against ``reference.py``, per dtype.

The error is measured as max |actual - expected| over max |expected| (so a gradient that is small
everywhere is not judged by an absolute floor), against a bound chosen by the computing dtype:
fp32 1e-5 (exact fp32 products, on the CPU and in Triton's interpreter), fp16 3e-3, bf16 2e-2.
On a GPU with TF32 dots (``torch.backends.cuda.matmul.allow_tf32``) fp32 is judged at 2e-3.
"""

from __future__ import annotations

import torch

RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TF32_RTOL = 2e-3


def rtol_for(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> float:
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TF32_RTOL
    return RTOL[dtype]


def assert_close(
    actual, expected, dtype: torch.dtype = None, what: str = "", rtol: float = None, scale: float = None
) -> None:
    """Same shape and dtype as ``expected``, and max-abs error <= rtol · scale.

    ``dtype`` is the dtype the result was computed in (default: ``expected.dtype``); ``scale`` the
    magnitude the error is judged against (default max|expected|: pass a larger one where the
    expected values cancel to near zero while rounding scales with their summands)."""
    assert actual is not None, f"{what}: missing"
    assert expected is not None, f"{what}: reference missing"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if rtol is None:
        rtol = rtol_for(dtype or expected.dtype, expected.device)
    if expected.numel() == 0:
        return
    a, e = actual.detach().float(), expected.detach().float()
    scale = max(e.abs().max().item(), 1e-6) if scale is None else scale
    err = (a - e).abs().max().item() / scale
    assert err <= rtol, f"{what}: max error {err:.3g} of {scale:.3g} exceeds {rtol:g}"
