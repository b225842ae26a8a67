"""The C++ CPU kernel (``csrc/dropout_lora_cpu.cpp``): fused dropout + shrink and its backward.

Built on first use with ``torch.utils.cpp_extension`` (ninja, ~30 s, cached by torch in
``TORCH_EXTENSIONS_DIR``) and registered as ``torch.ops.adalora_fast.*``. It is used by the torch
backend for fp32 adapters on the CPU with dropout > 0, where torch's ``bernoulli_`` (~6 ns per
element, twice: forward and the regenerated mask in backward) would cost as much as the base
matmul. Its keep mask comes from a counter hash, not torch's generator, so it differs from the
pure-torch path's mask for the same seed (both are valid dropout, each is consistent between its
own forward and backward). ``ADALORA_FAST_CPU_EXT=0`` disables it; if it cannot be built, a
warning says why, once, and the pure-torch path runs.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

_state: dict = {"loaded": None, "error": None}
_SOURCE = "dropout_lora_cpu.cpp"


def source_path() -> Optional[Path]:
    here = Path(__file__).resolve().parent.parent  # adalora_fast/
    for cand in (here / "csrc" / _SOURCE, here.parent / "csrc" / _SOURCE):
        if cand.is_file():
            return cand
    return None


def enabled() -> bool:
    return os.environ.get("ADALORA_FAST_CPU_EXT", "1").strip() not in ("0", "false", "no", "")


def available() -> bool:
    """Build (once) and load the extension; False, with one warning, if that fails."""
    if not enabled():
        return False
    if _state["loaded"] is None:
        _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    src = source_path()
    if src is None:
        _state["error"] = f"{_SOURCE} not found beside the package"
    else:
        try:
            from torch.utils import cpp_extension

            print("adalora_fast: building the CPU dropout kernel (once, ~30 s)...", file=sys.stderr, flush=True)
            cpp_extension.load(
                name="adalora_fast_cpu",
                sources=[str(src)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            torch.ops.adalora_fast.dropout_shrink  # noqa: B018  (raises if the ops did not register)
            return True
        except Exception as exc:  # a missing compiler or ninja: say so, run the torch path
            _state["error"] = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"adalora_fast: the C++ CPU dropout kernel is unavailable ({_state['error']}); dropout on the CPU "
        "uses torch.bernoulli_ instead (slower, a different but equally valid mask stream). "
        "Set ADALORA_FAST_CPU_EXT=0 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def usable(x: torch.Tensor, A: torch.Tensor, p: float) -> bool:
    return p > 0.0 and x.device.type == "cpu" and A.dtype == torch.float32 and available()
