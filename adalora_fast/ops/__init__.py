"""Every op the API calls, one module per op, each a ``torch.library`` custom operator in the
``adalora_fast`` namespace: schema, fake (meta) implementation, autograd where it has a gradient,
and its implementations by device side by side. PyTorch's dispatcher is the dispatch point, so
``torch.compile`` keeps a model's graph whole and ``meta`` tensors work.

Each op has the same name in every layer of the package: ``ops/<module>.py`` registers it,
``kernels/triton_ops/<module>.py`` holds its Triton kernels and ``csrc/<module>_cpu.cpp`` its C++
CPU kernels (where it has them), ``tests/test_<module>.py`` compares them with ``reference.py``.

==================================  =====================================================  =====================
op (``torch.ops.adalora_fast``)     what                                                   module
==================================  =====================================================  =====================
``adapter_linear`` (+ backward)     the whole adapted layer, forward and backward          ``adapter_linear.py``
``importance_update``               PEFT's ``update_ipt`` of every layer + triplet scores  ``importance.py``
``triplet_scores``                  triplet scores of the current state                    ``importance.py``
``keep_mask_to_budget``             which triplets survive a budget                        ``mask.py``
``apply_mask``                      zero the pruned ``lora_E`` entries in place            ``mask.py``
``orth_penalty`` (+ backward)       PEFT's orthogonal regulariser                          ``orth.py``
==================================  =====================================================  =====================

``dropout_keep_mask`` (``adapter_linear.py``, not an op) returns the dropout keep mask an
implementation draws for a seed, for tests and debugging.

Implementations: CPU "torch" (vectorised torch ops, the C++ kernels of ``csrc/`` where they exist,
``cpu_ext.py``), CUDA "triton" (``kernels/triton_ops/``, installed as ``adalora_fast.kernels``).
``ADALORA_FAST_BACKEND=reference|torch|triton`` forces one (for tests: "reference" runs
``reference.py``, "triton" on CPU tensors needs ``TRITON_INTERPRET=1``); it is read by the
implementations when they run, never in a traced region. Registration and the choice of
implementation live in ``registry.py``; the shared layout conventions (tensor index, ranknum
epsilon, the missing-gradient error, FlatLayout) in ``layout.py``.
"""

from __future__ import annotations

import torch

from .adapter_linear import adapter_linear, dropout_keep_mask
from .importance import importance_update, triplet_scores
from .layout import FlatLayout
from .mask import apply_mask, keep_mask_to_budget
from .orth import orth_penalty
from .registry import IMPLS, impl_for

__all__ = [
    "IMPLS",
    "FlatLayout",
    "adapter_linear",
    "apply_mask",
    "backend_name",
    "dropout_keep_mask",
    "importance_update",
    "keep_mask_to_budget",
    "orth_penalty",
    "triplet_scores",
]


def backend_name(device: torch.device) -> str:
    """Which implementation the ops run on ``device`` ("reference", "torch" or "triton")."""
    return impl_for(torch.device(device))
