"""The reference backend (``ADALORA_FAST_BACKEND=reference``): ``reference.py`` behind the ops API.

One tensor at a time, in PEFT's order. Slow on purpose; it exists so that a whole model can be
run on the oracle's math, and so that the other backends have one thing to be compared with.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference as ref
from .layout import FlatLayout, grads_of
from .torch_backend import dropout_keep_mask


def adapter_linear(x, weight, bias, A, E, B, scaling, ranknum, dropout_p, seed, fan_in_fan_out):
    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device, A.dtype) if dropout_p > 0.0 else None
    return ref.adapter_linear(x, weight, bias, A, E, B, scaling, ranknum, keep, dropout_p, fan_in_fan_out)


def _views(layout: FlatLayout, buf: torch.Tensor, t: int) -> torch.Tensor:
    o = layout.offsets[t]
    return buf[o : o + layout.numel_of(t)].view(layout.tensor_shapes[t])


def importance_update(layout, params, grads, m1, m2, beta1, beta2, want_scores) -> Optional[torch.Tensor]:
    grads = grads_of(params, grads)  # checked first: the loop below updates the state tensor by tensor
    with torch.no_grad():
        for t, (p, g) in enumerate(zip(params, grads)):
            v1, v2 = _views(layout, m1, t), _views(layout, m2, t)
            n1, n2 = ref.importance_update(p, g, v1, v2, beta1, beta2)
            v1.copy_(n1)
            v2.copy_(n2)
    return triplet_scores(layout, m1, m2) if want_scores else None


def triplet_scores(layout: FlatLayout, m1, m2) -> torch.Tensor:
    out = []
    for i in range(layout.n_layers):
        sA, sB, sE = (
            ref.element_score(_views(layout, m1, 3 * i + j), _views(layout, m2, 3 * i + j)) for j in range(3)
        )
        out.append(ref.triplet_scores(sA, sE, sB))
    if not out:
        return torch.zeros(0, device=m1.device)
    return torch.cat(out)


keep_mask_to_budget = ref.keep_mask_to_budget


def apply_mask(E_params: Sequence[torch.Tensor], keep: torch.Tensor, ranks: Sequence[int]) -> None:
    with torch.no_grad():
        for p, k in zip(E_params, keep.split(list(ranks))):
            p.masked_fill_(~k.view(-1, 1), 0.0)


def orth_penalty(layout: FlatLayout, params: Sequence[torch.Tensor]) -> torch.Tensor:
    return ref.orth_penalty(params[0::3], params[1::3])
