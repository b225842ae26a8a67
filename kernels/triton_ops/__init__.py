"""Triton kernels of adalora_fast (installed as ``adalora_fast.kernels``). No nn.Module here.

One module per op, named as the op's module in ``adalora_fast/ops/``: ``adapter_linear``,
``importance``, ``mask``, ``orth``; ``_launch`` is the one place they launch from. Each module's
``compile_variants()`` lists every configuration its launchers can pick (for the compile check,
``bench/compile_check.py``); :func:`compile_variants` chains them.
"""

KERNEL_MODULES = ("adapter_linear", "importance", "mask", "orth")


def compile_variants() -> list:
    """(name, jit fn, signature, constexprs, options) of every configuration of every kernel module."""
    import importlib

    out = []
    for name in KERNEL_MODULES:
        out.extend(importlib.import_module(f"{__name__}.{name}").compile_variants())
    return out
