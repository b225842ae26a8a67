"""RankAllocator: PEFT's AdaLoRA budget schedule and importance-based masking, on flat buffers.

Semantics follow ``peft.tuners.adalora.layer.RankAllocator`` and ``AdaLoraModel.update_and_allocate``:

* steps ``<= tinit``: warm-up, the importance state is updated, nothing is masked;
* steps in ``(tinit, total_step - tfinal)``: the budget falls as a cubic from ``init_bgt`` to
  ``target_bgt``; every ``deltaT`` steps the lowest-scored triplets are masked (``lora_E`` := 0);
* step ``total_step - tfinal``: the final mask at ``target_bgt`` is fixed and the state freed;
* later steps re-apply that frozen mask.

Unlike PEFT: the state is two flat fp32 buffers (no third ``ipt`` copy) updated for all layers by
one op; no host sync in a step (``rank_pattern`` is built when read); a budget equal to the
initial budget masks nothing instead of crashing; exactly ``init_bgt - budget`` triplets are
pruned even when scores tie; a step counter that skips ``total_step - tfinal`` still finalises;
a missing gradient raises an error that says what to do; ``state_dict()``/``load_state_dict()``
carry the importance state across a resume; a step that repeats or goes back (PEFT would update
the importance averages again) raises an error naming both steps, and the final mask is never
fixed on an importance state that saw no step (a resume that lost its state raises instead of
pruning whole layers to rank 0).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops
from .config import AdaLoraConfig
from .ops.layout import FlatLayout, missing_grad_error, split_kinds


def budget_schedule(step: int, config: AdaLoraConfig, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """PEFT's ``RankAllocator.budget_schedule``: (budget, whether this step masks)."""
    tinit, tfinal, total_step = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % config.deltaT == 0


class RankAllocator:
    """Budget schedule and masking for the adapted layers of one model.

    ``layers``: (module name, AdaLoraLinear) in model order; ``adapter_name``: the trained adapter.
    """

    def __init__(self, config: AdaLoraConfig, layers: Sequence, adapter_name: str = "default"):
        self.config = config
        self.adapter_name = adapter_name
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        a = adapter_name
        self.layout = FlatLayout([(m.r[a], m.in_features, m.out_features) for m in self.layers])
        self.init_bgt = self.layout.total_rank
        self.target_bgt = config.target_r * len(self.layers)
        self.refresh()
        self.m1: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None
        self._keep: Optional[torch.Tensor] = None
        self.finalized = False
        # The step of the last successful update_and_allocate (None before the first one); carried in
        # state_dict() so that a resumed run keeps refusing repeated or backward steps.
        self.last_step: Optional[int] = None
        # Bumped whenever the mask changes (a masking step, load_state_dict): readers of rank_pattern
        # (AdaLoraModel.peft_config) rebuild it only then.
        self.mask_version = 0

    # ------------------------------------------------------------------ parameters
    def params(self) -> list:
        """A, B, E of every layer, in layout order (``layout.tensor_index``).

        Cached: reading three ParameterDicts per layer costs ~1 ms at 224 layers. ``refresh()``
        re-reads them (the model calls it when it swaps parameters). Built eagerly, never on first
        use: a compiled forward that reads it (the penalty) must not see it change from None to a
        list, which would recompile the model's graph after the first step.
        """
        return self._params

    def refresh(self) -> None:
        a = self.adapter_name
        ps = []
        for m in self.layers:
            ps += [m.lora_A[a], m.lora_B[a], m.lora_E[a]]
        self.layout.check(ps)
        self._params = ps

    def _ensure_state(self, device) -> None:
        if self.m1 is not None and self.m1.device != device:  # the model was moved after training began
            self.m1, self.m2 = self.m1.to(device), self.m2.to(device)
        if self.m1 is None:
            self.m1 = torch.zeros(self.layout.numel, dtype=torch.float32, device=device)
            self.m2 = torch.zeros(self.layout.numel, dtype=torch.float32, device=device)

    def reset_ipt(self) -> None:
        self.m1 = self.m2 = None

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        return budget_schedule(step, self.config, self.init_bgt, self.target_bgt)

    # ------------------------------------------------------------------ the step
    def update_and_allocate(self, global_step: int) -> Optional[int]:
        """One step of AdaLoRA's schedule; returns the budget it masked to, or None if it did not mask."""
        cfg = self.config
        final_start = cfg.total_step - cfg.tfinal
        last = self.last_step
        if last is not None and global_step <= last:
            what = "repeats" if global_step == last else "goes back from"
            raise RuntimeError(
                f"update_and_allocate(global_step={global_step}) {what} the previous step {last}: steps must "
                "increase (each call updates the importance averages once); nothing was changed"
            )
        params = self.params()
        _, _, E = split_kinds(params)
        if global_step < final_start:
            if self.finalized:
                raise RuntimeError(
                    f"global_step={global_step} comes after the final mask was fixed at step {final_start}; "
                    "the step counter must not go back"
                )
            fresh = self.m1 is None
            self._ensure_state(params[0].device)
            budget, mask_now = self.budget_schedule(global_step)
            # grads=None: the backend reads each .grad (the C++ kernel in C++; a Python list of
            # 672 grads costs ~0.1 ms), and names of missing ones are looked up only on failure.
            try:
                scores = ops.importance_update(
                    self.layout, params, None, self.m1, self.m2, cfg.beta1, cfg.beta2, want_scores=mask_now
                )
            except (RuntimeError, ValueError, TypeError, AttributeError):
                if fresh:  # leave no trace of a failed first call
                    self.reset_ipt()
                missing = next((t for t, p in enumerate(params) if p.grad is None), None)
                if missing is not None:
                    raise missing_grad_error(missing, self.names, self.adapter_name) from None
                raise
            if mask_now:
                self._mask(E, scores, budget)
                self.last_step = global_step
                return budget
            self.last_step = global_step
            return None
        if not self.finalized:
            # PEFT fixes the final mask at exactly total_step - tfinal and crashes if that step
            # is skipped; any first step at or past it finalises here.
            if self.m1 is None:
                # All-zero scores would keep the first target_bgt triplets in layout order and prune
                # whole layers to rank 0. This is what a resume without the allocator state did.
                raise RuntimeError(
                    f"update_and_allocate(global_step={global_step}) would fix the final mask (the final phase "
                    f"starts at step {final_start}), but the allocator has no importance scores: it has not seen "
                    "any step before the final phase. If this run was resumed, restore the allocator state "
                    "(AdaLoraCallback does it from Trainer checkpoints; AdaLoraModel.from_pretrained(..., "
                    "is_trainable=True) from save_pretrained(..., save_allocator_state=True); or "
                    "model.rankallocator.load_state_dict(...)). Nothing was changed."
                )
            self._ensure_state(params[0].device)  # moves the state if the model moved
            scores = ops.triplet_scores(self.layout, self.m1, self.m2)
            self._mask(E, scores, self.target_bgt)
            self.finalized = True
            self.reset_ipt()
            self.last_step = global_step
            return self.target_bgt
        if self._keep.device != E[0].device:
            self._keep = self._keep.to(E[0].device)
        ops.apply_mask(E, self._keep)
        self.last_step = global_step
        return None

    def _mask(self, E, scores, budget: int) -> None:
        n_prune = max(0, self.init_bgt - budget)
        keep = ops.keep_mask_to_budget(scores, n_prune)
        ops.apply_mask(E, keep)
        self._keep = keep
        self.mask_version += 1

    # ------------------------------------------------------------------ reporting and resume
    @property
    def rank_pattern(self) -> Optional[dict]:
        """``{"<module>.lora_E.<adapter>": [bool] * r}`` as PEFT's ``config.rank_pattern``; None before any mask.

        Built from the device mask when read (one host sync here, none in the training step).
        """
        if self._keep is None:
            return None
        flat = self._keep.tolist()
        out = {}
        for name, o, r in zip(self.names, self.layout.triplet_offsets, self.layout.ranks):
            out[f"{name}.lora_E.{self.adapter_name}"] = flat[o : o + r]
        return out

    def state_dict(self) -> dict:
        """Importance state, current mask, phase and last step, for resuming a run."""
        sd = {
            "finalized": torch.tensor(self.finalized),
            "ranks": torch.tensor(self.layout.ranks, dtype=torch.int64),
        }
        if self.m1 is not None:
            sd["exp_avg_ipt"] = self.m1
            sd["exp_avg_unc"] = self.m2
        if self._keep is not None:
            sd["keep"] = self._keep
        if self.last_step is not None:
            sd["last_step"] = torch.tensor(self.last_step, dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        ranks = [int(v) for v in sd["ranks"].tolist()]
        if ranks != self.layout.ranks:
            raise ValueError(f"allocator state is for ranks {ranks}, this model's layers have {self.layout.ranks}")
        dev = self.layers[0].lora_A[self.adapter_name].device if self.layers else torch.device("cpu")
        for key in ("exp_avg_ipt", "exp_avg_unc"):
            if key in sd and sd[key].numel() != self.layout.numel:
                raise ValueError(f"allocator state {key} has {sd[key].numel()} elements, expected {self.layout.numel}")
        if "keep" in sd and sd["keep"].numel() != self.layout.total_rank:
            raise ValueError(f"allocator mask has {sd['keep'].numel()} entries, expected {self.layout.total_rank}")
        self.finalized = bool(sd["finalized"])
        self.m1 = sd["exp_avg_ipt"].to(dev, torch.float32).clone() if "exp_avg_ipt" in sd else None
        self.m2 = sd["exp_avg_unc"].to(dev, torch.float32).clone() if "exp_avg_unc" in sd else None
        self._keep = sd["keep"].to(dev, torch.bool).clone() if "keep" in sd else None
        # A state written before last_step existed has none: the step order is then checked from the next call on.
        self.last_step = int(sd["last_step"]) if "last_step" in sd else None
        self.mask_version += 1
