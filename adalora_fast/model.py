"""AdaLoraModel: inject adapters by ``target_modules``, train ``modules_to_save`` copies, add the
orthogonal penalty to the loss, run the rank allocator, save and load in PEFT's on-disk format,
merge and unmerge.

State-dict keys match PEFT's ``AdaLoraModel`` (``model.<module>.lora_A.<adapter>``,
``model.<module>.modules_to_save.<adapter>.weight``), and saved checkpoints match
``PeftModel.save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A``, resized by the rank pattern, no ``ranknum``;
``base_model.model.<module>.weight`` for a module to save), so either side loads the other's adapters.

One object plays both of PEFT's roles: the ``PeftModel`` a user holds and the tuner at
``peft_model.base_model`` (``model.base_model is model``; ``model.base_model.model`` and
``model.get_base_model()`` are the wrapped transformers model).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import re
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from . import distributed, ops
from .allocator import RankAllocator
from .config import DEFAULT_TARGET_MODULES, TASK_MODULES_TO_SAVE, AdaLoraConfig, PeftType
from .layer import AdaLoraLinear, Conv1D, is_adaptable
from .ops.layout import split_kinds

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
ALLOCATOR_STATE_NAME = "adalora_allocator_state.safetensors"
_KEY_PREFIX = "base_model.model."


def _as_config(config: Any) -> AdaLoraConfig:
    if isinstance(config, AdaLoraConfig):
        return config
    if type(config).__name__ == "AdaLoraConfig" or hasattr(config, "to_dict"):
        return AdaLoraConfig.from_peft(config)
    raise TypeError(f"config must be an adalora_fast.AdaLoraConfig or a peft.AdaLoraConfig, got {type(config).__name__}")


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(m.group("idx")) if m else None
    for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
        if m:
            return int(m.group("idx"))
    return None


def _matches(config: AdaLoraConfig, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` for the cases adalora_fast supports."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return False
        elif key in ex or any(key.endswith(f".{e}") for e in ex):
            return False
    # PEFT never adapts a module to save, nor anything inside one.
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    tm = config.target_modules
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:  # an exact name is taken as is; layers_to_transform filters suffix matches only (PEFT)
        return True
    found = any(key.endswith(f".{t}") for t in tm)
    if found and config.layers_to_transform is not None:
        idx = _layer_index(key, config.layers_pattern)
        wanted = config.layers_to_transform
        wanted = [wanted] if isinstance(wanted, int) else wanted
        found = idx is not None and idx in wanted
    return found


def _resolve_targets(model: nn.Module, config: AdaLoraConfig) -> None:
    tm = config.target_modules
    if tm is None:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        if mt not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"AdaLoraConfig.target_modules=None and no default is known for model_type={mt!r}; "
                "pass target_modules (a list of names, a regex, or 'all-linear')"
            )
        config.target_modules = set(DEFAULT_TARGET_MODULES[mt])
    elif isinstance(tm, str) and tm.lower() == "all-linear":
        names = {n for n, m in model.named_modules() if is_adaptable(m)}
        get_out = getattr(model, "get_output_embeddings", None)
        out_emb = get_out() if callable(get_out) else None
        if out_emb is not None:
            names -= {n for n, m in model.named_modules() if m is out_emb}
        config.target_modules = names


def _clean_name(name: str) -> str:
    """A module name without the ``_fsdp_wrapped_module`` segments FSDP1 inserts (checkpoint keys must not change)."""
    return name.replace("_fsdp_wrapped_module.", "") if "_fsdp_wrapped_module" in name else name


def _strip_adapter(key: str, adapter_name: str) -> str:
    """PEFT's ``_remove_adapter_name_from_state_dict_key``: the checkpoint key of a model state-dict key."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, tail = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{tail}"


def _as_step(global_step: Any) -> int:
    """``global_step`` as an int: any integral scalar (int, numpy integer, integral float, 0-d or
    one-element tensor), not a bool, not a float with a fraction, not negative (PEFT takes any of these)."""
    v = global_step
    bad = ValueError(f"global_step={global_step!r}: must be an integer >= 0 (an int, a numpy integer or a 0-d integer tensor)")
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


class ModulesToSaveWrapper(nn.Module):
    """PEFT's ``ModulesToSaveWrapper``: the frozen ``original_module`` and a trainable copy in
    ``modules_to_save[adapter]``, which the forward uses unless adapters are disabled. Attributes
    the wrapper lacks (``weight``, ``out_features``, ...) are read from the module in use."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str = "default", inference_mode: bool = False) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({adapter_name: copy.deepcopy(module_to_save)})
        self.active_adapter = adapter_name
        self.disable_adapters = False
        module_to_save.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(not inference_mode)

    @property
    def active_module(self) -> nn.Module:
        return self.original_module if self.disable_adapters else self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or name in ("original_module", "modules_to_save"):
                raise
        mods = self.__dict__["_modules"]
        if self.__dict__.get("disable_adapters", False):
            return getattr(mods["original_module"], name)
        return getattr(mods["modules_to_save"][self.__dict__["active_adapter"]], name)


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
        config = _as_config(config)
        self.model = model
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.trainable_adapter_name = adapter_name
        self._synced_mask_version = None
        _resolve_targets(model, config)
        asked = list(config.modules_to_save or [])
        defaults = TASK_MODULES_TO_SAVE.get(config.task_type, [])
        if defaults:  # PEFT's PeftModelFor<Task> adds these (we skip the duplicates PEFT appends)
            config.modules_to_save = asked + [m for m in defaults if m not in asked]
        self._inject(config, adapter_name)
        self._wrap_modules_to_save(config, adapter_name, asked, defaults)
        self._set_trainable(config)
        self.rankallocator: Optional[RankAllocator] = None
        if not config.inference_mode:
            self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)
            self.rankallocator.shard_root = self  # FSDP1 units inside this model hold flat-shard ranges

    # ------------------------------------------------------------------ injection
    def _inject(self, config: AdaLoraConfig, adapter_name: str) -> None:
        targets = []
        for name, module in self.model.named_modules():
            if isinstance(module, AdaLoraLinear) or not name:
                continue
            if ".base_layer" in f".{name}" or not _matches(config, name):
                continue
            if not is_adaptable(module):
                if list(module.children()) and not isinstance(config.target_modules, str):
                    continue
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}; adalora_fast adapts torch.nn.Linear "
                    "and transformers' Conv1D only"
                )
            targets.append(name)
        if not targets:
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no nn.Linear/Conv1D module of the model; "
                "linear modules are, for example: "
                + ", ".join([n for n, m in self.model.named_modules() if is_adaptable(m)][:8])
            )
        warned = False
        for name in targets:
            base = self.model.get_submodule(name)
            is_conv1d = Conv1D is not None and isinstance(base, Conv1D)
            if config.fan_in_fan_out != is_conv1d and not warned:
                warnings.warn(
                    f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is "
                    f"{type(base).__name__}. Setting fan_in_fan_out to {is_conv1d}.",
                    stacklevel=3,
                )
                warned = True
            config.fan_in_fan_out = is_conv1d
            new = AdaLoraLinear(
                base,
                adapter_name,
                r=config.init_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights=config.init_lora_weights,
            )
            self._swap(name, new)

    def _swap(self, name: str, module: nn.Module) -> None:
        """Put ``module`` at the dotted path ``name`` of the base model."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)

    def _wrap_modules_to_save(self, config: AdaLoraConfig, adapter_name: str, asked: list, defaults: list) -> None:
        """PEFT's ``_set_trainable``: wrap every module whose name ends with a ``modules_to_save`` entry."""
        names = config.modules_to_save
        if not names:
            return
        adapted = [n for n, _ in self.adapted_layers()]
        wrapped, matched = [], set()
        for key, module in list(self.model.named_modules()):
            hits = [t for t in names if key.endswith(t)]
            if not key or not hits or any(key.startswith(f"{w}.") for w in wrapped):
                continue
            if isinstance(module, (AdaLoraLinear, ModulesToSaveWrapper)) or any(key.startswith(f"{a}.") for a in adapted):
                raise ValueError(
                    f"modules_to_save={names!r}: {key!r} is an adapted layer or part of one; a module cannot be "
                    "both adapted (target_modules) and trained whole (modules_to_save)"
                )
            self._swap(key, ModulesToSaveWrapper(module, adapter_name, inference_mode=config.inference_mode))
            wrapped.append(key)
            matched.update(hits)
        missing = [m for m in asked if m not in matched and m not in defaults]
        if defaults and not matched.intersection(defaults):
            missing.append(f"any of {defaults} (the defaults of task_type={config.task_type!r})")
        if missing:
            warnings.warn(
                f"modules_to_save: no module of the model is named {', '.join(map(str, missing))}; "
                "nothing was made trainable for it",
                stacklevel=3,
            )

    def _set_trainable(self, config: AdaLoraConfig) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(("lora_" in n) and not config.inference_mode)
        if not config.inference_mode and config.bias != "none":
            for name, m in self.model.named_modules():
                if config.bias == "all" or isinstance(m, AdaLoraLinear):
                    b = getattr(m.base_layer if isinstance(m, AdaLoraLinear) else m, "bias", None)
                    if isinstance(b, nn.Parameter):
                        b.requires_grad_(True)
        for _, w in self.modules_to_save_wrappers():  # last, as PEFT: the original frozen, the copy trained
            w.original_module.requires_grad_(False)
            w.modules_to_save[w.active_adapter].requires_grad_(not config.inference_mode)

    def adapted_layers(self) -> list:
        """[(module name, AdaLoraLinear)] in model order (names without FSDP1's wrapper segments)."""
        return [(_clean_name(n), m) for n, m in self.model.named_modules() if isinstance(m, AdaLoraLinear)]

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
        raise NotImplementedError("adalora_fast holds one adapter per model (PEFT's AdaLoRA trains one too); "
                                  "wrap another copy of the base model instead")

    def load_adapter(self, *args, **kwargs):
        raise NotImplementedError("adalora_fast holds one adapter per model: use "
                                  "AdaLoraModel.from_pretrained(base_model, path) to load one")

    def delete_adapter(self, *args, **kwargs):
        raise NotImplementedError("adalora_fast holds one adapter per model: use unload() to remove it")

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            w = self.__dict__["_peft_config"][self.trainable_adapter_name].orth_reg_weight
            if w > 0:
                outputs.loss = loss + w * self.orth_penalty()
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
            raise ValueError(f"adapter_names={adapter_names!r}: this model holds the one adapter {self.active_adapter!r}")

    def _unload(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        for name, m in self.adapted_layers():
            if merge and not m.merged:
                m.merge(safe_merge=safe_merge)
            elif not merge and m.merged:
                m.unmerge()
            self._swap(name, m.base_layer)
        for name, w in self.modules_to_save_wrappers():
            self._swap(name, w.modules_to_save[w.active_adapter])
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ save / load (PEFT's format)
    def adapter_state_dict(self) -> dict:
        """The tensors PEFT saves, under PEFT's keys, resized by the rank pattern when one exists.
        Under FSDP the adapters are gathered whole (collective: call it on every rank)."""
        a = self.trainable_adapter_name
        config = self.peft_config[a]
        pattern = self.rank_pattern
        whole = self._whole_adapters()
        out = {}
        for i, (name, m) in enumerate(self.adapted_layers()):
            if whole is not None:
                A, B, E = whole[3 * i : 3 * i + 3]
            else:
                A, B, E = m.lora_A[a].detach(), m.lora_B[a].detach(), m.lora_E[a].detach()
            keep = None
            if pattern is not None:
                keep = pattern.get(f"{name}.lora_E.{a}", pattern.get(f"{name}.lora_E"))
            if keep is not None and len(keep) == A.shape[0] and sum(keep) != A.shape[0]:
                kt = torch.tensor(keep, dtype=torch.bool, device=A.device)
                A, B, E = A[kt], B[:, kt], E[kt]
            pre = f"{_KEY_PREFIX}{name}"
            out[f"{pre}.lora_A"] = A.contiguous()
            out[f"{pre}.lora_B"] = B.contiguous()
            out[f"{pre}.lora_E"] = E.contiguous()
            if config.bias == "lora_only" and m.base_layer.bias is not None:
                out[f"{pre}.base_layer.bias"] = m.base_layer.bias.detach()
        if config.bias == "all":
            # PEFT's keys: every bias of the model state dict, the adapter name taken out (so a module to
            # save also writes "<m>.original_module.bias" and "<m>.modules_to_save.bias", as PEFT does)
            for n, p in self.model.named_parameters():
                if n.endswith("bias"):
                    out[_KEY_PREFIX + _strip_adapter(n, a)] = p.detach()
        out.update(self._modules_to_save_tensors())
        return out

    def _whole_adapters(self) -> Optional[list]:
        """[A, B, E of every layer] as whole detached tensors when the adapters are FSDP shards (collective), else None."""
        sh = self.rankallocator.shards if self.rankallocator is not None else None
        return None if sh is None else sh.full_tensors(range(len(sh.params)))

    def _modules_to_save_tensors(self) -> dict:
        """``base_model.model.<module>.<key>`` -> the trained copy's state-dict entry (PEFT's keys)."""
        out = {}
        for name, w in self.modules_to_save_wrappers():
            for k, v in w.modules_to_save[w.active_adapter].state_dict().items():
                out[f"{_KEY_PREFIX}{name}.{k}"] = v.detach()
        return out

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
        from safetensors.torch import save_file

        a = self.trainable_adapter_name
        if selected_adapters is not None and list(selected_adapters) != [a]:
            raise ValueError(f"selected_adapters={selected_adapters!r}: this model holds the one adapter {a!r}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file, expected a directory")
        # Under FSDP every rank takes part in gathering the tensors; only the main process writes them.
        sharded = self.rankallocator is not None and self.rankallocator.shards is not None
        if not is_main_process and not sharded:
            return
        # FSDP2 shards of modules to save and biases: gathered whole (collective, the same order on every rank)
        state = {k: v.full_tensor() if distributed.is_dtensor(v) else v for k, v in self.adapter_state_dict().items()}
        alloc_state = self.allocator_checkpoint() if save_allocator_state and self.rankallocator is not None else None
        if not is_main_process:
            return
        config = self.peft_config[a]
        path = save_directory if a == "default" else os.path.join(save_directory, a)
        os.makedirs(path, exist_ok=True)
        pattern = self.rank_pattern
        tensors, seen = {}, set()
        for k, v in state.items():
            v = v.cpu().contiguous()
            if v.data_ptr() in seen:  # bias="all" with a module to save: two keys, one tensor (safetensors refuses aliases)
                v = v.clone()
            seen.add(v.data_ptr())
            tensors[k] = v
        if safe_serialization:
            save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(path, LEGACY_WEIGHTS_NAME))
        d = config.to_dict()
        d["inference_mode"] = True
        if pattern is not None:
            d["rank_pattern"] = {k.replace(f".{a}", ""): list(v) for k, v in pattern.items()}
        if d.get("base_model_name_or_path") is None:
            d["base_model_name_or_path"] = getattr(self.model, "name_or_path", None) or None
        saved = AdaLoraConfig.from_dict(d)
        saved.save_pretrained(path)
        if alloc_state is not None:
            save_file(alloc_state, os.path.join(path, ALLOCATOR_STATE_NAME))

    def allocator_checkpoint(self) -> dict:
        """What an exact resume needs beyond the saved adapter: the allocator's state (importance
        averages, mask, phase, last step) as ``allocator.<key>`` and the full-rank adapters as
        ``adapter.<module>.lora_{A,B,E}`` (the adapter file is resized by the rank pattern, but
        pruned triplets can come back at later masking steps)."""
        if self.rankallocator is None:
            raise RuntimeError("this AdaLoraModel was built with inference_mode=True; it has no rank allocator")
        a = self.trainable_adapter_name
        sd = {f"allocator.{k}": v for k, v in self.rankallocator.state_dict().items()}
        whole = self._whole_adapters()  # under FSDP: gathered (collective, as state_dict() above)
        for i, (name, m) in enumerate(self.adapted_layers()):
            for j, kind in enumerate(("lora_A", "lora_B", "lora_E")):
                sd[f"adapter.{name}.{kind}"] = getattr(m, kind)[a] if whole is None else whole[3 * i + j]
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def _adapters_in_checkpoint(self, sd: dict, where: str) -> list:
        """[(parameter, saved tensor)] for every full-rank adapter of an allocator checkpoint; checks names and shapes."""
        a = self.trainable_adapter_name
        out = []
        for name, m in self.adapted_layers():
            for kind in ("lora_A", "lora_B", "lora_E"):
                key = f"adapter.{name}.{kind}"
                if key not in sd:
                    raise ValueError(f"{where} lacks {key!r}")
                p = getattr(m, kind)[a]
                if tuple(sd[key].shape) != tuple(p.shape):
                    raise ValueError(f"{where}: {key} has shape {tuple(sd[key].shape)}, the model's is {tuple(p.shape)}")
                out.append((p, sd[key]))
        return out

    def load_allocator_checkpoint(self, sd: dict, load_adapters: bool = True, where: str = "allocator checkpoint") -> None:
        """Restore what ``allocator_checkpoint()`` returned: the full-rank adapters (unless
        ``load_adapters`` is False) and the allocator state."""
        if self.rankallocator is None:
            raise RuntimeError("this AdaLoraModel was built with inference_mode=True; it has no rank allocator")
        pairs = self._adapters_in_checkpoint(sd, where)
        alloc_sd = {k[len("allocator.") :]: v for k, v in sd.items() if k.startswith("allocator.")}
        if "ranks" not in alloc_sd:
            raise ValueError(f"{where} holds no allocator state")
        if load_adapters:
            with torch.no_grad():
                for p, v in pairs:
                    p.copy_(v.to(p.dtype))
        self.rankallocator.refresh()
        self.rankallocator.load_state_dict(alloc_sd)

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
        config = _as_config(config) if config is not None else AdaLoraConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        pattern = config.rank_pattern
        config.rank_pattern = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out notes were given at training time
            self = cls(model, config, adapter_name)
        layers = dict(self.adapted_layers())
        state_path = os.path.join(model_id, ALLOCATOR_STATE_NAME)
        resume = is_trainable and os.path.isfile(state_path)
        if resume:
            from safetensors.torch import load_file

            self.load_allocator_checkpoint(load_file(state_path), where=repr(state_path))
        elif pattern:
            for key, keep in pattern.items():
                mod = re.sub(rf"\.lora_E(\.{re.escape(adapter_name)})?$", "", key)
                if mod not in layers:
                    raise ValueError(f"rank_pattern names {key!r}, but {mod!r} is not an adapted module")
                if sum(keep) != len(keep):
                    layers[mod].resize(adapter_name, torch.tensor(keep, dtype=torch.bool))
            config.rank_pattern = pattern
        self._load_adapter_file(_load_adapter_tensors(model_id), model_id, layers, adapter_name, with_lora=not resume)
        if is_trainable and not resume:
            self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)
            self.rankallocator.shard_root = self  # FSDP1 units inside this model hold flat-shard ranges
        return self

    def _load_adapter_file(self, tensors: dict, model_id: str, layers: dict, adapter_name: str, with_lora: bool) -> None:
        """Copy a PEFT-format adapter file into the model: lora_A/B/E (unless ``with_lora`` is False:
        a resume took them at full rank from the allocator state), the modules to save, trained biases."""
        own = {}
        if with_lora:
            for name, m in layers.items():
                for kind in ("lora_A", "lora_B", "lora_E"):
                    own[f"{_KEY_PREFIX}{name}.{kind}"] = getattr(m, kind)[adapter_name]
        own.update(self._modules_to_save_tensors())
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"{model_id!r} lacks adapter tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        lora_suffixes = (".lora_A", ".lora_B", ".lora_E")
        params = dict(self.model.named_parameters())
        by_saved_name = {_strip_adapter(n, adapter_name): p for n, p in params.items()}
        unexpected = []
        with torch.no_grad():
            for k, v in tensors.items():
                if k in own:
                    p = own[k]
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)}, model shape {tuple(p.shape)}")
                    p.copy_(v.to(p.dtype))
                elif not with_lora and k.endswith(lora_suffixes):
                    continue  # resized copies of what the allocator state restored at full rank
                elif k.endswith("bias"):
                    name = k[len(_KEY_PREFIX) :] if k.startswith(_KEY_PREFIX) else k
                    target = params.get(name, params.get(name.replace(".bias", ".base_layer.bias")))
                    target = by_saved_name.get(name) if target is None else target
                    if target is None:
                        unexpected.append(k)
                    else:
                        target.copy_(v.to(target.dtype))
                else:
                    unexpected.append(k)
        if unexpected:
            raise ValueError(f"{model_id!r} has tensors this model cannot take: {unexpected[:4]}")


def _load_adapter_tensors(model_id: str) -> dict:
    st = os.path.join(model_id, WEIGHTS_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    legacy = os.path.join(model_id, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {model_id!r}")


def get_peft_model(model: nn.Module, peft_config: Union[AdaLoraConfig, Any], adapter_name: str = "default") -> AdaLoraModel:
    """Wrap ``model`` with AdaLoRA adapters (takes our config or a ``peft.AdaLoraConfig``)."""
    return AdaLoraModel(model, peft_config, adapter_name)
