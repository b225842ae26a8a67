"""PEFT's own AdaLoRA, run on adalora_fast's ops: ``patch_peft()``, ``unpatch_peft()``, ``accelerate(model)``.

Most AdaLoRA users build ``peft.get_peft_model(model, peft.AdaLoraConfig(...))`` themselves or hand
a ``peft_config`` to a framework (TRL's ``SFTTrainer``). Two lines give them our speed and a rank
schedule that runs by itself, while every object stays PEFT's::

    import adalora_fast as af
    af.patch_peft()                # PEFT AdaLoRA models built from here on are accelerated
    model = af.accelerate(model)   # or: one PEFT AdaLoRA model built earlier, in place

What is patched, at the class level (the originals are kept and put back by ``unpatch_peft()``):

* ``SVDLinear.forward``: the registered op ``ops.adapter_linear`` (the whole layer, forward and
  backward). A layer the op cannot run exactly as PEFT does runs PEFT's own forward instead
  (merged, adapters disabled, several active adapters, rank 0, a base layer that is not a plain
  ``nn.Linear``/``Conv1D`` such as bitsandbytes', a base layer with hooks (accelerate's offloading,
  DeepSpeed ZeRO-3), a dropout module other than ``nn.Dropout``, tensor subclasses such as FSDP2's
  DTensors, a subclass of ``SVDLinear``). The results are PEFT's in every case; a fallback that
  costs speed for a reason other than the layer's state warns once, and :func:`explain` lists the
  reason of every layer.
* ``AdaLoraModel.forward``: the orthogonal penalty by ``ops.orth_penalty`` (one op for all matrices)
  instead of PEFT's loop over ``named_parameters()``.
* ``AdaLoraModel.update_and_allocate``: our ``RankAllocator`` (flat importance state, one op per
  step, no host sync except one ``tolist()`` at a masking step to write ``rank_pattern`` where PEFT
  keeps it: ``peft_config[adapter].rank_pattern``, the same keys and lists of bools, so PEFT's
  ``save_pretrained`` resizes the saved adapter as it does unpatched).
* ``AdaLoraModel.__init__`` (``patch_peft`` only): a new trainable PEFT AdaLoRA model gets our
  allocator, so ``peft.get_peft_model`` and ``peft.PeftModel.from_pretrained`` give accelerated models.
* ``AdaLoraConfig.__post_init__`` (``patch_peft`` only): ``total_step`` may be left out; the HF
  ``Trainer`` (TRL's included) fills it from its ``max_steps`` (PEFT raises instead).

Each patched method runs PEFT's original for an object adalora_fast does not hold (a model built
before ``patch_peft()`` and not given to ``accelerate``): only accelerated models change.

The rank schedule then runs with no call in the user's script: see ``auto_schedule.py`` (an
optimizer step hook, and a Trainer callback attached for the user).

``unpatch_peft()`` puts back every original and hands each accelerated model back to PEFT: its
importance averages go into PEFT's own ``RankAllocator``, so a schedule in progress goes on with
PEFT's code where it left off.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules import module as _m

from . import ops
from .allocator import RankAllocator
from .layer import read_param
from .ops.layout import KINDS, split_kinds, tensor_index

# PEFT versions the patch was tested with: [low, high). The patched methods are PEFT internals
# (SVDLinear.forward's fields, AdaLoraModel's allocator and config handling), so another minor
# version gets a clear error instead of a quiet mismatch.
TESTED_PEFT = ("0.21.0", "0.22.0")

_ATTR = "_adalora_fast"  # on a tuner: its _Accelerated; on an SVDLinear: True (run our op)

_ORIGINALS: dict = {}  # (class, attribute name) -> the original from the class's __dict__
_AUTO = False  # patch_peft() is active: new PEFT AdaLoRA models are accelerated as they are built
_COMPACT = False  # patch_peft(compact=True): models accelerated as they are built compact once the final mask is fixed
_PEFT: dict = {}  # the PEFT classes the patched methods need, filled by _peft_classes()
_WARNED: set = set()


# ---------------------------------------------------------------------------------- PEFT, checked
def _peft_classes() -> dict:
    """PEFT's AdaLoRA classes, after checking that the installed PEFT is a tested version."""
    if _PEFT:
        return _PEFT
    try:
        import peft
    except ImportError as e:
        raise ImportError("adalora_fast.patch_peft/accelerate need PEFT (pip install peft)") from e
    from packaging.version import Version

    v = Version(peft.__version__)
    lo, hi = map(Version, TESTED_PEFT)
    if not lo <= v < hi:
        raise RuntimeError(
            f"adalora_fast.patch_peft/accelerate patch PEFT's AdaLoRA internals and were tested with peft >= "
            f"{lo}, < {hi}; this environment has peft {peft.__version__}. Install a tested PEFT (pip install "
            f"'peft>={lo},<{hi}'), or use adalora_fast's own API (af.get_peft_model, AdaLoraCallback), which "
            "does not depend on PEFT's internals."
        )
    from peft.tuners.adalora import config as acfg
    from peft.tuners.adalora import layer as alayer
    from peft.tuners.adalora import model as amodel

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        Conv1D = None
    _PEFT.update(
        PeftModel=peft.PeftModel,
        SVDLinear=alayer.SVDLinear,
        AdaLoraLayer=alayer.AdaLoraLayer,
        AdaLoraModel=amodel.AdaLoraModel,
        AdaLoraConfig=acfg.AdaLoraConfig,
        fused_bases=(nn.Linear,) + ((Conv1D,) if Conv1D is not None else ()),
        Conv1D=Conv1D,
    )
    return _PEFT


def _deepspeed_active() -> bool:
    # PEFT reads gradients through DeepSpeed (safe_get_full_grad) and gathers ZeRO-3 shards for
    # the penalty; under DeepSpeed its own code runs.
    try:
        from transformers.integrations import deepspeed_config
    except ImportError:
        return False
    return deepspeed_config() is not None


def _warn_once(key: str, msg: str, stacklevel: int = 3) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=stacklevel)


# ---------------------------------------------------------------------------------- the layer
# Reasons a layer runs PEFT's own forward because of its state at this call: expected, no warning.
_QUIET = (
    "merged",
    "adapters disabled",
    "active adapter not on this layer",
    "rank 0",
    "not accelerated",
    "extra forward arguments",
)


def _base_has_hooks(base: nn.Module) -> bool:
    return bool(
        base._forward_hooks
        or base._forward_pre_hooks
        or base._backward_hooks
        or base._backward_pre_hooks
        or "forward" in base.__dict__  # accelerate's AlignDevicesHook replaces the instance's forward
        or _m._global_forward_hooks
        or _m._global_forward_pre_hooks
        or _m._global_backward_hooks
        or _m._global_backward_pre_hooks
    )


def _plain(t) -> bool:
    return t is None or type(t) in (nn.Parameter, torch.Tensor)


def fallback_reason(layer: nn.Module, x: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why ``layer`` (a PEFT AdaLoRA layer) runs PEFT's own forward now; None when our op runs it.

    ``x``: the input, when the reason may depend on it (PEFT's ``cast_input_dtype_enabled=False``)."""
    return _op_args(layer, x)[0]


def _op_args(layer: nn.Module, x: Optional[torch.Tensor]) -> tuple:
    """(None, the arguments of ``ops.adapter_linear`` after x) when our op runs this call of ``layer``,
    else (why PEFT's own forward runs, None): :func:`fallback_reason`'s checks, each submodule and
    parameter read once from the module's own dicts."""
    P = _peft_classes()
    if type(layer) is not P["SVDLinear"]:
        if not isinstance(layer, P["AdaLoraLayer"]):
            raise TypeError(f"expected a PEFT AdaLoRA layer, got {type(layer).__name__}")
        if isinstance(layer, P["SVDLinear"]):
            return f"{type(layer).__name__} is a subclass of SVDLinear (its own behaviour is kept)", None
        return f"{type(layer).__name__} is not fused (PEFT's forward for this layer kind)", None
    if not layer.__dict__.get(_ATTR):
        return "not accelerated", None
    if layer.disable_adapters:
        return "adapters disabled", None
    if layer.merged:
        return "merged", None
    active = layer.active_adapters
    if len(active) != 1:
        return f"several active adapters ({', '.join(map(str, active))})", None
    a = active[0]
    mods = layer._modules
    lora_A = mods["lora_A"]
    if a not in lora_A:
        return "active adapter not on this layer", None
    if layer.r[a] == 0:
        return "rank 0", None
    base = mods["base_layer"]
    if type(base) not in P["fused_bases"]:
        return f"base layer {type(base).__name__} is not fused (only torch.nn.Linear and transformers' Conv1D)", None
    if bool(layer.fan_in_fan_out) != (P["Conv1D"] is not None and type(base) is P["Conv1D"]):
        return f"fan_in_fan_out={layer.fan_in_fan_out} does not match the {type(base).__name__} base layer", None
    if _base_has_hooks(base):
        return "the base layer has hooks or a replaced forward (accelerate offloading, DeepSpeed ZeRO-3, ...)", None
    drop = mods["lora_dropout"]._modules[a]
    if type(drop) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(drop).__name__} (only torch.nn.Dropout and Identity are fused)", None
    weight, bias = read_param(base, "weight"), read_param(base, "bias")
    A, E, B = read_param(lora_A, a), read_param(mods["lora_E"], a), read_param(mods["lora_B"], a)
    if not (_plain(weight) and _plain(bias) and _plain(A) and _plain(E) and _plain(B)):
        return "tensor subclasses (FSDP2 DTensors, quantised weights)", None
    if x is not None and not getattr(layer, "cast_input_dtype_enabled", True) and x.dtype != A.dtype:
        return "cast_input_dtype_enabled=False with an input dtype other than the adapter's", None
    p = drop.p if type(drop) is nn.Dropout else 0.0
    ranknum = read_param(mods["ranknum"], a)
    return None, (weight, bias, A, E, B, layer.scaling[a], ranknum, p, drop.training, bool(layer.fan_in_fan_out))


def _svd_linear_forward(self, x, *args, **kwargs):
    orig = _ORIGINALS[(_PEFT["SVDLinear"], "forward")]
    if not self.__dict__.get(_ATTR):
        return orig(self, x, *args, **kwargs)
    why, call = ("extra forward arguments", None) if (args or kwargs) else _op_args(self, x)
    if why is None:
        return ops.adapter_linear(x, *call)
    if why == "rank 0":  # one active adapter (several are another reason, checked before)
        return self.base_layer(x)  # a layer compacted to rank 0: PEFT's forward would add a term of zeros
    if why not in _QUIET:
        _warn_once(
            "layer:" + why,
            f"adalora_fast: a PEFT AdaLoRA layer runs PEFT's own forward (same results, "
            f"PEFT's speed): {why}. adalora_fast.peft_patch.explain(model) lists every "
            "layer's reason.",
        )
    return orig(self, x, *args, **kwargs)


def explain(model: nn.Module) -> dict:
    """``{module name: None or why PEFT's own forward runs}`` for every PEFT AdaLoRA layer in ``model``
    (a ``PeftModel``, its tuner or the wrapped model), as the layers stand now."""
    P = _peft_classes()
    return {n: fallback_reason(m) for n, m in model.named_modules() if isinstance(m, P["AdaLoraLayer"])}


# ---------------------------------------------------------------------------------- the tuner
class _LayerView:
    """What RankAllocator reads of a layer, for any PEFT AdaLoRA layer kind (SVDConv2d's lora_A is
    [r, in * kh * kw], so the view takes k and d from the tensors, not from in/out_features)."""

    __slots__ = ("r", "in_features", "lora_in_features", "out_features", "lora_A", "lora_B", "lora_E")

    def __init__(self, layer, adapter: str):
        self.r = {adapter: int(layer.lora_A[adapter].shape[0])}
        self.in_features = self.lora_in_features = int(layer.lora_A[adapter].shape[1])
        self.out_features = int(layer.lora_B[adapter].shape[0])
        self.lora_A, self.lora_B, self.lora_E = layer.lora_A, layer.lora_B, layer.lora_E


class _Accelerated:
    """What adalora_fast keeps on an accelerated PEFT tuner (``tuner._adalora_fast``): our allocator
    over the trainable adapter, and the bookkeeping of the automatic schedule (``auto_schedule``).

    Steps: the automatic schedule calls :meth:`on_optimizer_step` once per optimizer step (taken,
    or skipped by the AMP scaler); an explicit ``update_and_allocate(step)`` by the user goes to
    :meth:`explicit_call`. The first explicit call hands the schedule to the user for good (the
    automatic one stands down), and is skipped if the automatic schedule already handled the
    optimizer step it follows, so no gradient is counted twice.
    """

    def __init__(self, tuner, adapter: Optional[str]):
        # A strong reference (the tuner holds this object too; the cycle is collected): a deepcopy
        # of the model then gets a state that points at the copy.
        self.tuner = tuner
        self.adapter = adapter
        self.allocator: Optional[RankAllocator] = None
        if adapter is not None:
            self.allocator = self._build()
        self.explicit = False  # the user calls update_and_allocate: the automatic schedule stands down
        self.opt_steps = 0  # optimizer steps seen by the automatic schedule (skipped ones included)
        self.handled = 0  # the value of opt_steps when the automatic schedule last handled a step
        self.next_step: Optional[int] = None  # the schedule step the next optimizer step gets (None: last + 1)
        self.resumed_at: Optional[int] = None  # Trainer resume: the global step the restored state belongs to
        # accelerate() of a model whose PEFT schedule had begun: PEFT does not record the step it reached
        self.step_unknown = False
        self._empty: tuple = (None, [])  # (allocator, its empty tensors: the layers at rank 0), see run()
        self.compact = _COMPACT  # compact (with the optimizer) after the optimizer step that fixes the final mask

    @property
    def config(self):
        return self.tuner.peft_config[self.adapter]

    def _layers(self) -> list:
        P = _peft_classes()
        a = self.adapter
        return [
            (n, m) for n, m in self.tuner.model.named_modules() if isinstance(m, P["AdaLoraLayer"]) and a in m.lora_A
        ]

    def views(self) -> list:
        """[(name, _LayerView)]: the layers as our allocator reads them, in its order."""
        return [(n, _LayerView(m, self.adapter)) for n, m in self._layers()]

    def _build(self) -> RankAllocator:
        # PEFT's config object itself: its total_step may be filled later (Trainer max_steps,
        # PEFT's RankAllocator.set_total_step), and the allocator reads it at every step.
        return RankAllocator(self.config, self.views(), self.adapter)

    def current_allocator(self) -> RankAllocator:
        """The allocator, rebuilt if PEFT resized the layers (``PeftModel.from_pretrained`` or
        ``load_adapter`` of an adapter saved with a rank pattern) before any schedule step."""
        alloc = self.allocator
        try:
            alloc.params()
            return alloc
        except ValueError:
            fresh = alloc.last_step is None and alloc.m1 is None and alloc.rank_pattern is None
            if not fresh:
                raise RuntimeError(
                    "the adapter ranks of this PEFT AdaLoRA model changed while its rank schedule was running "
                    "(load_adapter / resize_modules_by_rank_pattern): the importance state no longer fits"
                ) from None
        self.allocator = alloc = self._build()
        return alloc

    def param_ids(self) -> set:
        return set(map(id, self.current_allocator().params())) if self.allocator is not None else set()

    # ------------------------------------------------------------------ steps
    def run(self, step: int) -> None:
        """One schedule step: importance, masking, and ``rank_pattern`` written where PEFT keeps it."""
        cfg = self.config
        if cfg.total_step is None:
            raise RuntimeError(
                "AdaLoRA's total_step is not set: the HF Trainer (TRL's included) fills it from max_steps when "
                "training begins; in another loop set peft_config['<adapter>'].total_step before the first step"
            )
        alloc = self.current_allocator()
        if alloc is not self._empty[0]:
            self._empty = (alloc, [p for p in alloc.params() if p.numel() == 0])
        for p in self._empty[1]:
            # a layer PEFT loaded at rank 0 (a rank pattern that kept none of its triplets) runs PEFT's forward,
            # whose autograd gives its empty lora_E no gradient; the allocator wants one per tensor, and an
            # empty tensor's gradient is an empty tensor
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if alloc.update_and_allocate(step) is not None:
            cfg.rank_pattern = alloc.rank_pattern  # the one host sync, at masking steps only

    def first_step(self) -> int:
        if self.next_step is not None:
            return self.next_step
        last = self.allocator.last_step
        return 0 if last is None else last + 1

    def on_optimizer_step(self, skipped: bool) -> None:
        """An optimizer step over this model's adapters was taken (or skipped by the AMP scaler)."""
        self.opt_steps += 1
        if self.explicit or self.allocator is None:
            return
        if self.step_unknown and self.next_step is None:
            _warn_once(
                f"step:{id(self)}",
                (
                    "adalora_fast: this PEFT AdaLoRA model was accelerated after its rank schedule had begun, and PEFT "
                    "does not record the step it reached, so the automatic schedule does not run: pass "
                    "adalora_fast.accelerate(model, next_step=N), train it with the HF Trainer (its global_step is "
                    "used), or call model.base_model.update_and_allocate(step) yourself"
                ),
                stacklevel=4,
            )
            return
        step = self.first_step()
        self.next_step = step + 1
        if not skipped:  # a skipped step moved no weight: its step number passes, its gradient is not used
            self.run(step)
        self.handled = self.opt_steps

    def explicit_call(self, global_step) -> None:
        from .model import _as_step

        step = _as_step(global_step)
        if not self.explicit:
            self.explicit = True
            if self.opt_steps and self.handled == self.opt_steps:
                return  # the automatic schedule already handled the optimizer step this call follows
        self.run(step)

    # ------------------------------------------------------------------ PEFT's own state, in and out
    def _names(self, kind: int, i: int) -> str:
        return f"{self.allocator.names[i]}.lora_{KINDS[kind]}.{self.adapter}"

    def import_peft_state(self) -> None:
        """Take over what PEFT's RankAllocator and config hold: importance averages, mask, phase."""
        alloc = self.allocator
        peft_alloc = self.tuner.__dict__.get("rankallocator")
        lay = alloc.layout
        sd: dict = {"ranks": torch.tensor(lay.ranks, dtype=torch.int64)}
        m1s, m2s = getattr(peft_alloc, "exp_avg_ipt", None) or {}, getattr(peft_alloc, "exp_avg_unc", None) or {}
        has_state = bool(m1s)
        if has_state:
            flat = [torch.zeros(lay.numel, dtype=torch.float32), torch.zeros(lay.numel, dtype=torch.float32)]
            for i in range(lay.n_layers):
                for kind in range(3):
                    t, name = tensor_index(i, kind), self._names(kind, i)
                    o, n = lay.offsets[t], lay.numel_of(t)
                    for buf, src in zip(flat, (m1s, m2s)):
                        v = src.get(name)
                        if v is not None and v.numel() == n:
                            buf[o : o + n] = v.detach().reshape(-1).float().cpu()
            sd["exp_avg_ipt"], sd["exp_avg_unc"] = flat
        keep = self._pattern_keep()
        if keep is not None:
            sd["keep"] = keep
        self.step_unknown = has_state or keep is not None
        # PEFT frees its importance state when it fixes the final mask (reset_ipt): a mask with no
        # state is the final one. (An adapter loaded with a rank pattern is resized, so its pattern
        # no longer fits the layers and is not taken.)
        sd["finalized"] = torch.tensor(keep is not None and not has_state)
        alloc.load_state_dict(sd)

    def _pattern_keep(self) -> Optional[torch.Tensor]:
        pattern = self.config.rank_pattern
        if not pattern:
            return None
        alloc, out = self.allocator, []
        for name, r in zip(alloc.names, alloc.layout.ranks):
            v = pattern.get(f"{name}.lora_E.{self.adapter}", pattern.get(f"{name}.lora_E"))
            if v is None:
                return None
            v = v.view(-1).tolist() if torch.is_tensor(v) else list(v)
            if len(v) != r:
                return None
            out += [bool(b) for b in v]
        return torch.tensor(out, dtype=torch.bool)

    def export_peft_state(self) -> None:
        """Give PEFT's RankAllocator our importance averages (unpatching: PEFT's code goes on from here)."""
        alloc, peft_alloc = self.allocator, self.tuner.__dict__.get("rankallocator")
        if alloc is None or peft_alloc is None:
            return
        sd = alloc.state_dict()
        peft_alloc.reset_ipt()
        if "exp_avg_ipt" not in sd:
            return
        lay, params = alloc.layout, alloc.params()
        for i in range(lay.n_layers):
            for kind in range(3):
                t, name = tensor_index(i, kind), self._names(kind, i)
                p, o, n = params[t], lay.offsets[t], lay.numel_of(t)
                peft_alloc.ipt[name] = torch.zeros_like(p)
                peft_alloc.exp_avg_ipt[name] = sd["exp_avg_ipt"][o : o + n].view(p.shape).to(p.device, p.dtype)
                peft_alloc.exp_avg_unc[name] = sd["exp_avg_unc"][o : o + n].view(p.shape).to(p.device, p.dtype)


def state_of(model: Any) -> Optional[_Accelerated]:
    """The adalora_fast state of an accelerated PEFT AdaLoRA model (a ``PeftModel``, its tuner, or
    either wrapped by DDP / ``torch.compile``), else None."""
    seen = 0
    while model is not None and seen < 8:
        seen += 1
        d = getattr(model, "__dict__", {})
        acc = d.get(_ATTR)
        if isinstance(acc, _Accelerated):
            return acc
        mods = d.get("_modules", {})
        model = next((mods[k] for k in ("base_model", "module", "_orig_mod") if mods.get(k) is not None), None)
    return None


def _tuner_forward(self, *args, **kwargs):
    acc = self.__dict__.get(_ATTR)
    if acc is None or acc.allocator is None or _deepspeed_active():
        return _ORIGINALS[(_PEFT["AdaLoraModel"], "forward")](self, *args, **kwargs)
    from . import auto_schedule

    auto_schedule.register(acc)  # a deepcopy of an accelerated model joins the schedule at its first forward
    outputs = self.model.forward(*args, **kwargs)
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor):
        w = self.peft_config[acc.adapter].orth_reg_weight
        if w < 0:
            raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
        if w > 0:
            from .model import _warn_penalty_not_in_fused_loss

            lora_A, lora_B, _ = split_kinds(acc.current_allocator().params())
            outputs.loss = loss + w * ops.orth_penalty(lora_A, lora_B)
            _warn_penalty_not_in_fused_loss(self, outputs, w)
    return outputs


def _tuner_update_and_allocate(self, global_step):
    acc = self.__dict__.get(_ATTR)
    if acc is None or acc.allocator is None or _deepspeed_active():
        return _ORIGINALS[(_PEFT["AdaLoraModel"], "update_and_allocate")](self, global_step)
    acc.explicit_call(global_step)


def _tuner_init(self, model, config, adapter_name, **kwargs):
    _ORIGINALS[(_PEFT["AdaLoraModel"], "__init__")](self, model, config, adapter_name, **kwargs)
    if _AUTO:
        _attach(self, import_state=False)


def _config_post_init(self):
    orig = _ORIGINALS[(_PEFT["AdaLoraConfig"], "__post_init__")]
    if self.total_step is not None:
        return orig(self)
    # PEFT raises on a missing total_step; while patched the Trainer fills it from max_steps. A
    # stand-in value lets PEFT's other checks run as they do.
    self.total_step = self.tinit + max(self.tfinal, 0) + 1
    try:
        orig(self)
    finally:
        self.total_step = None


# ---------------------------------------------------------------------------------- attach, detach
def _attach(tuner, import_state: bool) -> _Accelerated:
    P = _peft_classes()
    acc = tuner.__dict__.get(_ATTR)
    if acc is not None:
        return acc
    adapter = tuner.__dict__.get("trainable_adapter_name")
    if adapter is not None and tuner.peft_config[adapter].inference_mode:
        adapter = None
    acc = _Accelerated(tuner, adapter)
    if import_state and acc.allocator is not None:
        acc.import_peft_state()
    for m in tuner.model.modules():
        if isinstance(m, P["SVDLinear"]):
            m.__dict__[_ATTR] = True
    tuner.__dict__[_ATTR] = acc
    from . import auto_schedule

    auto_schedule.register(acc)
    return acc


def _detach(acc: _Accelerated) -> None:
    from . import auto_schedule
    from .compaction import CompactedAllocator

    auto_schedule.unregister(acc)
    tuner = acc.tuner
    if isinstance(acc.allocator, CompactedAllocator):
        warnings.warn(
            "adalora_fast: handing a compacted PEFT AdaLoRA model back to PEFT. It runs, saves, loads and merges as "
            "PEFT's, but PEFT's own update_and_allocate cannot run on it (its final-phase mask has init_r entries "
            "per layer, the compacted layers fewer): train it further with adalora_fast.accelerate(model)",
            stacklevel=3,
        )
    acc.export_peft_state()  # the rank pattern is in the config already (written at each masking step)
    for m in tuner.model.modules():
        m.__dict__.pop(_ATTR, None)
    tuner.__dict__.pop(_ATTR, None)


def _set(cls, name: str, fn) -> None:
    if (cls, name) not in _ORIGINALS:
        _ORIGINALS[(cls, name)] = cls.__dict__[name]
    setattr(cls, name, fn)


def _install() -> None:
    """The dispatching methods (PEFT's originals for objects we do not hold) and the schedule's triggers."""
    P = _peft_classes()
    _set(P["SVDLinear"], "forward", _svd_linear_forward)
    _set(P["AdaLoraModel"], "forward", _tuner_forward)
    _set(P["AdaLoraModel"], "update_and_allocate", _tuner_update_and_allocate)
    _set(P["AdaLoraModel"], "__init__", _tuner_init)
    from . import auto_schedule

    auto_schedule.install()


# ---------------------------------------------------------------------------------- public
def patch_peft(compact: bool = False) -> None:
    """Accelerate PEFT's own AdaLoRA from here on: every ``peft.get_peft_model`` with a
    ``peft.AdaLoraConfig`` and every ``peft.PeftModel.from_pretrained`` of an AdaLoRA adapter runs
    adalora_fast's ops, and its rank schedule runs by itself in the HF Trainer, TRL's trainers and
    plain loops (see ``auto_schedule``). The models stay PEFT's (``peft.PeftModel``, its save, load,
    merge and ``rank_pattern``). Models built before this call: :func:`accelerate`.

    ``compact=True``: each model built from here on is compacted (``adalora_fast.compact``: the
    pruned triplets cut out of its layers and of the optimizer's state) right after the optimizer
    step whose schedule step fixes the final mask; off by default, as in PEFT, since training after
    it is not bit-identical (README, "Compaction"). Single-process training only.

    Calling it again changes only ``compact`` (for models built after the call). Raises
    ``RuntimeError`` for a PEFT version outside :data:`TESTED_PEFT`."""
    global _AUTO, _COMPACT
    P = _peft_classes()
    _install()
    _set(P["AdaLoraConfig"], "__post_init__", _config_post_init)
    _AUTO = True
    _COMPACT = bool(compact)


def unpatch_peft() -> None:
    """Put PEFT back as it was: its classes' original methods, the schedule's triggers removed,
    and every accelerated model handed back to PEFT's own code (its importance averages moved into
    PEFT's RankAllocator, its rank pattern in its config). Harmless when not patched."""
    global _AUTO, _COMPACT
    from . import auto_schedule

    for acc in list(auto_schedule.live()):
        _detach(acc)
    for (cls, name), orig in list(_ORIGINALS.items()):
        setattr(cls, name, orig)
    _ORIGINALS.clear()
    auto_schedule.uninstall()
    _AUTO = _COMPACT = False


@contextlib.contextmanager
def suspended():
    """A block in which PEFT runs its own code for every object, accelerated models included: the
    classes' original methods and no schedule triggers (optimizer hook, ``GradScaler`` and ``Trainer``
    wrappers). Accelerated models keep their adalora_fast state untouched (nothing is handed back to
    PEFT, as ``unpatch_peft()`` does) and run accelerated again after the block; ``is_patched()`` is
    False inside it, and a PEFT model built inside it stays PEFT's own.

    For running PEFT's unmodified code beside an accelerated model in one process (``python -m bench``
    times both in alternating rounds): the patched methods dispatch per object, but even PEFT's own
    objects would go through them and through the global optimizer hook while patched. Harmless when
    not patched; a ``patch_peft()`` or ``unpatch_peft()`` inside the block is honoured (the block's exit
    puts back only what is still patched)."""
    global _AUTO
    if not _ORIGINALS:
        yield
        return
    from . import auto_schedule

    patched = {key: key[0].__dict__[key[1]] for key in _ORIGINALS}
    auto, triggers = _AUTO, bool(auto_schedule._HOOK)
    for cls, name in patched:
        setattr(cls, name, _ORIGINALS[(cls, name)])
    auto_schedule.uninstall()
    _AUTO = False
    try:
        yield
    finally:
        if _ORIGINALS:  # else unpatch_peft() ran inside the block: PEFT stays as it is
            for key, fn in patched.items():
                if key in _ORIGINALS:
                    setattr(key[0], key[1], fn)
            if triggers:
                auto_schedule.install()
            _AUTO = _AUTO or auto


def is_patched() -> bool:
    """Whether ``patch_peft()`` is active (new PEFT AdaLoRA models are accelerated as they are built)."""
    return _AUTO


def accelerate(model: Any, next_step: Optional[int] = None, compact: bool = False) -> Any:
    """Accelerate one PEFT AdaLoRA model in place (a ``peft.PeftModel`` or its ``AdaLoraModel``
    tuner, built before ``patch_peft()`` or without it) and return it.

    Its weights, masks, rank pattern and importance averages are kept (PEFT's RankAllocator state
    is taken over); from now on it runs as a model built under ``patch_peft()``, including the
    automatic rank schedule (build the ``Trainer`` after this call, so that the schedule's callback
    is attached). Calling it again does nothing.

    ``next_step``: the schedule step of the next optimizer step, for a model already trained with
    PEFT's schedule in a loop of your own (PEFT does not record the step it reached; the HF Trainer
    supplies its ``global_step`` itself). Without it such a model's automatic schedule waits, with a
    warning, and explicit ``update_and_allocate(step)`` calls drive it.

    ``compact=True``: as :func:`patch_peft`'s, for this model."""
    P = _peft_classes()
    tuner = model.base_model if isinstance(model, P["PeftModel"]) else model
    if not isinstance(tuner, P["AdaLoraModel"]):
        raise TypeError(
            f"adalora_fast.accelerate takes a PEFT AdaLoRA model (peft.PeftModel with an AdaLoraConfig), got "
            f"{type(model).__name__}" + (f" with a {type(tuner).__name__} tuner" if tuner is not model else "")
        )
    _install()
    acc = _attach(tuner, import_state=True)
    if compact:
        acc.compact = True
    if next_step is not None:
        from .model import _as_step

        acc.next_step = _as_step(next_step)
    return model
