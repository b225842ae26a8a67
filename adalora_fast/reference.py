"""Pure-PyTorch reference of every op, written to mirror PEFT's AdaLoRA math line by line.

This module is the oracle every implementation of every op in ``ops/`` is tested against (one
function per op); ``ADALORA_FAST_BACKEND=reference`` runs it for tests, never as a production path. It is deliberately slow
and plain: one tensor at a time, in PEFT's operation order (``peft/tuners/adalora/layer.py`` and
``model.py``, peft 0.21.x). Each function says which PEFT lines it mirrors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .ops.layout import RANKNUM_EPS


def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_E: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    ranknum,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    keep_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``SVDLinear.forward``: ``base(x) + (dropout(x) @ (A*E).T @ B.T) * scaling / (ranknum + 1e-5)``.

    Shapes: x [..., k]; weight [d, k] ([k, d] with ``fan_in_fan_out``, transformers' Conv1D);
    bias [d] or None; lora_A [r, k]; lora_E [r, 1]; lora_B [d, r]; keep_mask (bool, x's shape) is
    the dropout keep mask, so dropout(x) = x * keep_mask / (1 - dropout_p). Returns [..., d] in the
    base layer's dtype (PEFT adds the fp32 adapter term in place into the base result).
    """
    w = weight.t() if fan_in_fan_out else weight
    result = F.linear(x, w, bias)
    x = x.to(lora_A.dtype) if x.dtype != lora_A.dtype else x
    if keep_mask is not None:
        x = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    result += (x @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + RANKNUM_EPS)
    return result


def importance_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_ipt: torch.Tensor,
    exp_avg_unc: torch.Tensor,
    beta1: float,
    beta2: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``RankAllocator.update_ipt`` for one parameter: returns the new (exp_avg_ipt, exp_avg_unc)
    and how many elements were skipped.

    ipt = |p * grad|; m1 = b1*m1 + (1-b1)*ipt; m2 = b2*m2 + (1-b2)*|ipt - m1| (with the new m1).
    Unlike PEFT, an element whose ipt is not finite keeps its old m1 and m2 (PEFT lets a NaN or
    inf into both averages, where it stays until the final phase).
    """
    ipt = (p * grad).abs().detach()
    new_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt
    new_unc = beta2 * exp_avg_unc + (1 - beta2) * (ipt - new_ipt).abs()
    ok = torch.isfinite(ipt)
    return torch.where(ok, new_ipt, exp_avg_ipt), torch.where(ok, new_unc, exp_avg_unc), int((~ok).sum())


def element_score(exp_avg_ipt: torch.Tensor, exp_avg_unc: torch.Tensor) -> torch.Tensor:
    """``RankAllocator._element_score``: sensitivity times uncertainty, elementwise."""
    return exp_avg_ipt * exp_avg_unc


def triplet_scores(score_A: torch.Tensor, score_E: torch.Tensor, score_B: torch.Tensor) -> torch.Tensor:
    """``mask_to_budget``'s per-triplet score for one layer: E + mean_row(A) + mean_col(B).

    score_A [r, k], score_E [r, 1], score_B [d, r] (element scores) -> [r].
    """
    comb_A = torch.mean(score_A, dim=1, keepdim=True)
    comb_B = torch.mean(score_B, dim=0, keepdim=False).view(-1, 1)
    ipt_AB = torch.cat([comb_A, comb_B], dim=1).sum(dim=1, keepdim=False)
    return score_E.view(-1) + ipt_AB.view(-1)


def keep_mask_to_budget(all_scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Which triplets survive when ``n_prune`` of them must go: a bool vector like ``all_scores``.

    PEFT prunes every triplet whose score is ``<= kthvalue(scores, n_prune)``, which prunes more
    than ``n_prune`` when scores tie at the threshold (all scores are 0 right after a zero-init
    warm-up) and crashes for ``n_prune == 0``. Here exactly ``n_prune`` triplets are pruned: the
    lowest scores, ties broken by position (a stable sort). Without ties this equals PEFT's rule.
    """
    n = all_scores.numel()
    if not 0 <= n_prune <= n:
        raise ValueError(f"n_prune={n_prune} must lie in [0, {n}]")
    keep = torch.ones(n, dtype=torch.bool, device=all_scores.device)
    if n_prune > 0:
        order = torch.sort(all_scores, stable=True).indices
        keep[order[:n_prune]] = False
    return keep


def apply_mask(lora_Es: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """``mask_to_budget``'s masking: ``lora_E.masked_fill_(~is_dict[name], 0.0)`` per layer, in place
    (``keep``: [sum(r)] bool, the layers' triplets in order)."""
    with torch.no_grad():
        for p, k in zip(lora_Es, keep.split([e.shape[0] for e in lora_Es])):
            p.masked_fill_(~k.view(-1, 1), 0.0)


def orth_penalty(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``AdaLoraModel.forward``'s regulariser: mean over all A and B of ||A Aᵀ - I||_F, ||Bᵀ B - I||_F.

    Not squared (PEFT's form). Matrices with r = 0 count in the mean with a norm of 0, as in PEFT.
    """
    regu_loss = 0
    num_param = 0
    for p, is_A in [(a, True) for a in lora_As] + [(b, False) for b in lora_Bs]:
        para_cov = p @ p.T if is_A else p.T @ p
        eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
        eye.requires_grad = False
        num_param += 1
        regu_loss += torch.norm(para_cov - eye, p="fro")
    if num_param == 0:
        return torch.zeros(())
    return regu_loss / num_param
