"""Compaction: once AdaLoRA's final mask is fixed, drop the pruned triplets from the adapters, the
optimizer state and the allocator.

AdaLoRA prunes by zeroing entries of ``lora_E``; PEFT keeps the pruned rows of ``lora_A``, ``lora_E``
and columns of ``lora_B`` in memory, in the optimizer and in every product of every step until
training ends (its code that would resize layers during training is commented out). From step
``total_step - tfinal`` on the mask no longer changes, so those triplets are dead weight for the
whole final phase. ``compact(model, optimizer)`` cuts them out:

* each adapted layer keeps the triplets its ``rank_pattern`` keeps (``AdaLoraLayer.resize``);
  ``ranknum``, and so the scaling, stay as they were, as in PEFT's ``resize_modules_by_rank_pattern``;
  a layer left at rank 0 takes the base layer's path (``AdaLoraLayer.forward`` skips r == 0);
* with an optimizer, the new parameter objects take the old ones' places in ``param_groups`` (same
  group, same hyperparameters) and every per-parameter state tensor of the parameter's shape
  (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``, ...) is sliced to the kept rows;
  0-d state (``step``) is kept; any other shape is refused before anything changes;
* the allocator becomes a :class:`CompactedAllocator`: the final phase only re-applies the frozen
  mask, and after compaction there is nothing left to mask, so it keeps the step order and the
  original full-length ``rank_pattern`` (what PEFT's ``adapter_config.json`` needs to resize an
  ``init_r`` model to the saved tensors) and nothing else.

Semantics: the model's function does not change (pruned triplets had E = 0). Training afterwards is
training the model PEFT loads from a checkpoint saved at that step, with the optimizer state sliced:
the orthogonal penalty then runs over the kept rows only (PEFT's regulariser on the loaded model;
rank-0 matrices count in its mean with a norm of 0, as there). It is not bit-identical to
uncompacted training, whose penalty still sees the pruned rows of A and B.

Checkpoints: ``save_pretrained`` writes the compacted tensors with the full-length rank pattern
(PEFT's format). The allocator state records ``compacted``, the full ranks and the full keep mask;
loading it (``load_allocator_checkpoint``, ``from_pretrained(..., is_trainable=True)``,
``AdaLoraCallback`` on resume) compacts the model first. A whole-model ``load_state_dict`` of a
compacted state dict (the Trainer's resume) resizes the layers to the saved shapes through a
load-state-dict pre-hook, before the Trainer builds its optimizer, so the saved optimizer state fits.

PEFT's own models (``peft_patch``): :func:`compact_peft` does the same to an accelerated PEFT model's
layers (``SVDLinear`` and the other PEFT AdaLoRA layer kinds), replacing our allocator over them;
``patch_peft(compact=True)`` / ``accelerate(model, compact=True)`` let the automatic schedule call it
right after the optimizer step that fixes the final mask (``auto_schedule``), and a Trainer resume
state written after it compacts the fresh model first (:func:`prepare_peft_resume`).
:func:`compact_model` (``adalora_fast.compact``) takes either kind of model.

Distributed: compaction replaces parameter objects. DDP's buckets and FSDP's shards hold the old
ones, so a model wrapped by either is refused with an error (compact before wrapping, or after
training); ``AdaLoraCallback(compact=True)`` refuses a multi-process run when training starts.
"""

from __future__ import annotations

import gc
import weakref
from typing import Optional

import torch
from torch import nn

from . import distributed
from . import layer as _layer
from .allocator import RankAllocator
from .layer import resize_triplets

# Every adapted layer kind shares AdaLoraLayer (resize, the rank-0 skip in forward).
_ADAPTED = getattr(_layer, "AdaLoraLayer", _layer.AdaLoraLinear)

# The rank dimension of each adapter tensor: A [r, k] and E [r, 1] rows, B [d, r] columns.
_RANK_DIM = {"lora_A": 0, "lora_B": 1, "lora_E": 0}


# ------------------------------------------------------------------------------------- queries
def is_compacted(model) -> bool:
    return isinstance(getattr(model, "rankallocator", None), CompactedAllocator)


def final_mask_fixed(model) -> bool:
    """Whether ``update_and_allocate`` has fixed the final mask (step ``total_step - tfinal`` or later)."""
    alloc = getattr(model, "rankallocator", None)
    return alloc is not None and alloc.finalized


def compact_if_final(model, optimizer=None) -> bool:
    """``compact(model, optimizer)`` when the final mask is fixed and the model is not compacted yet;
    returns whether it compacted. For schedulers that call it after every ``update_and_allocate``."""
    if is_compacted(model) or not final_mask_fixed(model):
        return False
    compact(model, optimizer)
    return True


# ------------------------------------------------------------------------------------- compact
def compact(model, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """``AdaLoraModel.compact``: see the module docstring. Idempotent: a compacted model is left as
    it is (an optimizer still holding parameters an earlier compaction replaced is brought over)."""
    alloc = model.rankallocator
    a = model.trainable_adapter_name
    layers = model.adapted_layers()
    if alloc is None:
        _compact_inference_model(model, layers, a)
        return
    if isinstance(alloc, CompactedAllocator):
        if alloc.full_keep is None:
            raise RuntimeError(alloc.pending_message())
        if optimizer is not None:
            _swap_in_optimizer(_unwrap(optimizer), alloc.replaced_pairs())
        return
    _require_final(alloc)
    _refuse_wrapped(model, alloc)
    model.rankallocator = _compact_layers(alloc, layers, a, optimizer, model.adapted_layers)


def _require_final(alloc: RankAllocator) -> None:
    if not alloc.finalized:
        cfg = alloc.config
        raise RuntimeError(
            f"compact() needs the final rank mask, fixed by update_and_allocate at step total_step - tfinal = "
            f"{cfg.total_step - cfg.tfinal} (or any later step); the last step seen is {alloc.last_step}. "
            "Before that, pruned triplets can still come back."
        )


def _compact_layers(alloc: RankAllocator, layers, a: str, optimizer, relist, full_keep=None) -> "CompactedAllocator":
    """The work of a compaction, shared by our models and accelerated PEFT ones: each layer of
    ``layers`` ([(name, layer)] in the allocator's order) resized to the triplets ``full_keep``
    keeps (bool [sum of the full ranks]; default: ``alloc``'s final mask; a checkpoint's when one is
    loaded), ``optimizer`` (or None) brought over, and the allocator that replaces ``alloc`` (over
    ``relist()``, the layers as the allocator reads them, listed again after the resize)."""
    full_ranks = list(alloc.layout.ranks)
    if full_keep is None:
        full_keep = alloc._keep
    flat = full_keep.tolist()
    keeps = [flat[o : o + r] for o, r in zip(alloc.layout.triplet_offsets, full_ranks)]
    # What changes, worked out (and the optimizer checked) before anything is touched.
    plan = []  # (layer, keep index tensor, keep bool tensor)
    for (_, m), keep in zip(layers, keeps):
        if all(keep):
            continue  # nothing pruned here: the parameters stay the same objects
        kt = torch.tensor(keep, dtype=torch.bool)
        plan.append((m, kt.nonzero().view(-1), kt))
    opt = _unwrap(optimizer) if optimizer is not None else None
    olds = [(getattr(m, kind)[a], _RANK_DIM[kind], idx) for m, idx, _ in plan for kind in _RANK_DIM]
    if opt is not None:
        _check_optimizer(opt, olds, require_some=bool(plan))
    pairs = []  # (old parameter, new parameter, rank dim, kept index)
    for m, idx, kt in plan:
        old = {kind: getattr(m, kind)[a] for kind in _RANK_DIM}
        resize_triplets(m, a, kt)
        for kind, dim in _RANK_DIM.items():
            new = getattr(m, kind)[a]
            g = old[kind].grad
            if g is not None:
                new.grad = g.index_select(dim, idx.to(g.device))
            pairs.append((old[kind], new, dim, idx))
    if opt is not None:
        _swap_in_optimizer(opt, pairs)
    return CompactedAllocator(alloc, relist(), full_ranks, full_keep, pairs)


# ------------------------------------------------------------------------------------- PEFT's models
def compact_model(model, optimizer: Optional[torch.optim.Optimizer] = None):
    """``adalora_fast.compact(model, optimizer=None)``: compact an adalora_fast ``AdaLoraModel``
    (:func:`compact`) or an accelerated PEFT AdaLoRA model (:func:`compact_peft`; a ``PeftModel`` or
    its tuner, possibly wrapped by ``torch.compile``); returns the model. Before the final mask is
    fixed: ``RuntimeError``. After training, without an optimizer: smaller adapters for inference."""
    from .model import AdaLoraModel
    from .peft_patch import state_of

    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, AdaLoraModel):
        inner.compact(optimizer)
        return model
    acc = state_of(model)
    if acc is None:
        raise TypeError(
            f"adalora_fast.compact takes an adalora_fast AdaLoraModel or a PEFT AdaLoRA model accelerated by "
            f"adalora_fast (patch_peft() / accelerate(model)), got {type(model).__name__}"
        )
    if acc.allocator is None:
        raise RuntimeError(
            "adalora_fast.compact: this PEFT AdaLoRA model is in inference mode; PEFT's from_pretrained already "
            "resized its layers to the saved rank pattern"
        )
    compact_peft(acc, optimizer)
    return model


def compact_peft(acc, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Compaction of an accelerated PEFT AdaLoRA model (``acc``: its ``peft_patch._Accelerated``), as
    :func:`compact` does ours: PEFT's own layers (``SVDLinear``, ...) resized to their kept triplets
    in place, ``ranknum`` kept, the optimizer brought over, our allocator replaced. The model stays
    PEFT's: its ``rank_pattern`` keeps ``init_r`` entries per layer, and PEFT's ``save_pretrained``
    writes the compacted tensors as they are (it slices a tensor only when its rank differs from
    the pattern's kept count), so the checkpoint is the one PEFT writes uncompacted. Idempotent."""
    alloc = acc.current_allocator()
    if isinstance(alloc, CompactedAllocator):
        if optimizer is not None:
            _swap_in_optimizer(_unwrap(optimizer), alloc.replaced_pairs())
        return
    _require_final(alloc)
    _refuse_wrapped(acc.tuner, alloc)
    if _distributed_run():
        raise RuntimeError(_DISTRIBUTED_MESSAGE)
    acc.allocator = _compact_layers(alloc, acc._layers(), acc.adapter, optimizer, acc.views)


def compact_peft_if_final(acc, optimizer=None) -> bool:
    """:func:`compact_peft` when the final mask is fixed and the model is not compacted yet; returns
    whether it compacted (the automatic schedule calls it after every optimizer step)."""
    alloc = acc.current_allocator()
    if isinstance(alloc, CompactedAllocator) or not alloc.finalized:
        return False
    compact_peft(acc, optimizer)
    return True


def prepare_peft_resume(acc, state: dict, where: str) -> None:
    """Before a resume state saved after compaction (``state``: the allocator's entries, with
    ``compacted``) is copied into an accelerated PEFT model: compact the fresh model (at the full
    ranks, no optimizer yet: the Trainer builds it after loading the model) by the saved mask."""
    full = _kept_ranks(state)[0]
    alloc = acc.current_allocator()
    if isinstance(alloc, CompactedAllocator):
        if not _compacted_by(alloc, full, state["keep"]):
            raise RuntimeError(f"{where}: this model is compacted with another mask than the checkpoint's")
        return
    if list(alloc.layout.ranks) != full:
        raise RuntimeError(f"{where}: allocator state for ranks {full}, the model's layers have {alloc.layout.ranks}")
    dev = next((p.device for p in alloc.params()), torch.device("cpu"))
    keep = state["keep"].to(dev, torch.bool).view(-1).clone()
    acc.allocator = _compact_layers(alloc, acc._layers(), acc.adapter, None, acc.views, keep)


_DISTRIBUTED_MESSAGE = (
    "compaction replaces the adapter parameters, which DDP's gradient buckets and FSDP's shards hold (the new "
    "ones would never be all-reduced): this run has several processes. Train without compact=True and compact "
    "after training (adalora_fast.compact(model)), or train in one process"
)


def _distributed_run() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def _compact_inference_model(model, layers, a) -> None:
    """A model without an allocator (``inference_mode``): ``from_pretrained`` already resized each
    layer by the saved ``rank_pattern``; a layer still at the pattern's full length is resized here."""
    pattern = model.__dict__["_peft_config"][a].rank_pattern or {}
    for name, m in layers:
        keep = pattern.get(f"{name}.lora_E.{a}", pattern.get(f"{name}.lora_E"))
        if keep is not None and len(keep) == m.r[a] and not all(keep):
            m.resize(a, torch.tensor(keep, dtype=torch.bool))


def _unwrap(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    opt = optimizer
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    if not hasattr(opt, "param_groups") or not hasattr(opt, "state"):
        raise TypeError(f"compact(optimizer=...) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return opt


def _check_optimizer(opt, olds, require_some: bool) -> None:
    """Raise, before anything changes, if a state tensor of a parameter to slice does not have the
    parameter's shape (a factored or flattened state cannot be sliced by rows)."""
    by_id = {id(p): (p, dim) for p, dim, _ in olds}
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    if require_some and not (held & set(by_id)):
        raise ValueError(
            f"compact(optimizer=...): this {type(opt).__name__} holds none of the adapter parameters being "
            "compacted (was it built on another model, or on parameters an earlier compaction replaced?)"
        )
    for pid in held & set(by_id):
        p, _ = by_id[pid]
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"compact(optimizer=...): {type(opt).__name__} state {key!r} of an adapter parameter of shape "
                    f"{tuple(p.shape)} has shape {tuple(v.shape)}; only state shaped like its parameter can be "
                    "sliced to the kept triplets. Nothing was changed; compact after training instead."
                )


def _swap_in_optimizer(opt, pairs) -> None:
    """Put each new parameter in its old one's place in ``opt.param_groups`` and move its state,
    sliced along the rank dimension (0-d entries such as ``step`` as they are)."""
    where = {}
    for gi, g in enumerate(opt.param_groups):
        for pi, p in enumerate(g["params"]):
            where[id(p)] = (gi, pi)
    todo = [(old, new, dim, idx) for old, new, dim, idx in pairs if id(old) in where]
    if not todo:
        return
    _check_optimizer(opt, [(old, dim, idx) for old, _, dim, idx in todo], require_some=False)
    for old, new, dim, idx in todo:
        gi, pi = where[id(old)]
        opt.param_groups[gi]["params"][pi] = new
        st = opt.state.pop(old, None)
        if st:
            opt.state[new] = {
                k: (v.index_select(dim, idx.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                for k, v in st.items()
            }


def _refuse_wrapped(model, alloc) -> None:
    """Compaction replaces parameter objects: refuse models whose parameters an FSDP or DDP wrapper holds."""
    if (
        _fsdp_managed(model)
        or alloc.shards is not None
        or any(distributed.is_dtensor(p) or distributed.is_flat_shard(p) for p in alloc.params())
    ):
        raise RuntimeError(
            "compact(): the adapters are FSDP shards. Compaction replaces the adapter parameters, which FSDP's "
            "flat parameters / DTensor shards hold; compact after training (on the unwrapped model, e.g. after "
            "loading the saved adapter), or train without compaction under FSDP"
        )
    wrapper = _ddp_wrapper_of(model)
    if wrapper is not None:
        raise RuntimeError(
            "compact(): this model is wrapped by DistributedDataParallel, whose gradient buckets hold the adapter "
            "parameters compaction would replace (the new ones would never be all-reduced). Compact before "
            "wrapping, or after training; AdaLoraCallback(compact=True) supports single-process training only"
        )


def _fsdp_managed(model) -> bool:
    """Whether FSDP2 (``fully_shard``) manages the model or a module in it. Its parameters are not
    always DTensors: the root's stay whole between its forward and backward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _ddp_wrapper_of(model) -> Optional[nn.Module]:
    """A ``DistributedDataParallel`` holding ``model`` (or its wrapped model) as its module, if any.
    DDP marks neither the module nor its parameters, so the referrers are followed: the module is
    a value of DDP's ``_modules`` dict, which is a value of the DDP instance's ``__dict__``. Only
    when a process group exists (DDP needs one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    for target in (model, model.__dict__.get("_modules", {}).get("model")):
        if target is None:
            continue
        for mods in gc.get_referrers(target):
            if not (isinstance(mods, dict) and mods.get("module") is target):
                continue
            for holder in gc.get_referrers(mods):
                owners = (
                    [holder]
                    if not isinstance(holder, dict)
                    else (gc.get_referrers(holder) if holder.get("_modules") is mods else [])
                )
                for owner in owners:
                    if isinstance(owner, DistributedDataParallel) and owner.__dict__.get("_modules") is mods:
                        return owner
    return None


# ------------------------------------------------------------------------------------- allocator
class CompactedAllocator(RankAllocator):
    """The allocator of a compacted model: its layout is the kept ranks; it keeps the step order
    (repeated or earlier steps raise, as before), the phase (finalized) and the original full-length
    mask (``rank_pattern``, the state dict), and does nothing per step: the frozen mask it would
    re-apply has no pruned entry left.

    ``full_keep`` None: a model whose layers took a compacted state dict's shapes
    (``load_state_dict``) but not yet the allocator state saying which triplets were kept.
    """

    def __init__(self, source: RankAllocator, layers, full_ranks, full_keep: Optional[torch.Tensor], pairs=()):
        super().__init__(source.config, layers, source.adapter_name)
        self.shard_root = source.shard_root
        self.full_ranks = [int(r) for r in full_ranks]
        self.init_bgt = sum(self.full_ranks)
        self.full_keep = None if full_keep is None else full_keep.to(torch.bool)
        dev = full_keep.device if full_keep is not None else torch.device("cpu")
        self._keep = torch.ones(self.layout.total_rank, dtype=torch.bool, device=dev)
        self.finalized = True
        self.last_step = source.last_step
        self._skipped, self._warned_nonfinite = source._skipped, source._warned_nonfinite
        self.mask_version = source.mask_version + (0 if full_keep is None else 1)
        # Parameters this compaction replaced (weakly): an optimizer built before it can still be
        # brought over by a later compact(optimizer).
        self._replaced = [(weakref.ref(old), weakref.ref(new), dim, idx) for old, new, dim, idx in pairs]

    def replaced_pairs(self) -> list:
        out = []
        for old, new, dim, idx in self._replaced:
            o, n = old(), new()
            if o is not None and n is not None:
                out.append((o, n, dim, idx))
        return out

    def pending_message(self) -> str:
        return (
            "this model took a compacted state dict (the layers now have the saved, compacted shapes) but not the "
            "allocator state that says which triplets were kept; load it: AdaLoraCallback does from Trainer "
            "checkpoints, model.load_allocator_checkpoint(...) from an allocator checkpoint, "
            "AdaLoraModel.from_pretrained(..., is_trainable=True) from save_pretrained(..., save_allocator_state=True)"
        )

    def refresh(self) -> None:
        super().refresh()
        root = self.shard_root
        if (
            self._shards is not None
            or (root is not None and _fsdp_managed(root))
            or any(distributed.is_dtensor(p) or distributed.is_flat_shard(p) for p in self._params)
        ):
            raise RuntimeError(
                "a compacted AdaLoRA model cannot be trained under FSDP (not supported); wrap the model before it "
                "is compacted and train without compaction, or use DDP-free single-process training after it"
            )

    def update_and_allocate(self, global_step: int) -> Optional[int]:
        if self.full_keep is None:
            raise RuntimeError(self.pending_message())
        last = self.last_step
        if last is not None and global_step <= last:
            what = "repeats" if global_step == last else "goes back from"
            raise RuntimeError(
                f"update_and_allocate(global_step={global_step}) {what} the previous step {last}: steps must "
                "increase (each call updates the importance averages once); nothing was changed"
            )
        final_start = self.config.total_step - self.config.tfinal
        if global_step < final_start:
            raise RuntimeError(
                f"global_step={global_step} comes after the final mask was fixed at step {final_start} (and the "
                "model compacted); the step counter must not go back"
            )
        self.last_step = global_step
        return None

    @property
    def rank_pattern(self) -> Optional[dict]:
        """The full-length pattern of the final mask (``init_r`` entries per layer), as PEFT saves it."""
        if self.full_keep is None:
            raise RuntimeError(self.pending_message())
        flat = self.full_keep.tolist()
        out, o = {}, 0
        for name, r in zip(self.names, self.full_ranks):
            out[f"{name}.lora_E.{self.adapter_name}"] = flat[o : o + r]
            o += r
        return out

    def state_dict(self) -> dict:
        """A finalized allocator's state (full ranks, full keep mask, last step) plus ``compacted``."""
        if self.full_keep is None:
            raise RuntimeError(self.pending_message())
        sd = {
            "finalized": torch.tensor(True),
            "compacted": torch.tensor(True),
            "ranks": torch.tensor(self.full_ranks, dtype=torch.int64),
            "keep": self.full_keep,
        }
        if self.last_step is not None:
            sd["last_step"] = torch.tensor(self.last_step, dtype=torch.int64)
        if self._skipped is not None:
            sd["nonfinite_skipped"] = self._skipped
        return sd

    def load_state_dict(self, sd: dict) -> None:
        _check_compacted_state(sd, self.full_ranks, self.layout.ranks, "allocator state")
        dev = self._keep.device
        self.full_keep = sd["keep"].to(dev, torch.bool).clone()
        self.finalized = True
        self.last_step = int(sd["last_step"]) if "last_step" in sd else None
        if "nonfinite_skipped" in sd:
            self._skipped = sd["nonfinite_skipped"].to(dev, torch.int64).clone()
            self._host_skipped = self._host_ready = None
            self._warned_nonfinite = bool(self._skipped.any())
        self.m1 = self.m2 = None
        self.mask_version += 1


def _kept_ranks(sd: dict) -> tuple[list, list]:
    full = [int(v) for v in sd["ranks"].tolist()]
    flat = sd["keep"].to(torch.bool).view(-1).tolist()
    kept, o = [], 0
    for r in full:
        kept.append(sum(flat[o : o + r]))
        o += r
    return full, kept


def _compacted_by(alloc: "CompactedAllocator", full_ranks: list, keep: torch.Tensor) -> bool:
    """Whether ``alloc`` compacted layers of ``full_ranks`` by the mask ``keep`` (a checkpoint's)."""
    return alloc.full_ranks == full_ranks and torch.equal(alloc.full_keep.cpu(), keep.to(torch.bool).view(-1).cpu())


def _check_compacted_state(sd: dict, full_ranks, kept_ranks, where: str) -> None:
    if not ("compacted" in sd and bool(sd["compacted"])):
        raise ValueError(
            f"{where} was saved before compaction, and this model is compacted: load it into a fresh model "
            "(get_peft_model on the base model), or load a state saved after compaction"
        )
    if "keep" not in sd or sd["keep"].numel() != sum(int(v) for v in sd["ranks"].tolist()):
        raise ValueError(f"{where}: a compacted allocator state needs a keep mask of sum(ranks) entries")
    full, kept = _kept_ranks(sd)
    if full != list(full_ranks) or kept != list(kept_ranks):
        raise ValueError(
            f"{where} is for ranks {full} compacted to {kept}; this model has {list(full_ranks)} "
            f"compacted to {list(kept_ranks)}"
        )


# ------------------------------------------------------------------------------------- loading
def prepare_allocator_load(model, sd: dict, where: str) -> None:
    """Called first by ``save_load.load_allocator_checkpoint``: a compacted checkpoint (``sd`` with
    ``allocator.compacted``) needs the model compacted the same way before its adapters (saved at
    the kept ranks) can be copied in. A fresh model at the full ranks is compacted by the saved mask;
    a model whose layers already took the compacted shapes (a ``load_state_dict``) gets its allocator."""
    alloc = model.rankallocator
    compacted = "allocator.compacted" in sd and bool(sd["allocator.compacted"])
    if not compacted:
        if is_compacted(model):
            raise ValueError(
                f"{where} was saved before compaction, and this model is compacted: load it into a fresh model "
                "(get_peft_model on the base model), or load a checkpoint saved after compaction"
            )
        return
    if alloc is None:
        return  # load_allocator_checkpoint raises (inference_mode)
    asd = {k[len("allocator.") :]: v for k, v in sd.items() if k.startswith("allocator.")}
    if "ranks" not in asd or "keep" not in asd:
        raise ValueError(f"{where}: a compacted allocator state needs its ranks and keep mask")
    full, kept = _kept_ranks(asd)
    a = model.trainable_adapter_name
    layers = model.adapted_layers()
    current = [m.r[a] for _, m in layers]
    if len(full) != len(layers):
        raise ValueError(f"{where} is for {len(full)} adapted layers, this model has {len(layers)}")
    keep = asd["keep"].to(torch.bool).view(-1)
    if isinstance(alloc, CompactedAllocator) and alloc.full_keep is not None:
        if not _compacted_by(alloc, full, keep):
            raise ValueError(
                f"{where}: this model is compacted with another mask than the checkpoint's; load it into a fresh model"
            )
        return
    dev = next((m.lora_A[a].device for _, m in layers), torch.device("cpu"))
    if current == kept and (isinstance(alloc, CompactedAllocator) or current != full):
        # the layers already have the saved shapes (load_state_dict of a compacted state dict)
        model.rankallocator = CompactedAllocator(alloc, layers, full, keep.to(dev))
    elif current == full and not isinstance(alloc, CompactedAllocator):
        for (name, _), r in zip(layers, kept):  # checked before resizing, so a bad file changes nothing
            t = sd.get(f"adapter.{name}.lora_A")
            if t is not None and t.shape[0] != r:
                raise ValueError(f"{where}: adapter.{name}.lora_A has {t.shape[0]} rows, its mask keeps {r}")
        _refuse_wrapped(model, alloc)
        model.rankallocator = _compact_layers(alloc, layers, a, None, model.adapted_layers, keep.to(dev))
    else:
        raise ValueError(f"{where} is for ranks {full} compacted to {kept}; this model's layers have ranks {current}")


def register_load_hook(model) -> None:
    """Let ``model.load_state_dict`` take a compacted state dict (the HF Trainer's resume loads the
    whole model's state dict before it builds the optimizer and loads the optimizer state)."""
    model.register_load_state_dict_pre_hook(_load_pre_hook)


def _load_pre_hook(model, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Resize each adapted layer whose ``lora_A``/``lora_B``/``lora_E`` in ``state_dict`` have fewer
    rank rows than it has (a state dict saved after compaction) to those shapes; the values come
    from the state dict right after. The allocator waits for its state (``CompactedAllocator``
    with ``full_keep`` None) until the allocator checkpoint is loaded."""
    a = model.trainable_adapter_name
    todo = []
    for name, m in model.named_modules():
        if not isinstance(m, _ADAPTED) or a not in m.lora_A:
            continue
        pre = f"{prefix}{name}." if name else prefix
        got = {kind: state_dict.get(f"{pre}{kind}.{a}") for kind in _RANK_DIM}
        if any(v is None for v in got.values()):
            continue
        r_new = got["lora_A"].shape[0]
        if (
            r_new == m.r[a]
            or got["lora_B"].dim() != 2
            or got["lora_B"].shape[1] != r_new
            or got["lora_E"].shape[0] != r_new
        ):
            continue  # the same rank, or shapes load_state_dict itself will report
        if r_new > m.r[a]:
            if is_compacted(model):
                error_msgs.append(
                    f"{pre}lora_A.{a}: the state dict has rank {r_new}, this compacted model's layer {m.r[a]}: a state "
                    "dict saved before compaction loads into a fresh model only"
                )
            continue
        todo.append((m, r_new))
    if not todo:
        return
    alloc = model.rankallocator
    if alloc is not None:
        _refuse_wrapped(model, alloc)
    for m, r in todo:
        old = {kind: getattr(m, kind)[a] for kind in _RANK_DIM}
        shapes = {"lora_A": (r, *old["lora_A"].shape[1:]), "lora_B": (old["lora_B"].shape[0], r), "lora_E": (r, 1)}
        for kind, pd in (("lora_A", m.lora_A), ("lora_B", m.lora_B), ("lora_E", m.lora_E)):
            o = old[kind]
            pd[a] = nn.Parameter(
                torch.zeros(shapes[kind], dtype=o.dtype, device=o.device), requires_grad=o.requires_grad
            )
        m.r[a] = r
    if alloc is not None:
        full = alloc.full_ranks if isinstance(alloc, CompactedAllocator) else list(alloc.layout.ranks)
        pending = CompactedAllocator(alloc, model.adapted_layers(), full, None)
        model.rankallocator = pending
        model.__dict__["_synced_mask_version"] = pending.mask_version  # peft_config must not read the unknown pattern
