"""Every op the API calls, one module per op, each a ``torch.library`` custom operator in the
``adalora_fast`` namespace: schema, fake (meta) implementation, autograd where it has a gradient,
and its implementations by device side by side. PyTorch's dispatcher is the dispatch point, so
``torch.compile`` keeps a model's graph whole and ``meta`` tensors work.

=============================  =====================================================  ===============
op (``torch.ops.adalora_fast``)  what                                                   module
=============================  =====================================================  ===============
``adapter_linear`` (+backward)  the whole adapted layer, forward and backward          ``linear.py``
``importance_update``           PEFT's ``update_ipt`` of every layer + triplet scores  ``importance.py``
``triplet_scores``              triplet scores of the current state                    ``importance.py``
``keep_mask_to_budget``         which triplets survive a budget                        ``mask.py``
``apply_mask``                  zero the pruned ``lora_E`` entries in place            ``mask.py``
``orth_penalty`` (+backward)    PEFT's orthogonal regulariser                          ``orth.py``
=============================  =====================================================  ===============

Implementations: CPU "torch" (vectorised torch ops, the C++ kernels of ``csrc/`` where they exist,
``cpu_ext.py``), CUDA "triton" (``kernels/``). ``ADALORA_FAST_BACKEND=reference|torch|triton``
forces one (for tests: "reference" runs ``reference.py``, "triton" on CPU tensors needs
``TRITON_INTERPRET=1``); it is read by the implementations when they run, never in a traced region.
Shared conventions (tensor index, ranknum epsilon, the missing-gradient error, FlatLayout) live in
``layout.py``.
"""

from __future__ import annotations

import torch

from .importance import importance_update, triplet_scores
from .layout import IMPLS, FlatLayout, impl_for
from .adapter_linear import adapter_linear, keep_mask
from .mask import apply_mask, keep_mask_to_budget
from .orth import orth_penalty

__all__ = [
    "IMPLS",
    "FlatLayout",
    "adapter_linear",
    "apply_mask",
    "backend_name",
    "importance_update",
    "keep_mask",
    "keep_mask_to_budget",
    "orth_penalty",
    "triplet_scores",
]


def backend_name(device: torch.device) -> str:
    """Which implementation the ops run on ``device`` ("reference", "torch" or "triton")."""
    return impl_for(torch.device(device))
