"""The C++ CPU kernels (``csrc/``), one source per op module: fused dropout + shrink and its
backward (``adapter_linear_cpu.cpp``), the importance update of all layers in one pass
(``importance_cpu.cpp``), the exact-k selection of the triplets to prune and the masking of every
``lora_E`` (``mask_cpu.cpp``).

Built on first use with ``torch.utils.cpp_extension`` (ninja, cached by torch in
``TORCH_EXTENSIONS_DIR``) and registered as ``torch.ops.adalora_fast_cpu.*`` (the kernels the
registered ``adalora_fast::*`` ops call). The torch backend uses them for fp32 adapters on the
CPU: the allocator ops always (exact PEFT arithmetic, one pass instead of ~12), the dropout kernel
with dropout > 0, where torch's ``bernoulli_`` (paid twice: forward and the regenerated mask in
backward) would cost as much as the base matmul. Its keep mask comes from a counter hash, not
torch's generator, so it differs from the pure-torch path's mask for the same seed (both are valid
dropout, each is consistent between its own forward and backward). ``ADALORA_FAST_CPU_EXT=0``
disables them; if they cannot be built, a warning says why, once, and the pure-torch paths run.
:func:`build` is also how ``autograd_node`` builds the layer's C++ autograd node.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

_state: dict = {"loaded": None, "error": None}
_SOURCES = ("adapter_linear_cpu.cpp", "importance_cpu.cpp", "mask_cpu.cpp")
_STALE_LOCK_S = 600  # a build takes well under a minute


def _warn_if_stale_lock(cpp_extension, name: str) -> None:
    """torch's build lock outlives a build killed midway, and every later build then waits for it
    forever without a word: say where it is when it looks abandoned."""
    try:
        lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
        age = time.time() - os.path.getmtime(lock)
    except (AttributeError, OSError):
        return
    if age > _STALE_LOCK_S:
        print(
            f"adalora_fast: {lock} is {age / 60:.0f} minutes old; torch waits until it is gone. A build killed "
            "midway leaves it behind: delete it if no other process is building the C++ kernels.",
            file=sys.stderr,
            flush=True,
        )


def source_dir(sources=_SOURCES) -> Optional[Path]:
    """The folder holding ``sources``: ``adalora_fast/csrc`` when installed, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent.parent  # adalora_fast/
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / s).is_file() for s in sources):
            return cand
    return None


def build(name: str, sources: tuple, what: str, extra_cflags: list, extra_ldflags=(), python_module: bool = False):
    """Build (once, cached by torch in ``TORCH_EXTENSIONS_DIR``) and load the extension ``name`` from
    ``sources`` in ``csrc/``, saying so on stderr (the first build takes a while). Returns the module
    (``python_module``) or True; raises what the build raised (a missing compiler or ninja)."""
    src = source_dir(sources)
    if src is None:
        raise FileNotFoundError(f"{', '.join(sources)} not found beside the package")
    from torch.utils import cpp_extension

    print(
        f"adalora_fast: loading {what} (compiled once on first use, which takes a while; then cached)...",
        file=sys.stderr,
        flush=True,
    )
    _warn_if_stale_lock(cpp_extension, name)
    return cpp_extension.load(
        name=name,
        sources=[str(src / s) for s in sources],
        extra_cflags=list(extra_cflags),
        extra_ldflags=list(extra_ldflags),
        is_python_module=python_module,
        verbose=False,
    )


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
    try:
        build(
            "adalora_fast_cpu",
            _SOURCES,
            "the C++ CPU kernels",
            # no fused multiply-add: the allocator's EMA must round as PEFT's torch ops do
            ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            ["-fopenmp"],
        )
        torch.ops.adalora_fast_cpu.dropout_shrink  # noqa: B018  (raises if the ops did not register)
        torch.ops.adalora_fast_cpu.importance_update  # noqa: B018
        torch.ops.adalora_fast_cpu.keep_mask_to_budget  # noqa: B018
        torch.ops.adalora_fast_cpu.apply_mask  # noqa: B018
        return True
    except Exception as exc:  # a missing compiler or ninja: say so, run the torch path
        _state["error"] = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"adalora_fast: the C++ CPU kernels are unavailable ({_state['error']}); the CPU path uses torch ops "
        "instead (slower; dropout then draws from torch.bernoulli_, a different but equally valid mask stream). "
        "Set ADALORA_FAST_CPU_EXT=0 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def usable(device, dtype: torch.dtype, p: float) -> bool:
    """The dropout kernel applies: dropout on, activations on the CPU, fp32, bf16 or fp16 adapters
    (half adapters, as under autocast, are computed in fp32 and rounded to their dtype)."""
    return (
        p > 0.0
        and torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and available()
    )


def usable_for(t: torch.Tensor) -> bool:
    """The allocator kernels apply to this (representative) adapter tensor: CPU, fp32."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and available()
