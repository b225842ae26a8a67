"""How the ops are registered and which implementation runs: what every op module shares apart
from the flat layout (``layout.py``).

Registration: every op is a ``torch.library`` operator in the ``adalora_fast`` namespace
(:data:`LIB`), defined by :func:`define_op` with one Python kernel for CPU and CUDA and a fake
(meta) implementation; an op with a gradient adds its Autograd kernel to :data:`LIB` itself.

Dispatch: PyTorch's dispatcher picks the kernel by device; the kernel then picks its
implementation with :func:`impl_for` ("triton" on CUDA, "torch" otherwise, or the one
``ADALORA_FAST_BACKEND`` forces: :func:`forced_impl`). The implementations run under
:func:`no_autocast`, and the forced reference ones take their gradients inside the op with
:func:`autograd_inside_op`.
"""

from __future__ import annotations

import contextlib
import os

import torch

IMPLS = ("reference", "torch", "triton")
_ENV = "ADALORA_FAST_BACKEND"
AUTOCAST_DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------- dispatch
# os.environ keeps the encoded variables in its own dict, ``_data``, which every write through
# os.environ (monkeypatch.setenv, mock.patch.dict included) updates: one C-level lookup there costs a
# fraction of os.environ.get's four Python frames, and forced_impl runs on every layer call.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV) if hasattr(os.environ, "encodekey") else None


def forced_impl() -> str:
    """``ADALORA_FAST_BACKEND`` ('' when unset). Read by the op implementations when they run, which is
    never inside a traced region (a registered op is opaque to ``torch.compile``), and by
    ``adapter_linear._plain_under_compile`` while torch.compile traces a layer (a forced one keeps the op)."""
    if _ENVIRON_DATA is not None and _ENV_KEY is not None:
        raw = _ENVIRON_DATA.get(_ENV_KEY)
        if raw is None:  # unset: the common case returns first
            return ""
        forced = os.environ.decodevalue(raw)
    else:
        forced = os.environ.get(_ENV, "")
    forced = forced.strip().lower()
    if forced and forced not in IMPLS:
        raise ValueError(f"{_ENV}={forced!r}: expected one of {', '.join(IMPLS)}")
    return forced


def impl_for(device: torch.device) -> str:
    """Which implementation an op runs on ``device``: the forced one, else 'triton' on CUDA, else 'torch'.

    A forced 'triton' on a non-CUDA device needs Triton's interpreter (``TRITON_INTERPRET=1`` before
    triton is imported) and raises otherwise: never a silent fallback.
    """
    forced = forced_impl()
    name = forced or ("triton" if device.type == "cuda" else "torch")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"{_ENV}=triton on {device.type} tensors needs TRITON_INTERPRET=1 in the environment before "
            "triton is imported (Triton's CPU interpreter); on a GPU use CUDA tensors"
        )
    return name


def no_autocast(device: torch.device):
    """Autocast stays on inside a registered op's implementation: each implementation runs under
    this, so it computes in the dtypes it was given (the public wrappers apply autocast's rules)."""
    dev = device.type
    if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------- registration
LIB = torch.library.Library("adalora_fast", "FRAGMENT")


def define_op(schema: str, kernel, fake, tags=()):
    """Register ``adalora_fast::<schema>`` with one Python kernel for CPU and CUDA (it picks its
    implementation with :func:`impl_for`) and a fake (meta) implementation; returns the OpOverload.

    torch.library.Library rather than torch.library.custom_op for ops on the training step's hot
    path: custom_op's Python shims (argument defaults, a dynamo-disable wrapper, version bumps of
    every mutated tensor in Python) cost more than these ops' own work on small models.
    """
    name = schema.split("(", 1)[0]
    LIB.define(schema, tags=tags)
    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)
    torch.library.register_fake(f"adalora_fast::{name}", fake, lib=LIB)
    return getattr(torch.ops.adalora_fast, name).default


def autograd_inside_op():
    """A context in which autograd records again, inside an op's implementation (which runs below
    the Autograd dispatch key, where ``torch.enable_grad()`` alone records nothing). Only the forced
    reference implementations use it: they take their gradients by autograd of ``reference.py``."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradOther, C.DispatchKey.AutogradNestedTensor, C.DispatchKey.AutogradFunctionality):
        exclude = exclude.remove(key)
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)
