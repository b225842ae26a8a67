"""The one dispatch point: every op the API calls, and the choice of backend that runs it.

Backends (each a module with the same functions):

* ``torch``: vectorised PyTorch (``torch_backend.py``), the default on the CPU;
* ``triton``: Triton kernels (``triton_backend.py``), the default on CUDA when triton imports;
  on CPU tensors it runs under ``TRITON_INTERPRET=1`` (set before triton is imported);
* ``reference``: ``reference.py``, PEFT's math one tensor at a time.

``ADALORA_FAST_BACKEND=reference|torch|triton`` forces one. It is read at every call, so tests
and users can switch it with the environment; a forced backend that cannot run raises an error
that says why, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

import torch

from .layout import FlatLayout

__all__ = [
    "BACKENDS",
    "FlatLayout",
    "backend_name",
    "get_backend",
    "adapter_linear",
    "importance_update",
    "triplet_scores",
    "keep_mask_to_budget",
    "apply_mask",
    "orth_penalty",
]

BACKENDS = ("reference", "torch", "triton")
_ENV = "ADALORA_FAST_BACKEND"
_triton_ok: Optional[bool] = None


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
            importlib.import_module(__name__ + ".triton_backend")
            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


def backend_name(device: torch.device) -> str:
    """Which backend runs ops on ``device``: the forced one, else triton on CUDA, else torch."""
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        return forced
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def get_backend(device: torch.device):
    name = backend_name(device)
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"{_ENV}=triton on {device.type} tensors needs TRITON_INTERPRET=1 in the environment "
                "before triton is imported (Triton's CPU interpreter); on a GPU use CUDA tensors"
            )
        try:
            return importlib.import_module(__name__ + ".triton_backend")
        except ImportError as exc:
            raise RuntimeError(f"{_ENV}=triton but the triton backend cannot be imported: {exc}") from exc
    return importlib.import_module(f"{__name__}.{name}_backend")


def _layer_backend(device: torch.device, rank: int):
    """The backend for one adapted layer: the Triton kernels are compiled for r <= 64, so a larger
    rank on CUDA runs the torch backend by default (same math); a forced triton raises instead."""
    mod = get_backend(device)
    if mod.__name__.endswith("triton_backend") and not os.environ.get(_ENV, "").strip():
        from ..kernels import _launch

        if rank > _launch.RANK_PADS[-1]:
            return importlib.import_module(__name__ + ".torch_backend")
    return mod


def _new_seed() -> int:
    # Drawn from torch's default CPU generator: torch.manual_seed makes dropout reproducible,
    # and no device sync happens whatever device the activations live on.
    return int(torch.randint(0, 2**62, (1,)).item())


def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum,  # [1] tensor or a number
    dropout_p: float = 0.0,
    training: bool = True,
    fan_in_fan_out: bool = False,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``x Wᵀ + b + ((dropout(x) Aᵀ) * E*scaling/(ranknum+1e-5)) Bᵀ`` with PEFT's dtype rules.

    x [..., k] (any leading shape); weight [d, k] ([k, d] if ``fan_in_fan_out``); bias [d] or
    None; lora_A [r, k]; lora_E [r, 1]; lora_B [d, r]; ranknum [1]. Dropout applies in training
    only, with keep mask drawn from ``seed`` (a fresh one from torch's CPU generator if None).
    Returns [..., d] in the base layer's dtype (autocast's dtype under autocast). Under autocast
    everything runs in the autocast dtype; without it, the adapter term runs in lora_A's dtype.
    """
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = _new_seed()
    if not torch.is_tensor(ranknum):
        ranknum = torch.tensor([float(ranknum)], dtype=torch.float32, device=x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        args = [t.to(cdt) if t is not None else None for t in (x2, weight, bias, lora_A, lora_E, lora_B)]
        with torch.autocast(dev, enabled=False):
            out = _layer_backend(x.device, lora_A.shape[0]).adapter_linear(
                *args, scaling, ranknum, p, seed, fan_in_fan_out
            )
    else:
        out = _layer_backend(x.device, lora_A.shape[0]).adapter_linear(
            x2, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, p, seed, fan_in_fan_out
        )
    return out.view(*lead, out.shape[-1])


def importance_update(
    layout: FlatLayout,
    params: Sequence[torch.Tensor],
    grads: Optional[Sequence[Optional[torch.Tensor]]],
    m1: torch.Tensor,
    m2: torch.Tensor,
    beta1: float,
    beta2: float,
    want_scores: bool = False,
) -> Optional[torch.Tensor]:
    """PEFT's ``update_ipt`` for every adapter tensor at once, in place on the flat fp32 state.

    ``params``/``grads``: A, B, E of every layer in ``layout`` order (``grads=None``: each
    parameter's ``.grad``, which the C++ kernel reads itself); m1, m2: [layout.numel] fp32.
    A missing gradient raises before any state changes. Returns the [sum(r)] triplet scores
    ``E + mean_row(A) + mean_col(B)`` of the element scores ``m1 * m2`` when ``want_scores``,
    else None. No host sync.
    """
    return get_backend(m1.device).importance_update(layout, params, grads, m1, m2, beta1, beta2, want_scores)


def triplet_scores(layout: FlatLayout, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """[sum(r)] triplet scores of the current state (no update)."""
    return get_backend(m1.device).triplet_scores(layout, m1, m2)


def keep_mask_to_budget(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool [sum(r)]: False for exactly ``n_prune`` lowest-scored triplets (stable on ties)."""
    return get_backend(scores.device).keep_mask_to_budget(scores, n_prune)


def apply_mask(E_params: Sequence[torch.Tensor], keep: torch.Tensor, ranks: Sequence[int]) -> None:
    """Zero the pruned entries of every ``lora_E`` in place (keep: [sum(r)] bool, layer order)."""
    if E_params:
        get_backend(keep.device).apply_mask(E_params, keep, ranks)


def orth_penalty(layout: FlatLayout, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F over all matrices (differentiable scalar)."""
    dev = params[0].device if params else torch.device("cpu")
    return get_backend(dev).orth_penalty(layout, params)
