"""AdaLoraModel: the wrapper a user holds. It injects adapters (``targets.py`` says where), wraps
``modules_to_save`` (``modules_to_save.py``), adds the orthogonal penalty to the loss, runs the rank
allocator (``update_and_allocate``), merges and unmerges, and has PEFT's surface; saving and loading
are in ``save_load.py``.

State-dict keys match PEFT's ``AdaLoraModel`` (``model.<module>.lora_A.<adapter>``,
``model.<module>.modules_to_save.<adapter>.weight``), so either side loads the other's state dicts.

One object plays both of PEFT's roles: the ``PeftModel`` a user holds and the tuner at
``peft_model.base_model`` (``model.base_model is model``; ``model.base_model.model`` and
``model.get_base_model()`` are the wrapped transformers model).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from . import distributed, ops, save_load
from .allocator import RankAllocator
from .bases import adapter_layer, base_kind
from .config import AdaLoraConfig, PeftType, as_config
from .layer import AdaLoraLayer
from .modules_to_save import ModulesToSaveWrapper, add_task_defaults, wrap_modules_to_save
from .ops.layout import split_kinds
from .targets import find_targets, resolve_target_modules


def _clean_name(name: str) -> str:
    """A module name without the ``_fsdp_wrapped_module`` segments FSDP1 inserts (checkpoint keys must not change)."""
    return name.replace("_fsdp_wrapped_module.", "") if "_fsdp_wrapped_module" in name else name


def _as_step(global_step: Any) -> int:
    """``global_step`` as an int: any integral scalar (int, numpy integer, integral float, 0-d or
    one-element tensor), not a bool, not a float with a fraction, not negative (PEFT takes any of these)."""
    v = global_step
    bad = ValueError(
        f"global_step={global_step!r}: must be an integer >= 0 (an int, a numpy integer or a 0-d integer tensor)"
    )
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise bad
        v = v.item()
    if isinstance(v, bool) or type(v).__name__ in ("bool_", "bool"):  # numpy.bool_ is no numbers.Integral
        raise bad
    if isinstance(v, numbers.Integral):
        v = int(v)
    elif isinstance(v, numbers.Real) and math.isfinite(float(v)) and float(v).is_integer():
        v = int(v)
    else:
        raise bad
    if v < 0:
        raise bad
    return v


def _takes_fused_lm_head(forward: Any) -> bool:
    """Whether ``forward`` (or a function it wraps: ``torch.compile``, autocast) names a ``fused_lm_head``
    parameter, as the forward TRL's ``add_fused_lm_head`` installs does. ``**kwargs`` does not count:
    transformers' forwards take any keyword and would pass the flag on unread."""
    fn, seen = forward, 0
    while fn is not None and seen < 16:
        seen += 1
        try:
            if "fused_lm_head" in inspect.signature(fn, follow_wrapped=False).parameters:
                return True
        except (TypeError, ValueError):
            pass
        fn = getattr(fn, "__wrapped__", None)
    return False


def _refuse_fused_lm_head_without_head(model: "AdaLoraModel", args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: a call with ``fused_lm_head=True`` is TRL's fused LM head (``SFTTrainer``'s
    ``compute_loss``). It works only when the head sits on the wrapped transformers model (then the flag
    passes through our forward to it). TRL 1.16 installs the head on the model it is given unless that is
    a ``peft.PeftModel``, i.e. on this wrapper, and its head then runs ``model.base_model`` as the
    transformer backbone: here that is this object (PEFT's tuner role), whose output has no
    ``last_hidden_state``, and TRL fails deep inside with an AttributeError. Say so at the first step."""
    if kwargs.get("fused_lm_head") and not _takes_fused_lm_head(model.model.forward):
        raise TypeError(
            "adalora_fast.AdaLoraModel (af.get_peft_model) was called with fused_lm_head=True, TRL's fused LM head "
            "(SFTTrainer and TRL's other trainers), but the model it wraps has no such head: TRL installs the head on "
            "the model it is given unless that is a peft.PeftModel, and runs model.base_model as the transformer "
            "backbone, which for adalora_fast's model is the model itself (PEFT's tuner role). With TRL, train PEFT's "
            "own AdaLoRA accelerated by adalora_fast: call af.patch_peft() and give SFTTrainer the plain transformers "
            "model with peft_config=peft.AdaLoraConfig(...), or af.accelerate(peft_model) for a PEFT model built "
            "before; or train this model with transformers.Trainer and af.AdaLoraCallback."
        )


def _warn_penalty_not_in_fused_loss(model: nn.Module, outputs: Any, orth_reg_weight: float) -> None:
    """Warn once per model when, in training with ``orth_reg_weight > 0``, an AdaLoRA model (ours, or
    PEFT's run by ``peft_patch``) returns the outputs of TRL's fused LM head (they carry ``log_probs``):
    TRL's trainers compute the loss from ``log_probs`` and never read ``outputs.loss``, where the
    orthogonal penalty is added, so the penalty silently leaves the gradient."""
    if not (model.training and orth_reg_weight > 0) or model.__dict__.get("_adalora_fast_fused_warned"):
        return
    if getattr(outputs, "log_probs", None) is None:
        return
    model.__dict__["_adalora_fast_fused_warned"] = True
    warnings.warn(
        f"adalora_fast: this AdaLoRA model returns the outputs of TRL's fused LM head (log_probs). TRL's trainers "
        f"(SFTTrainer, ...) compute their loss from outputs.log_probs and ignore outputs.loss, to which AdaLoRA adds "
        f"orth_reg_weight ({orth_reg_weight:g}) * its orthogonal penalty, so the penalty never reaches the gradient "
        "(PEFT's AdaLoRA under TRL does the same, with or without adalora_fast). Set orth_reg_weight=0 in the "
        "AdaLoraConfig to train without it and silence this warning, or train with transformers.Trainer or a loop of "
        "your own, where outputs.loss is the loss.",
        stacklevel=3,
    )


class AdaLoraModel(nn.Module):
    """A transformers (or any torch) model with AdaLoRA adapters on its target linear layers.

    ``model(**batch)`` returns the base model's output with ``orth_reg_weight * penalty`` added to
    ``loss`` when the output has one. Call ``update_and_allocate(global_step)`` after
    ``loss.backward()`` (and ``optimizer.step()``) and before ``optimizer.zero_grad()``.

    ``modules_to_save`` (and, as PEFT's ``PeftModelFor<Task>`` classes do, ``["classifier", "score"]``
    for ``task_type`` "SEQ_CLS"/"TOKEN_CLS", ``["qa_outputs"]`` for "QUESTION_ANS") are replaced by a
    ``ModulesToSaveWrapper``: the original is frozen, a trainable copy is used, saved and merged.

    PEFT's surface: ``base_model`` (this object, PEFT's tuner), ``base_model.model`` /
    ``get_base_model()`` (the wrapped model), ``peft_type``, ``peft_config``, ``active_adapter(s)``,
    ``modules_to_save``, ``targeted_module_names``, ``update_and_allocate``, ``rank_pattern``,
    ``save_pretrained``/``from_pretrained``, ``merge_and_unload``/``unload``, ``disable_adapter``,
    ``enable_adapter_layers``/``disable_adapter_layers``, ``print_trainable_parameters``,
    ``get_nb_trainable_parameters``. Other attributes are read from the wrapped model.
    """

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default") -> None:
        super().__init__()
        config = as_config(config)
        self.model = model
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.trainable_adapter_name = adapter_name
        self._synced_mask_version = None
        resolve_target_modules(model, config)
        asked, defaults = add_task_defaults(config)
        self._inject(config, adapter_name)
        wrap_modules_to_save(model, config, adapter_name, asked, defaults, [n for n, _ in self.adapted_layers()])
        self._set_trainable(config)
        self.rankallocator: Optional[RankAllocator] = None
        if not config.inference_mode:
            self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)
            self.rankallocator.shard_root = self  # FSDP1 units inside this model hold flat-shard ranges
        from .compaction import register_load_hook

        register_load_hook(self)  # load_state_dict takes a state dict saved after compact() (the Trainer's resume)
        # load_state_dict of trained adapters carries no allocator state: the allocator then refuses a step > 0
        self.register_load_state_dict_pre_hook(save_load.note_adapter_load)
        # TRL's SFTTrainer cannot run this model: a clear error at its first step, not TRL's AttributeError
        self.register_forward_pre_hook(_refuse_fused_lm_head_without_head, with_kwargs=True)

    # ------------------------------------------------------------------ injection
    def _inject(self, config: AdaLoraConfig, adapter_name: str) -> None:
        """Put the adapted layer of its kind (``bases.adapter_layer``) in place of every target module;
        ``config.fan_in_fan_out`` is set to the layout of the linear targets (with PEFT's warning,
        once, when it said otherwise; PEFT leaves it alone for bitsandbytes and Conv2d targets)."""
        warned = False
        for name in find_targets(self.model, config):
            base = self.model.get_submodule(name)
            kind = base_kind(base)
            if kind in ("linear", "conv1d", "linear_custom"):
                conv1d = kind == "conv1d"
                if config.fan_in_fan_out != conv1d and not warned:
                    warnings.warn(
                        f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is "
                        f"{type(base).__name__}. Setting fan_in_fan_out to {conv1d}.",
                        stacklevel=3,
                    )
                    warned = True
                config.fan_in_fan_out = conv1d
            new = adapter_layer(
                base,
                adapter_name,
                r=config.init_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights=config.init_lora_weights,
            )
            self.model.set_submodule(name, new)

    def _set_trainable(self, config: AdaLoraConfig) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(("lora_" in n) and not config.inference_mode)
        if not config.inference_mode and config.bias != "none":
            for name, m in self.model.named_modules():
                if config.bias == "all" or isinstance(m, AdaLoraLayer):
                    b = getattr(m.base_layer if isinstance(m, AdaLoraLayer) else m, "bias", None)
                    if isinstance(b, nn.Parameter):
                        b.requires_grad_(True)
        for _, w in self.modules_to_save_wrappers():  # last, as PEFT: the original frozen, the copy trained
            w.original_module.requires_grad_(False)
            w.modules_to_save[w.active_adapter].requires_grad_(not config.inference_mode)

    def adapted_layers(self) -> list:
        """[(module name, adapted layer)] in model order (names without FSDP1's wrapper segments)."""
        return [(_clean_name(n), m) for n, m in self.model.named_modules() if isinstance(m, AdaLoraLayer)]

    def modules_to_save_wrappers(self) -> list:
        """[(module name, ModulesToSaveWrapper)] in model order (names without FSDP1's wrapper segments)."""
        return [(_clean_name(n), m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    # ------------------------------------------------------------------ PEFT's attributes
    @property
    def base_model(self) -> "AdaLoraModel":
        """This object: it is also PEFT's tuner (``peft_model.base_model``), whose ``.model`` is the wrapped model."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the adapter layers in it), as ``PeftModel.get_base_model()``."""
        return self.model

    @property
    def peft_type(self) -> PeftType:
        return PeftType.ADALORA

    @property
    def peft_config(self) -> dict:
        """``{adapter: AdaLoraConfig}``. Its ``rank_pattern`` follows the allocator's masks, as PEFT's
        does (built when this is read after a masking step, so a training step never waits for it)."""
        pc = self.__dict__["_peft_config"]
        alloc = self.__dict__.get("rankallocator")
        if alloc is not None and alloc.mask_version != self.__dict__.get("_synced_mask_version"):
            pattern = alloc.rank_pattern
            if pattern is not None:
                pc[self.trainable_adapter_name].rank_pattern = pattern
            self.__dict__["_synced_mask_version"] = alloc.mask_version
        return pc

    @peft_config.setter
    def peft_config(self, value: dict) -> None:
        self.__dict__["_peft_config"] = value

    @property
    def active_adapters(self) -> list:
        return [self.active_adapter]

    @property
    def modules_to_save(self) -> Optional[set]:
        """The names in ``modules_to_save`` (task defaults included), as a set; None if there are none (PEFT)."""
        names = self.__dict__["_peft_config"][self.trainable_adapter_name].modules_to_save
        return set(names) if names else None

    @property
    def targeted_module_names(self) -> list:
        """Names of the adapted modules, as PEFT's tuner attribute."""
        return [n for n, _ in self.adapted_layers()]

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name != self.active_adapter:
            raise ValueError(
                f"adapter {adapter_name!r} not found: adalora_fast holds one adapter ({self.active_adapter!r})"
            )

    def add_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "adalora_fast holds one adapter per model (PEFT's AdaLoRA trains one too); "
            "wrap another copy of the base model instead"
        )

    def load_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "adalora_fast holds one adapter per model: use AdaLoraModel.from_pretrained(base_model, path) to load one"
        )

    def delete_adapter(self, *args, **kwargs):
        raise NotImplementedError("adalora_fast holds one adapter per model: use unload() to remove it")

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            w = self.__dict__["_peft_config"][self.trainable_adapter_name].orth_reg_weight
            if 0 < w < math.inf:
                outputs.loss = loss + w * self.orth_penalty()
                _warn_penalty_not_in_fused_loss(self, outputs, w)
            elif w != 0:  # NaN, inf or negative, set after the config validated it: never drop the penalty silently
                raise ValueError(f"AdaLoraConfig.orth_reg_weight={w!r}: must be a finite number >= 0")
        return outputs

    def orth_penalty(self) -> torch.Tensor:
        """Mean over every lora_A and lora_B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F (PEFT's regulariser).

        Under FSDP the sharded A and B are gathered whole on every rank (collective, differentiable:
        each rank's gradient goes to its own shard; ``distributed.gather_full``), so the value and
        gradient are those of the unsharded model.
        """
        alloc = self.rankallocator
        if alloc is not None:
            params = alloc.params()
            lora_A, lora_B, _ = split_kinds(params)
            sh = alloc._shards
            if sh is not None:
                n = len(lora_A)
                ts = tuple(range(0, 3 * n, 3)) + tuple(range(1, 3 * n, 3))
                whole = distributed.gather_full(sh, lora_A + lora_B, ts)
                lora_A, lora_B = whole[:n], whole[n:]
        else:
            a = self.trainable_adapter_name
            layers = [m for _, m in self.adapted_layers()]
            lora_A, lora_B = [m.lora_A[a] for m in layers], [m.lora_B[a] for m in layers]
        return ops.orth_penalty(lora_A, lora_B)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------ AdaLoRA
    def update_and_allocate(self, global_step) -> None:
        """Update importance and mask to the step's budget (PEFT's ``update_and_allocate``).

        ``global_step``: any integral scalar >= 0 (int, numpy integer, 0-d integer tensor, integral
        float); bools, fractions and negatives raise ``ValueError``. Steps must increase from call to
        call: a repeated or earlier step raises ``RuntimeError`` naming both steps and changes nothing.
        """
        if self.rankallocator is None:
            raise RuntimeError("this AdaLoraModel was built with inference_mode=True; it has no rank allocator")
        self.rankallocator.update_and_allocate(_as_step(global_step))

    @property
    def rank_pattern(self) -> Optional[dict]:
        """``{"<module>.lora_E.<adapter>": [bool] * init_r}``; None before the first masking step."""
        if self.rankallocator is not None and self.rankallocator.rank_pattern is not None:
            return self.rankallocator.rank_pattern
        return self.__dict__["_peft_config"][self.trainable_adapter_name].rank_pattern

    def compact(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Drop the pruned triplets once the final mask is fixed (``update_and_allocate`` at step
        ``total_step - tfinal`` or later; before, ``RuntimeError``): each layer's lora_A/E/B shrink
        to the triplets its ``rank_pattern`` keeps (``ranknum`` and the scaling unchanged; a layer
        at rank 0 runs the base layer alone), the allocator keeps only the step order and the
        full-length pattern. With ``optimizer``, the new parameters replace the old in its
        ``param_groups`` and their state is sliced to the kept rows. The function is unchanged;
        later training is that of the model PEFT loads from a checkpoint saved now (the orthogonal
        penalty over the kept rows only). Idempotent. Not under DDP/FSDP wrapping (an error says
        so). See ``compaction.py``."""
        from . import compaction

        compaction.compact(self, optimizer)

    # ------------------------------------------------------------------ adapters on and off
    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the context: the base model alone (adapters off, the original modules to save in use)."""
        wrappers = [w for _, w in self.modules_to_save_wrappers()]
        grads = [[p.requires_grad for p in w.modules_to_save.parameters()] for w in wrappers]
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()
            for w, g in zip(wrappers, grads):  # PEFT freezes the copies in the context; restore them as they were
                for p, rg in zip(w.modules_to_save.parameters(), g):
                    p.requires_grad_(rg)

    def disable_adapter_layers(self) -> None:
        for _, m in self.adapted_layers():
            m.disable_adapters = True
        for _, w in self.modules_to_save_wrappers():
            w.disable_adapters = True
            w.modules_to_save.requires_grad_(False)

    def enable_adapter_layers(self) -> None:
        inference = self.__dict__["_peft_config"][self.trainable_adapter_name].inference_mode
        for _, m in self.adapted_layers():
            m.disable_adapters = False
        for _, w in self.modules_to_save_wrappers():
            w.disable_adapters = False
            w.modules_to_save[w.active_adapter].requires_grad_(not inference)

    def merge_adapter(self, safe_merge: bool = False) -> None:
        for _, m in self.adapted_layers():
            m.merge(safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, m in self.adapted_layers():
            m.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold every adapter into its base weight, put each trained module-to-save copy in place of
        its original, and return the plain base model (PEFT's signature; ``progressbar`` is ignored)."""
        self._check_adapter_names(adapter_names)
        return self._unload(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; return the base model. As in PEFT, the trained copy
        of each module to save replaces its original."""
        return self._unload(merge=False)

    def _check_adapter_names(self, adapter_names) -> None:
        if adapter_names is not None and list(adapter_names) != [self.active_adapter]:
            raise ValueError(
                f"adapter_names={adapter_names!r}: this model holds the one adapter {self.active_adapter!r}"
            )

    def _unload(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        for name, m in self.adapted_layers():
            if merge and not m.merged:
                m.merge(safe_merge=safe_merge)
            elif not merge and m.merged:
                m.unmerge()
            self.model.set_submodule(name, m.base_layer)
        for name, w in self.modules_to_save_wrappers():
            self.model.set_submodule(name, w.modules_to_save[w.active_adapter])
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte (PEFT's count)
                n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ save / load (save_load.py)
    def adapter_state_dict(self) -> dict:
        """The tensors PEFT saves, under PEFT's keys, resized by the rank pattern when one exists.
        Under FSDP the adapters are gathered whole (collective: call it on every rank)."""
        return save_load.adapter_state_dict(self)

    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        selected_adapters: Optional[list] = None,
        is_main_process: bool = True,
        save_allocator_state: bool = False,
        **kwargs,
    ) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does
        (``adapter_model.bin`` with ``safe_serialization=False``; nothing when ``is_main_process``
        is False; PEFT's other keyword arguments are accepted and have no effect here).

        With ``save_allocator_state`` the importance state, mask, last step and the full-rank
        adapters go to ``adalora_allocator_state.safetensors`` beside them, so training can resume
        exactly (``from_pretrained(..., is_trainable=True)``, or ``AdaLoraCallback`` on resume).
        """
        save_load.save_pretrained(
            self, save_directory, safe_serialization, selected_adapters, is_main_process, save_allocator_state
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[Any] = None,
    ) -> "AdaLoraModel":
        """Load an AdaLoRA adapter saved by ``save_pretrained`` here or by PEFT onto ``model``.

        ``modules_to_save`` (and the task type's default heads) are wrapped and their trained copies
        loaded. With ``is_trainable`` and an ``adalora_allocator_state.safetensors`` beside the
        adapter, the full-rank adapters and the allocator state are restored for an exact resume.
        """
        return save_load.from_pretrained(cls, model, model_id, adapter_name, is_trainable, config)

    def allocator_checkpoint(self) -> dict:
        """What an exact resume needs beyond the saved adapter: the allocator's state (importance
        averages, mask, phase, last step) as ``allocator.<key>`` and the full-rank adapters as
        ``adapter.<module>.lora_{A,B,E}`` (the adapter file is resized by the rank pattern, but
        pruned triplets can come back at later masking steps)."""
        return save_load.allocator_checkpoint(self)

    def load_allocator_checkpoint(
        self, sd: dict, load_adapters: bool = True, where: str = "allocator checkpoint"
    ) -> None:
        """Restore what ``allocator_checkpoint()`` returned: the full-rank adapters (unless
        ``load_adapters`` is False) and the allocator state."""
        save_load.load_allocator_checkpoint(self, sd, load_adapters, where)


def get_peft_model(
    model: nn.Module, peft_config: Union[AdaLoraConfig, Any], adapter_name: str = "default"
) -> AdaLoraModel:
    """Wrap ``model`` with AdaLoRA adapters (takes our config or a ``peft.AdaLoraConfig``)."""
    return AdaLoraModel(model, peft_config, adapter_name)
