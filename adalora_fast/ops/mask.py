"""Masking to the budget as registered operators: pick the triplets to keep, zero the rest of E.

    adalora_fast::keep_mask_to_budget(Tensor scores, int n_prune) -> Tensor   (bool, like scores)
    adalora_fast::apply_mask(Tensor(a!)[] lora_E, Tensor keep) -> ()

``keep_mask_to_budget``: False for exactly ``n_prune`` lowest-scored triplets, ties (and NaNs,
which sort last) broken by position, as a stable sort would (``reference.keep_mask_to_budget``).
CPU fp32: an O(n) C++ selection (``csrc/mask_cpu.cpp``); otherwise (CUDA, other dtypes) one
stable ``torch.sort`` of Σr scores on the device, no host sync.

``apply_mask``: zero every pruned ``lora_E`` entry in place, as PEFT's ``masked_fill_`` (``keep``:
[Σr] bool in layer order, ``lora_E[i]`` [r_i, 1]); each E's version counter moves, so a backward
through a stale saved E fails loudly (the Triton path moves them after its launch). CPU fp32: one
C++ call (``csrc/mask_cpu.cpp``); CUDA: one Triton launch per E dtype (``kernels/triton_ops/mask.py``);
otherwise a split and one foreach multiply.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import cpu_ext
from .registry import define_op, impl_for


def _keep_sort(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        keep[torch.sort(scores, stable=True).indices[:n_prune]] = False
    return keep


def _keep_mask_to_budget_kernel(scores, n_prune):
    n = scores.numel()
    if scores.dim() != 1:
        raise ValueError(f"keep_mask_to_budget: scores must be 1-D, got shape {tuple(scores.shape)}")
    if not 0 <= n_prune <= n:
        raise ValueError(f"keep_mask_to_budget: n_prune={n_prune} must lie in [0, {n}]")
    impl = impl_for(scores.device)
    if impl == "reference":
        from .. import reference as ref

        return ref.keep_mask_to_budget(scores, n_prune)
    if impl == "torch" and cpu_ext.usable_for(scores):
        return torch.ops.adalora_fast_cpu.keep_mask_to_budget(scores.contiguous(), int(n_prune))
    return _keep_sort(scores, n_prune)


keep_mask_to_budget_op = define_op(
    "keep_mask_to_budget(Tensor scores, int n_prune) -> Tensor",
    _keep_mask_to_budget_kernel, lambda scores, n_prune: torch.empty_like(scores, dtype=torch.bool),
)  # fmt: skip


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton mask kernel is built for


def _apply_mask_kernel(lora_E, keep):
    total = sum(e.shape[0] for e in lora_E)
    if keep.dtype != torch.bool or keep.dim() != 1 or keep.numel() != total:
        raise ValueError(
            f"apply_mask: keep must be a 1-D bool tensor of {total} entries (the ranks' sum), "
            f"got {keep.dtype} {tuple(keep.shape)}"
        )
    if not lora_E:
        return
    for i, e in enumerate(lora_E):
        if e.device != keep.device:
            raise ValueError(f"apply_mask: lora_E[{i}] is on {e.device}, keep on {keep.device}")
    impl = impl_for(keep.device)
    if impl == "triton" and not all(e.dtype in _KERNEL_DTYPES for e in lora_E):
        impl = "torch"  # the same product in torch ops (fp64 adapters of an fp64 model)
    with torch.no_grad():
        if impl == "reference":
            from .. import reference as ref

            ref.apply_mask(lora_E, keep)
        elif impl == "triton":
            from ..kernels import mask as _km

            _km.apply_mask(lora_E, keep)
            for e in lora_E:  # the kernel writes through raw pointers: move versions as an in-place op would
                torch.autograd.graph.increment_version(e)
        elif (
            keep.device.type == "cpu"
            and cpu_ext.usable_for(lora_E[0])
            and all(e.dtype == torch.float32 and e.is_contiguous() for e in lora_E)
        ):
            torch.ops.adalora_fast_cpu.apply_mask(list(lora_E), keep.contiguous())  # bumps versions itself
        else:
            factors = keep.to(lora_E[0].dtype).view(-1, 1).split([e.shape[0] for e in lora_E])
            torch._foreach_mul_(list(lora_E), list(factors))


apply_mask_op = define_op(
    "apply_mask(Tensor(a!)[] lora_E, Tensor keep) -> ()", _apply_mask_kernel, lambda lora_E, keep: None
)


def keep_mask_to_budget(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool [sum(r)]: False for exactly ``n_prune`` lowest-scored triplets (stable on ties)."""
    return keep_mask_to_budget_op(scores, int(n_prune))


def apply_mask(lora_E: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero the pruned entries of every ``lora_E`` in place (keep: [sum(r)] bool, layer order)."""
    if lora_E:
        with torch.no_grad():
            apply_mask_op(list(lora_E), keep)
