"""The eager adapted layer's autograd node in C++ (``csrc/adapter_linear_node.cpp``), built on first use.

On a small layer the adapter's host time on a GPU step is mostly Python, and a Python
``torch.autograd.Function`` alone costs about a quarter of PEFT LoRA's whole adapter overhead per
layer step (ctx object, ``save_for_backward``, the backward's Python frame, ``needs_input_grad``,
the gradient tuple's checks). This node does that work in C++ and the backward's orchestration with
it; the implementations' kernels stay in Python and are called once each way
(``bench/README.md``, "Host path", has the measurements). Results are the same bit for bit as the
Python Function's, which stays the path when the node is off or cannot be built.

Built with ``torch.utils.cpp_extension`` (``cpu_ext.build``: ninja, cached in
``TORCH_EXTENSIONS_DIR``) the first time an eager layer runs. ``ADALORA_FAST_NODE=0`` (read then,
once per process) keeps the Python Function; if the build fails, one warning says why and the
Python Function runs.
"""

from __future__ import annotations

import os
import threading
import warnings

from . import cpu_ext

_SOURCES = ("adapter_linear_node.cpp",)
_lock = threading.Lock()
_state: dict = {"module": None, "error": None}  # module: the loaded module, or False (off or unbuildable)


def enabled() -> bool:
    return os.environ.get("ADALORA_FAST_NODE", "1").strip().lower() not in ("0", "false", "no", "")


def attach_fn():
    """``adalora_fast_node.attach`` (its signature: the C++ source's header), or None when the node
    is switched off or could not be built (then one warning has said why)."""
    with _lock:
        if _state["module"] is None:
            _state["module"] = _load()
    mod = _state["module"]
    return mod.attach if mod else None


def _load():
    if not enabled():
        return False
    try:
        return cpu_ext.build(
            "adalora_fast_node", _SOURCES, "the adapted layer's C++ autograd node", ["-O2"], python_module=True
        )
    except Exception as exc:  # a missing compiler or ninja: say so, run the Python Function
        _state["error"] = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"adalora_fast: the C++ autograd node is unavailable ({_state['error']}); the eager layer uses a "
        "Python torch.autograd.Function instead (the same results, more host time per layer call). "
        "Set ADALORA_FAST_NODE=0 to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )
    return False
