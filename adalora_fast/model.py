"""AdaLoraModel: inject adapters by ``target_modules``, add the orthogonal penalty to the loss,
run the rank allocator, save and load in PEFT's on-disk format, merge and unmerge.

State-dict keys match PEFT's ``AdaLoraModel`` (``model.<module>.lora_A.<adapter>``), and saved
checkpoints match ``PeftModel.save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A``, resized by the rank
pattern, no ``ranknum``), so either side loads the other's adapters.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from . import ops
from .allocator import RankAllocator
from .config import DEFAULT_TARGET_MODULES, AdaLoraConfig
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


class AdaLoraModel(nn.Module):
    """A transformers (or any torch) model with AdaLoRA adapters on its target linear layers.

    ``model(**batch)`` returns the base model's output with ``orth_reg_weight * penalty`` added to
    ``loss`` when the output has one. Call ``update_and_allocate(global_step)`` after
    ``loss.backward()`` (and ``optimizer.step()``) and before ``optimizer.zero_grad()``.
    """

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default") -> None:
        super().__init__()
        config = _as_config(config)
        self.model = model
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.trainable_adapter_name = adapter_name
        _resolve_targets(model, config)
        self._inject(config, adapter_name)
        self._set_trainable(config)
        self.rankallocator: Optional[RankAllocator] = None
        if not config.inference_mode:
            self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)

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

    def _set_trainable(self, config: AdaLoraConfig) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(("lora_" in n) and not config.inference_mode)
        if config.inference_mode or config.bias == "none":
            return
        for name, m in self.model.named_modules():
            if config.bias == "all" or isinstance(m, AdaLoraLinear):
                b = getattr(m.base_layer if isinstance(m, AdaLoraLinear) else m, "bias", None)
                if isinstance(b, nn.Parameter):
                    b.requires_grad_(True)

    def adapted_layers(self) -> list:
        """[(module name, AdaLoraLinear)] in model order."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, AdaLoraLinear)]

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor):
            w = self.peft_config[self.trainable_adapter_name].orth_reg_weight
            if w > 0:
                outputs.loss = loss + w * self.orth_penalty()
        return outputs

    def orth_penalty(self) -> torch.Tensor:
        """Mean over every lora_A and lora_B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F (PEFT's regulariser)."""
        alloc = self.rankallocator
        if alloc is not None:
            lora_A, lora_B, _ = split_kinds(alloc.params())
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
    def update_and_allocate(self, global_step: int) -> None:
        """Update importance and mask to the step's budget (PEFT's ``update_and_allocate``)."""
        if self.rankallocator is None:
            raise RuntimeError("this AdaLoraModel was built with inference_mode=True; it has no rank allocator")
        if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step < 0:
            raise ValueError(f"global_step={global_step!r}: must be an int >= 0")
        self.rankallocator.update_and_allocate(global_step)

    @property
    def rank_pattern(self) -> Optional[dict]:
        """``{"<module>.lora_E.<adapter>": [bool] * init_r}``; None before the first masking step."""
        if self.rankallocator is not None and self.rankallocator.rank_pattern is not None:
            return self.rankallocator.rank_pattern
        return self.peft_config[self.trainable_adapter_name].rank_pattern

    # ------------------------------------------------------------------ adapters on and off
    @contextlib.contextmanager
    def disable_adapter(self):
        layers = [m for _, m in self.adapted_layers()]
        for m in layers:
            m.disable_adapters = True
        try:
            yield
        finally:
            for m in layers:
                m.disable_adapters = False

    def merge_adapter(self, safe_merge: bool = False) -> None:
        for _, m in self.adapted_layers():
            m.merge(safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, m in self.adapted_layers():
            m.unmerge()

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """Fold every adapter into its base weight and return the plain base model."""
        return self._unload(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; return the base model."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        for name, m in self.adapted_layers():
            if merge and not m.merged:
                m.merge(safe_merge=safe_merge)
            elif not merge and m.merged:
                m.unmerge()
            self._swap(name, m.base_layer)
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
        """The tensors PEFT saves, under PEFT's keys, resized by the rank pattern when one exists."""
        a = self.trainable_adapter_name
        config = self.peft_config[a]
        pattern = self.rank_pattern
        out = {}
        for name, m in self.adapted_layers():
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
            for n, p in self.model.named_parameters():
                if n.endswith("bias"):
                    out[_KEY_PREFIX + n] = p.detach()
        return out

    def save_pretrained(self, save_directory: str, save_allocator_state: bool = False) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does.

        With ``save_allocator_state`` the importance state and mask go to
        ``adalora_allocator_state.safetensors`` beside them, so training can resume exactly.
        """
        from safetensors.torch import save_file

        a = self.trainable_adapter_name
        config = self.peft_config[a]
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is a file, expected a directory")
        path = save_directory if a == "default" else os.path.join(save_directory, a)
        os.makedirs(path, exist_ok=True)
        pattern = self.rank_pattern
        tensors = {k: v.cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        d = config.to_dict()
        d["inference_mode"] = True
        if pattern is not None:
            d["rank_pattern"] = {k.replace(f".{a}", ""): list(v) for k, v in pattern.items()}
        if d.get("base_model_name_or_path") is None:
            d["base_model_name_or_path"] = getattr(self.model, "name_or_path", None) or None
        saved = AdaLoraConfig.from_dict(d)
        saved.save_pretrained(path)
        if save_allocator_state and self.rankallocator is not None:
            # The adapter file is resized by the rank pattern, but pruned triplets can come back at
            # later masking steps: an exact resume needs the full-rank tensors, kept here.
            sd = {f"allocator.{k}": v for k, v in self.rankallocator.state_dict().items()}
            for name, m in self.adapted_layers():
                for kind in ("lora_A", "lora_B", "lora_E"):
                    sd[f"adapter.{name}.{kind}"] = getattr(m, kind)[a]
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, os.path.join(path, ALLOCATOR_STATE_NAME))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[Any] = None,
    ) -> "AdaLoraModel":
        """Load an AdaLoRA adapter saved by ``save_pretrained`` here or by PEFT onto ``model``."""
        config = _as_config(config) if config is not None else AdaLoraConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        pattern = config.rank_pattern
        config.rank_pattern = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out notes were given at training time
            self = cls(model, config, adapter_name)
        layers = dict(self.adapted_layers())
        state_path = os.path.join(model_id, ALLOCATOR_STATE_NAME)
        if is_trainable and os.path.isfile(state_path):
            self._resume(state_path, layers, adapter_name)
            return self
        if pattern:
            for key, keep in pattern.items():
                mod = re.sub(rf"\.lora_E(\.{re.escape(adapter_name)})?$", "", key)
                if mod not in layers:
                    raise ValueError(f"rank_pattern names {key!r}, but {mod!r} is not an adapted module")
                if sum(keep) != len(keep):
                    layers[mod].resize(adapter_name, torch.tensor(keep, dtype=torch.bool))
            config.rank_pattern = pattern
        tensors = _load_adapter_tensors(model_id)
        own = {}
        for name, m in layers.items():
            for kind in ("lora_A", "lora_B", "lora_E"):
                own[f"{_KEY_PREFIX}{name}.{kind}"] = getattr(m, kind)[adapter_name]
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"{model_id!r} lacks adapter tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        unexpected = []
        with torch.no_grad():
            for k, v in tensors.items():
                if k in own:
                    p = own[k]
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)}, model shape {tuple(p.shape)}")
                    p.copy_(v.to(p.dtype))
                elif k.endswith("bias"):
                    name = k[len(_KEY_PREFIX) :]
                    target = _find_param(self.model, name)
                    if target is None:
                        unexpected.append(k)
                    else:
                        target.copy_(v.to(target.dtype))
                else:
                    unexpected.append(k)
        if unexpected:
            raise ValueError(f"{model_id!r} has tensors this model cannot take: {unexpected[:4]}")
        if is_trainable:
            self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)
        return self

    def _resume(self, state_path: str, layers: dict, adapter_name: str) -> None:
        """Restore full-rank adapters, importance state and mask written by ``save_allocator_state``."""
        from safetensors.torch import load_file

        sd = load_file(state_path)
        with torch.no_grad():
            for name, m in layers.items():
                for kind in ("lora_A", "lora_B", "lora_E"):
                    key = f"adapter.{name}.{kind}"
                    if key not in sd:
                        raise ValueError(f"{state_path!r} lacks {key!r}")
                    p = getattr(m, kind)[adapter_name]
                    if tuple(sd[key].shape) != tuple(p.shape):
                        raise ValueError(f"{key}: saved shape {tuple(sd[key].shape)}, model shape {tuple(p.shape)}")
                    p.copy_(sd[key].to(p.dtype))
        self.rankallocator.refresh()
        self.rankallocator.load_state_dict(
            {k[len("allocator.") :]: v for k, v in sd.items() if k.startswith("allocator.")}
        )


def _find_param(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    params = dict(model.named_parameters())
    for cand in (name, name.replace(".bias", ".base_layer.bias")):
        if cand in params:
            return params[cand]
    return None


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
