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
pruning whole layers to rank 0); a NaN or inf gradient element is left out of the importance
averages for that step (PEFT lets it in, where it stays until the final phase and keeps its
triplet from ever being pruned), with one warning that names the tensors
(``nonfinite_skipped`` counts them).

Checked at every call, before any op runs (the ops address the flat state by the cached layout,
so a tensor of another size would have them read or write another tensor's state): every adapter
tensor and its gradient has the shape the layout was built for (``p.data = ...`` keeps the
parameter object, so the cache cannot see it), and on CUDA all of them are on one device; the
error names the parameter. A step counter that advances while the adapter weights stay the same
and the gradients keep accumulating (a micro-batch counter under gradient accumulation: the
schedule would run that many times too fast) is warned about once. A model whose adapters were
loaded without the allocator state (``from_pretrained(..., is_trainable=True)`` of a directory
without it, ``load_state_dict`` of trained adapters) refuses to continue its schedule at a step
> 0: the importance averages of the earlier steps are gone, so the run would not be the one it
continues; starting again from step 0 is a new schedule and is allowed.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from typing import Optional, Sequence

import torch

from . import distributed, ops
from .config import AdaLoraConfig
from .ops.layout import FlatLayout, missing_grad_error, split_kinds, tensor_name

_SHAPE, _GRAD, _DEVICE = (operator.attrgetter(n) for n in ("shape", "grad", "device"))


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
        # (r, k, d) with k the columns of lora_A (Conv2d: in_channels * kh * kw, PEFT's SVDConv2d)
        self.layout = FlatLayout([(m.r[a], m.lora_in_features, m.out_features) for m in self.layers])
        self.init_bgt = self.layout.total_rank
        self.target_bgt = config.target_r * len(self.layers)
        # The module holding FSDP1 units (AdaLoraModel sets itself): where flat-shard ranges are read.
        self.shard_root = None
        self._state_local = False  # m1, m2 hold this rank's shard only (set by update_and_allocate under FSDP)
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
        # int64 [3 * layers] on the state's device: gradient elements left out of the averages
        # because |p * grad| was NaN or inf, per adapter tensor (see nonfinite_skipped).
        self._skipped: Optional[torch.Tensor] = None
        self._host_skipped: Optional[torch.Tensor] = None  # CUDA: its pinned copy, and the event of that copy
        self._host_ready = None
        self._warned_nonfinite = False
        # Set (to where the adapters came from) when trained adapters were loaded into this fresh
        # allocator without its state; the first step > 0 then raises (see update_and_allocate).
        self.loaded_without_state: Optional[str] = None
        # (version of a watched lora_A, weak ref to its gradient) at the previous call: the same
        # weights and the same, still accumulating, gradient at the next call mean that no optimizer
        # step came between the two.
        self._watch: Optional[tuple] = None
        self._warned_still = False

    # ------------------------------------------------------------------ parameters
    def params(self) -> list:
        """A, B, E of every layer, in layout order (``layout.tensor_index``).

        Cached: reading three ParameterDicts per layer through their API costs ~1 ms at 224 layers.
        Eagerly, each call checks that the cache still holds the modules' parameter objects (one
        dict lookup and identity test per tensor, ~50 us at 224 layers) and calls ``refresh()`` when
        something replaced them (FSDP wrapping, ``load_state_dict(..., assign=True)``, ``resize``);
        ``.to()`` and ``to_empty()`` keep the objects. While torch.compile traces, the cache is
        returned as is. Built eagerly, never on first use: a compiled forward that reads it (the
        penalty) must not see it change from None to a list, which would recompile the model's graph
        after the first step.
        """
        if not torch.compiler.is_compiling() and not self._current():
            self.refresh()
        return self._params

    @property
    def shards(self) -> Optional["distributed.ShardedAdapters"]:
        """This rank's shard geometry when the adapters are FSDP shards now, else None."""
        self.params()
        return self._shards

    def _current(self) -> bool:
        """Whether the cached parameters are the modules' own and keep their FSDP1 state (flattened
        or not, a 1-D piece or a whole view)."""
        p0 = self._params[0] if self._params else None
        return all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._params)) and (
            p0 is None or (distributed.is_flat_shard(p0), p0.dim()) == self._state0
        )

    def refresh(self) -> None:
        """Re-read the parameters from the modules. FSDP shards (DTensors, FSDP1 flat pieces) get a
        ``distributed.ShardedAdapters`` (the allocator then works on this rank's shard); whole
        tensors are checked against the layout."""
        a = self.adapter_name
        ps, dicts = [], []
        for m in self.layers:
            for pd in (m.lora_A, m.lora_B, m.lora_E):
                ps.append(pd[a])
                dicts.append(pd._parameters)
        old = getattr(self, "_shard_cache", None)
        if old is not None and len(old.params) == len(ps) and all(map(operator.is_, old.params, ps)):
            shards = old  # the same shards again (FSDP2 swaps whole and sharded parameters at each forward)
        else:
            shards = distributed.shards_of(self.layout, ps, self.shard_root, self.names, a)
        if shards is None:
            self.layout.check(ps)
        else:
            self._shard_cache = shards
        self._shards = shards
        self._dicts, self._keys = dicts, [a] * len(ps)
        self._state0 = (distributed.is_flat_shard(ps[0]), ps[0].dim()) if ps else None
        self._params = ps
        self._sizes = [torch.Size(s) for s in self.layout.tensor_shapes]
        # the lora_A watched for "no optimizer step since the last call": the first non-empty one
        self._watched = next((t for t in range(0, len(ps), 3) if ps[t].numel()), None)
        self._watch = None

    def check_inputs(self, params) -> None:
        """Raise ``ValueError`` naming the parameter if an adapter tensor or its gradient no longer
        has the layout's shape, or (CUDA) if they are not all on one device. Each call: a parameter
        keeps its identity through ``p.data = ...``, which can change all three."""
        grads = list(map(_GRAD, params))
        try:
            ok = list(map(_SHAPE, params)) == self._sizes and list(map(_SHAPE, grads)) == self._sizes
        except AttributeError:  # a missing gradient: the op names it; look at the others one by one
            ok = False
        if ok and params and params[0].device.type != "cpu":
            devs = set(map(_DEVICE, params))
            devs.update(map(_DEVICE, grads))
            ok = len(devs) == 1
        if ok:
            return
        dev = params[0].device if params else None
        for t, (p, g, shp) in enumerate(zip(params, grads, self._sizes)):
            name = tensor_name(t, self.names, self.adapter_name)
            if p.shape != shp:
                raise ValueError(
                    f"{name} has shape {tuple(p.shape)}, but the rank allocator was built for {tuple(shp)} (its "
                    "importance state is laid out by it): a parameter's .data was replaced with a tensor of another "
                    "shape. Resize through the model (from_pretrained with a rank_pattern), not the tensor; nothing "
                    "was changed"
                )
            if g is not None and g.shape != shp:
                raise ValueError(
                    f"the gradient of {name} has shape {tuple(g.shape)}, the parameter {tuple(shp)}: the parameter's "
                    ".data was replaced after the backward pass; nothing was changed"
                )
            for what, x in (("", p), ("the gradient of ", g)):
                if x is not None and x.device != dev:
                    raise ValueError(
                        f"{what}{name} is on {x.device}, the first adapter tensor on {dev}: the adapters must be on "
                        "one device; nothing was changed"
                    )

    def _ensure_state(self, device, numel: Optional[int] = None) -> None:
        """The state on ``device`` (moved there if the model moved; zeros of ``numel`` elements, the
        whole layout by default, if there is none yet) and the non-finite counter beside it."""
        if self.m1 is not None and self.m1.device != device:  # the model was moved after training began
            self.m1, self.m2 = self.m1.to(device), self.m2.to(device)
        if self.m1 is None:
            n = self.layout.numel if numel is None else numel
            self.m1 = torch.zeros(n, dtype=torch.float32, device=device)
            self.m2 = torch.zeros(n, dtype=torch.float32, device=device)
        if self._skipped is None or self._skipped.device != device:
            n = len(self.layout.tensor_shapes)
            self._skipped = (torch.zeros(n, dtype=torch.int64) if self._skipped is None else self._skipped).to(device)
            self._host_skipped = self._host_ready = None

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
        sh = self._shards
        if sh is None:
            self.check_inputs(params)
        if self.loaded_without_state is not None and global_step > 0 and self.m1 is None and last is None:
            raise RuntimeError(
                f"update_and_allocate(global_step={global_step}): this model's adapters were loaded from "
                f"{self.loaded_without_state} without the rank allocator's state (importance averages, mask, last "
                "step), so the schedule cannot continue at this step: the importance averages would restart empty "
                "and the budget would be cut from scores of this step alone. To resume exactly, save with "
                "save_pretrained(dir, save_allocator_state=True) and load with AdaLoraModel.from_pretrained(base, "
                "dir, is_trainable=True) (the Trainer: AdaLoraCallback), or load model.rankallocator.load_state_dict"
                "(...) too. To train these adapters on a new schedule, count the steps from 0. Nothing was changed."
            )
        if sh is None and not self._warned_still:
            self._watch_steps(params, global_step)
        if sh is not None:  # FSDP shards: the state holds this rank's elements (distributed.ShardedAdapters)
            dev = distributed.local_flat(sh.params[0]).device
            if self.m1 is not None and not self._state_local:  # a whole state: loaded, or from before wrapping
                self.m1, self.m2 = sh.local_state(self.m1.to(dev)), sh.local_state(self.m2.to(dev))
            self._state_local = True
        else:
            dev = params[0].device
        if global_step < final_start:
            if self.finalized:
                raise RuntimeError(
                    f"global_step={global_step} comes after the final mask was fixed at step {final_start}; "
                    "the step counter must not go back"
                )
            fresh = self.m1 is None
            self._ensure_state(dev, sh.n_local if sh is not None else None)
            budget, mask_now = self.budget_schedule(global_step)
            try:
                scores = self._update(params, mask_now)
            except (RuntimeError, ValueError, TypeError, AttributeError):
                if fresh:  # leave no trace of a failed first call
                    self.reset_ipt()
                missing = next((t for t, p in enumerate(params) if p.grad is None), None)
                if missing is not None and sh is None:
                    raise missing_grad_error(missing, self.names, self.adapter_name) from None
                raise
            if not self._warned_nonfinite:
                self._poll_nonfinite(global_step)
            if mask_now:
                self._mask(scores, budget)
            self.loaded_without_state = None
            self.last_step = global_step
            return budget if mask_now else None
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
            self._ensure_state(dev)  # moves the state if the model moved
            scores = (
                sh.scores(self.m1, self.m2) if sh is not None else ops.triplet_scores(self.layout, self.m1, self.m2)
            )
            self._mask(scores, self.target_bgt)
            self.finalized = True
            self.reset_ipt()
            self.last_step = global_step
            return self.target_bgt
        if self._keep.device != dev:
            self._keep = self._keep.to(dev)
        self._apply(self._keep)
        self.last_step = global_step
        return None

    def _update(self, params, want_scores: bool) -> Optional[torch.Tensor]:
        """The importance update of this step; the triplet scores when ``want_scores``. Whole tensors:
        one op (grads=None: the op reads each .grad itself, no Python list of 672 grads); FSDP
        shards: each rank's elements, the scores completed by an all_reduce."""
        cfg, sh = self.config, self._shards
        if sh is None:
            return ops.importance_update(
                self.layout,
                params,
                None,
                self.m1,
                self.m2,
                cfg.beta1,
                cfg.beta2,
                want_scores=want_scores,
                skipped=self._skipped,
            )
        sh.importance_update(self.m1, self.m2, cfg.beta1, cfg.beta2, self._skipped)
        return sh.scores(self.m1, self.m2) if want_scores else None

    def _apply(self, keep: torch.Tensor) -> None:
        """Zero the pruned lora_E entries (under FSDP, each rank its own)."""
        if self._shards is not None:
            self._shards.apply_mask(keep)
        else:
            ops.apply_mask(split_kinds(self._params)[2], keep)

    def _mask(self, scores, budget: int) -> None:
        keep = ops.keep_mask_to_budget(scores, max(0, self.init_bgt - budget))
        self._apply(keep)
        self._keep = keep
        self.mask_version += 1

    @property
    def nonfinite_skipped(self) -> dict:
        """``{"<module>.lora_<A|B|E>.<adapter>": n}``: gradient elements left out of the importance
        averages so far because |p * grad| was NaN or inf (only tensors with n > 0; one host sync)."""
        if self._skipped is None:
            return {}
        return {tensor_name(t, self.names, self.adapter_name): n for t, n in enumerate(self._skipped.tolist()) if n}

    def _poll_nonfinite(self, step: int) -> None:
        """Warn (once) if any element was skipped, without a host sync: a CPU counter is read in
        place; a CUDA counter is copied to pinned memory without blocking and read one step later,
        once its copy has landed."""
        if self._skipped.device.type == "cpu":
            seen = self._skipped.numpy().any()  # host memory: a read, not a sync
        else:
            seen = self._host_skipped is not None and self._host_ready.query() and self._host_skipped.numpy().any()
            if not seen:
                if self._host_skipped is None:
                    self._host_skipped = torch.empty(self._skipped.shape, dtype=torch.int64, pin_memory=True)
                    self._host_ready = torch.cuda.Event()
                self._host_skipped.copy_(self._skipped, non_blocking=True)
                self._host_ready.record(torch.cuda.current_stream(self._skipped.device))
        if seen:
            self._warn_nonfinite(step)

    def _warn_nonfinite(self, step: int) -> None:
        self._warned_nonfinite = True
        bad = self.nonfinite_skipped
        listed = ", ".join(f"{k}: {v}" for k, v in list(bad.items())[:5]) + (", ..." if len(bad) > 5 else "")
        warnings.warn(
            f"update_and_allocate (by step {step}): {sum(bad.values())} gradient element(s) of {len(bad)} adapter "
            f"tensor(s) were NaN or inf ({listed}). They were left out of the importance averages for those steps "
            "(their triplets keep the scores of earlier steps; the optimizer, not the allocator, decides what such a "
            "gradient does to the weights). Warned once; model.rankallocator.nonfinite_skipped keeps counting. With "
            "fp16 and a GradScaler, overflow steps produce these: call update_and_allocate after scaler.step().",
            RuntimeWarning,
            stacklevel=5,
        )

    def _watch_steps(self, params, step: int) -> None:
        """Warn once when no optimizer step came since the previous call: the watched lora_A has the
        same version (optimizers update in place, which moves it) and its gradient is the same tensor
        (``zero_grad()`` gives a new one, so a skipped GradScaler step does not count) and was
        accumulated into since."""
        t = self._watched
        if t is None:
            return
        p = params[t]
        g = p.grad
        now = (p._version, weakref.ref(g) if g is not None else None, g._version if g is not None else None)
        prev, self._watch = self._watch, now
        if prev is None or g is None or prev[0] != now[0] or prev[1] is None or prev[1]() is not g:
            return
        if prev[2] == now[2]:
            return  # the gradient did not change either: the same backward seen twice, not a micro-batch counter
        self._warned_still = True
        warnings.warn(
            f"update_and_allocate(global_step={step}): the adapter weights have not changed since the previous call "
            f"(step {self.last_step}) while their gradients kept accumulating: no optimizer step came between the "
            "two. Is the step counter a micro-batch counter under gradient accumulation? Then the budget schedule "
            "runs that many times too fast (peft#1801): call update_and_allocate once per optimizer step, with the "
            "optimizer step count. Warned once.",
            RuntimeWarning,
            stacklevel=3,
        )

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
        """Importance state, current mask, phase and last step, for resuming a run. Under FSDP the
        importance state is gathered whole (collective: call it on every rank; the same on each)."""
        m1, m2 = self.m1, self.m2
        if m1 is not None and self._state_local:  # this rank's part of a sharded state
            self.params()
            if self._shards is None or self._shards.n_local != m1.numel():
                raise RuntimeError(
                    "the importance state is sharded but the adapter parameters are no longer the "
                    "shards it was built on; call state_dict() while the model is wrapped"
                )
            m1, m2 = self._shards.gather(m1), self._shards.gather(m2)
        sd = {
            "finalized": torch.tensor(self.finalized),
            "ranks": torch.tensor(self.layout.ranks, dtype=torch.int64),
        }
        if m1 is not None:
            sd["exp_avg_ipt"] = m1
            sd["exp_avg_unc"] = m2
        if self._keep is not None:
            sd["keep"] = self._keep
        if self.last_step is not None:
            sd["last_step"] = torch.tensor(self.last_step, dtype=torch.int64)
        if self._skipped is not None:
            sd["nonfinite_skipped"] = self._skipped
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for key in ("ranks", "finalized"):
            if key not in sd:
                raise ValueError(f"allocator state has no {key!r} entry: not a RankAllocator.state_dict()")
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
        self._state_local = False
        self.m1 = sd["exp_avg_ipt"].to(dev, torch.float32).clone() if "exp_avg_ipt" in sd else None
        self.m2 = sd["exp_avg_unc"].to(dev, torch.float32).clone() if "exp_avg_unc" in sd else None
        self._keep = sd["keep"].to(dev, torch.bool).clone() if "keep" in sd else None
        # A state written before last_step existed has none: the step order is then checked from the next call on.
        self.last_step = int(sd["last_step"]) if "last_step" in sd else None
        if "nonfinite_skipped" in sd:  # the counts go on; what was skipped before the resume was warned about then
            self._skipped = sd["nonfinite_skipped"].to(dev, torch.int64).clone()
            self._host_skipped = self._host_ready = None
            self._warned_nonfinite = bool(self._skipped.any())
        self.loaded_without_state = None
        self._watch = None
        self.mask_version += 1
