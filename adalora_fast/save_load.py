"""Checkpoints: the adapter in PEFT's on-disk format, both ways, and the allocator state for an
exact resume.

PEFT's format (``PeftModel.save_pretrained``): ``adapter_config.json`` + ``adapter_model.safetensors``
(``adapter_model.bin`` without safetensors) with keys ``base_model.model.<module>.lora_{A,B,E}``,
resized by the rank pattern, no ``ranknum``; ``base_model.model.<module>.<key>`` for the trained
copy of a module to save; the trained biases under ``bias="all"``/``"lora_only"``.

The resume state (``adalora_allocator_state.safetensors`` beside the adapter, written on request):
the allocator's state as ``allocator.<key>`` and the full-rank adapters as
``adapter.<module>.lora_{A,B,E}`` (pruned triplets can come back at later masking steps, so the
resized adapter file is not enough to resume).

The functions take an ``AdaLoraModel``; its methods of the same names call them.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import distributed
from .allocator import RankAllocator
from .config import AdaLoraConfig, as_config

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
ALLOCATOR_STATE_NAME = "adalora_allocator_state.safetensors"
KEY_PREFIX = "base_model.model."
LORA_KINDS = ("lora_A", "lora_B", "lora_E")


def strip_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's ``_remove_adapter_name_from_state_dict_key``: the checkpoint key of a model state-dict key."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, tail = key.rpartition(".")
    head = re.sub(re.escape(f".{adapter_name}") + r"$", "", head)
    return f"{head}.{tail}"


def _whole_adapters(model) -> Optional[list]:
    """[A, B, E of every layer] as whole detached tensors when the adapters are FSDP shards (collective), else None."""
    sh = model.rankallocator.shards if model.rankallocator is not None else None
    return None if sh is None else sh.full_tensors(range(len(sh.params)))


def _modules_to_save_tensors(model) -> dict:
    """``base_model.model.<module>.<key>`` -> the trained copy's state-dict entry (PEFT's keys)."""
    out = {}
    for name, w in model.modules_to_save_wrappers():
        for k, v in w.modules_to_save[w.active_adapter].state_dict().items():
            out[f"{KEY_PREFIX}{name}.{k}"] = v.detach()
    return out


def _require_allocator(model) -> RankAllocator:
    if model.rankallocator is None:
        raise RuntimeError("this AdaLoraModel was built with inference_mode=True; it has no rank allocator")
    return model.rankallocator


# ---------------------------------------------------------------------------------- PEFT's format
def adapter_state_dict(model) -> dict:
    """The tensors PEFT saves, under PEFT's keys, resized by the rank pattern when one exists
    (collective under FSDP: the adapters are gathered whole)."""
    a = model.trainable_adapter_name
    config = model.peft_config[a]
    pattern = model.rank_pattern
    whole = _whole_adapters(model)
    out = {}
    for i, (name, m) in enumerate(model.adapted_layers()):
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
        pre = f"{KEY_PREFIX}{name}"
        out[f"{pre}.lora_A"] = A.contiguous()
        out[f"{pre}.lora_B"] = B.contiguous()
        out[f"{pre}.lora_E"] = E.contiguous()
        if config.bias == "lora_only" and m.base_layer.bias is not None:
            out[f"{pre}.base_layer.bias"] = m.base_layer.bias.detach()
    if config.bias == "all":
        # PEFT's keys: every bias of the model state dict, the adapter name taken out (so a module to
        # save also writes "<m>.original_module.bias" and "<m>.modules_to_save.bias", as PEFT does)
        for n, p in model.model.named_parameters():
            if n.endswith("bias"):
                out[KEY_PREFIX + strip_adapter_name(n, a)] = p.detach()
    out.update(_modules_to_save_tensors(model))
    return out


def save_pretrained(
    model,
    save_directory: str,
    safe_serialization: bool = True,
    selected_adapters: Optional[list] = None,
    is_main_process: bool = True,
    save_allocator_state: bool = False,
) -> None:
    """``AdaLoraModel.save_pretrained``: the adapter in PEFT's format, and the resume state on request."""
    from safetensors.torch import save_file

    a = model.trainable_adapter_name
    if selected_adapters is not None and list(selected_adapters) != [a]:
        raise ValueError(f"selected_adapters={selected_adapters!r}: this model holds the one adapter {a!r}")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory={save_directory!r} is a file, expected a directory")
    # Under FSDP every rank takes part in gathering the tensors; only the main process writes them.
    sharded = model.rankallocator is not None and model.rankallocator.shards is not None
    if not is_main_process and not sharded:
        return
    # FSDP2 shards of modules to save and biases: gathered whole (collective, the same order on every rank)
    state = {k: v.full_tensor() if distributed.is_dtensor(v) else v for k, v in adapter_state_dict(model).items()}
    alloc_state = allocator_checkpoint(model) if save_allocator_state and model.rankallocator is not None else None
    if not is_main_process:
        return
    config = model.peft_config[a]
    path = save_directory if a == "default" else os.path.join(save_directory, a)
    os.makedirs(path, exist_ok=True)
    pattern = model.rank_pattern
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
        d["base_model_name_or_path"] = getattr(model.model, "name_or_path", None) or None
    saved = AdaLoraConfig.from_dict(d)
    saved.save_pretrained(path)
    if alloc_state is not None:
        save_file(alloc_state, os.path.join(path, ALLOCATOR_STATE_NAME))


def from_pretrained(
    cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
    config: Optional[Any] = None,
):
    """``AdaLoraModel.from_pretrained``: ``cls`` wraps ``model``, then takes the adapter saved in
    ``model_id`` (and, when trainable, the resume state beside it)."""
    config = as_config(config) if config is not None else AdaLoraConfig.from_pretrained(model_id)
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

        load_allocator_checkpoint(self, load_file(state_path), where=repr(state_path))
    elif pattern:
        for key, keep in pattern.items():
            mod = re.sub(rf"\.lora_E(\.{re.escape(adapter_name)})?$", "", key)
            if mod not in layers:
                raise ValueError(f"rank_pattern names {key!r}, but {mod!r} is not an adapted module")
            if sum(keep) != len(keep):
                layers[mod].resize(adapter_name, torch.tensor(keep, dtype=torch.bool))
        config.rank_pattern = pattern
    _load_adapter_file(self, _read_adapter_file(model_id), model_id, layers, adapter_name, with_lora=not resume)
    if is_trainable and not resume:
        self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)
        self.rankallocator.shard_root = self  # FSDP1 units inside this model hold flat-shard ranges
    return self


def _read_adapter_file(model_id: str) -> dict:
    st = os.path.join(model_id, WEIGHTS_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    legacy = os.path.join(model_id, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {model_id!r}")


def _load_adapter_file(model, tensors: dict, model_id: str, layers: dict, adapter_name: str, with_lora: bool) -> None:
    """Copy a PEFT-format adapter file into the model: lora_A/B/E (unless ``with_lora`` is False:
    a resume took them at full rank from the allocator state), the modules to save, trained biases."""
    own = {}
    if with_lora:
        for name, m in layers.items():
            for kind in LORA_KINDS:
                own[f"{KEY_PREFIX}{name}.{kind}"] = getattr(m, kind)[adapter_name]
    own.update(_modules_to_save_tensors(model))
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise ValueError(f"{model_id!r} lacks adapter tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    lora_suffixes = tuple(f".{kind}" for kind in LORA_KINDS)
    params = dict(model.model.named_parameters())
    by_saved_name = {strip_adapter_name(n, adapter_name): p for n, p in params.items()}
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
                name = k[len(KEY_PREFIX) :] if k.startswith(KEY_PREFIX) else k
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


# ---------------------------------------------------------------------------------- resume state
def allocator_checkpoint(model) -> dict:
    """What an exact resume needs beyond the saved adapter: the allocator's state (importance
    averages, mask, phase, last step) as ``allocator.<key>`` and the full-rank adapters as
    ``adapter.<module>.lora_{A,B,E}``, on the CPU (collective under FSDP)."""
    alloc = _require_allocator(model)
    a = model.trainable_adapter_name
    sd = {f"allocator.{k}": v for k, v in alloc.state_dict().items()}
    whole = _whole_adapters(model)  # under FSDP: gathered (collective, as state_dict() above)
    for i, (name, m) in enumerate(model.adapted_layers()):
        for j, kind in enumerate(LORA_KINDS):
            sd[f"adapter.{name}.{kind}"] = getattr(m, kind)[a] if whole is None else whole[3 * i + j]
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def checkpoint_adapters(model, sd: dict, where: str) -> list:
    """[(parameter, saved tensor)] for every full-rank adapter of an allocator checkpoint; checks names and shapes."""
    a = model.trainable_adapter_name
    out = []
    for name, m in model.adapted_layers():
        for kind in LORA_KINDS:
            key = f"adapter.{name}.{kind}"
            if key not in sd:
                raise ValueError(f"{where} lacks {key!r}")
            p = getattr(m, kind)[a]
            if tuple(sd[key].shape) != tuple(p.shape):
                raise ValueError(f"{where}: {key} has shape {tuple(sd[key].shape)}, the model's is {tuple(p.shape)}")
            out.append((p, sd[key]))
    return out


def load_allocator_checkpoint(model, sd: dict, load_adapters: bool = True, where: str = "allocator checkpoint") -> None:
    """Restore what ``allocator_checkpoint`` returned: the full-rank adapters (unless
    ``load_adapters`` is False) and the allocator state."""
    alloc = _require_allocator(model)
    pairs = checkpoint_adapters(model, sd, where)
    alloc_sd = {k[len("allocator.") :]: v for k, v in sd.items() if k.startswith("allocator.")}
    if "ranks" not in alloc_sd:
        raise ValueError(f"{where} holds no allocator state")
    if load_adapters:
        with torch.no_grad():
            for p, v in pairs:
                p.copy_(v.to(p.dtype))
    alloc.refresh()
    alloc.load_state_dict(alloc_sd)
