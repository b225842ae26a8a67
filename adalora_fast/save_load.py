"""Checkpoints: the adapter in PEFT's on-disk format, both ways, and the allocator state for an
exact resume.

PEFT's format (``PeftModel.save_pretrained``): ``adapter_config.json`` + ``adapter_model.safetensors``
(``adapter_model.bin`` without safetensors) with keys ``base_model.model.<module>.lora_{A,B,E}``,
resized by the rank pattern, no ``ranknum``; ``base_model.model.<module>.<key>`` for the trained
copy of a module to save; the trained biases under ``bias="all"``/``"lora_only"``.

The resume state (``adalora_allocator_state.safetensors`` beside the adapter, written on request):
the allocator's state as ``allocator.<key>`` and the full-rank adapters as
``adapter.<module>.lora_{A,B,E}`` (pruned triplets can come back at later masking steps, so the
resized adapter file is not enough to resume). Its header metadata ties it to the adapter file it
was saved with: ``adapter_file`` (the name), ``adapter_sha256`` (of that file's bytes) and ``step``.

A directory is written as a unit: every file is serialised in memory, written to a temporary name
and flushed, then all are renamed over the old ones one right after the other
(``fileio.atomic_write_files``), the adapter first, the config next, the state last; then the
files of an older save that no longer belong go (the adapter in the other format, then a state
that names another adapter file). A process killed at any point leaves each file whole, old or
new. A kill between the renames can leave a mixed directory: a resume refuses a state that names
another adapter file than the one beside it, naming both files; a config whose rank_pattern does
not fit the adapter file is refused naming them; both adapter formats at once are refused. Every
unreadable file raises ``fileio.CheckpointError`` naming it.

The functions take an ``AdaLoraModel``; its methods of the same names call them.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import distributed
from .allocator import RankAllocator
from .config import CONFIG_NAME, AdaLoraConfig, as_config
from .fileio import (
    CheckpointError,
    atomic_write_files,
    read_bytes,
    read_safetensors,
    read_safetensors_metadata,
    read_torch,
    remove,
    sha256,
)

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
    """``AdaLoraModel.save_pretrained``: the adapter in PEFT's format, and the resume state on request,
    written as a unit (module docstring)."""
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
    # Every file serialised before the first one is written, so that a failure here leaves the directory as it was.
    if safe_serialization:
        from safetensors.torch import save

        name, stale = WEIGHTS_NAME, LEGACY_WEIGHTS_NAME
        adapter_bytes = save(tensors, metadata={"format": "pt"})
    else:
        name, stale = LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
        buf = io.BytesIO()
        torch.save(tensors, buf)
        adapter_bytes = buf.getvalue()
    d = config.to_dict()
    d["inference_mode"] = True
    if pattern is not None:
        d["rank_pattern"] = {k.replace(f".{a}", ""): list(v) for k, v in pattern.items()}
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = getattr(model.model, "name_or_path", None) or None
    config_bytes = AdaLoraConfig.from_dict(d).to_json_bytes()
    record = {"adapter_file": name, "adapter_sha256": sha256(adapter_bytes)}
    state_bytes = None
    if alloc_state is not None:
        from safetensors.torch import save

        step = model.rankallocator.last_step
        state_bytes = save(alloc_state, metadata={"format": "pt", **record, "step": "" if step is None else str(step)})
    # The adapter first, the config, the state last: until the state is renamed in, the state beside
    # the new adapter (if any) names the old adapter's hash, and a resume refuses the mix.
    state_path = os.path.join(path, ALLOCATOR_STATE_NAME)
    files = [(os.path.join(path, name), adapter_bytes), (os.path.join(path, CONFIG_NAME), config_bytes)]
    atomic_write_files(files + ([(state_path, state_bytes)] if state_bytes is not None else []))
    # A load prefers the safetensors file: the other format's file of an older save must not outlive this one.
    # Before a stale state goes: until then that state names the old file, so a resume refuses the directory.
    remove(os.path.join(path, stale))
    if state_bytes is None and os.path.isfile(state_path) and _state_record(state_path) != record:
        remove(state_path)  # the state of an older save: it would resume other weights than these


def _state_record(state_path: str) -> Optional[dict]:
    """The ``adapter_file``/``adapter_sha256`` record in a state file's header (read alone, not the
    tensors); None if it has none or cannot be read."""
    meta = read_safetensors_metadata(state_path)
    if not meta or "adapter_sha256" not in meta:
        return None
    return {"adapter_file": meta.get("adapter_file"), "adapter_sha256": meta["adapter_sha256"]}


def read_allocator_state(state_path: str) -> tuple[dict, dict]:
    """(tensors, header metadata) of an ``adalora_allocator_state.safetensors``; a torn or corrupt
    file raises ``CheckpointError`` naming it."""
    return read_safetensors(state_path, "AdaLoRA allocator state")


def from_pretrained(
    cls,
    model: nn.Module,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: Optional[Any] = None,
):
    """``AdaLoraModel.from_pretrained``: ``cls`` wraps ``model``, then takes the adapter saved in
    ``model_id`` (and, when trainable, the resume state beside it, after checking that it was saved
    with that adapter file)."""
    config_path = os.path.join(model_id, CONFIG_NAME) if config is None else "the config passed in"
    config = as_config(config) if config is not None else AdaLoraConfig.from_pretrained(model_id)
    config.inference_mode = not is_trainable
    pattern = config.rank_pattern
    config.rank_pattern = None
    # Read (and check) the files before the model is touched: a torn file raises, naming it, and nothing changes.
    adapter_path, adapter_bytes, tensors = _read_adapter_file(model_id)
    state_path = os.path.join(model_id, ALLOCATOR_STATE_NAME)
    resume = is_trainable and os.path.isfile(state_path)
    state = read_allocator_state(state_path) if resume else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out notes were given at training time
        self = cls(model, config, adapter_name)
    layers = dict(self.adapted_layers())
    if resume:
        sd, meta = state
        _check_state_belongs(self, sd, meta, state_path, adapter_path, adapter_bytes, tensors)
        load_allocator_checkpoint(self, sd, where=state_path)
    elif pattern:
        keeps = _check_rank_pattern(pattern, layers, adapter_name, config, config_path)
        for mod, keep in keeps.items():
            if sum(keep) != len(keep):
                layers[mod].resize(adapter_name, torch.tensor(keep, dtype=torch.bool))
        config.rank_pattern = pattern
    where = f"{adapter_path} (with init_r={config.init_r}" + (
        f" and the rank_pattern of {config_path})" if pattern else ")"
    )
    _load_adapter_file(self, tensors, where, layers, adapter_name, with_lora=not resume)
    if is_trainable and not resume:
        self.rankallocator = RankAllocator(config, self.adapted_layers(), adapter_name)
        self.rankallocator.shard_root = self  # FSDP1 units inside this model hold flat-shard ranges
        if pattern or _trained(tensors):
            # no state: a step > 0 would not continue the run these adapters come from (allocator.py)
            self.rankallocator.loaded_without_state = f"{model_id!r} (no {ALLOCATOR_STATE_NAME} there)"
    return self


def note_adapter_load(model, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of ``AdaLoraModel``: trained adapters (some ``lora_E`` not 0)
    loaded into a model whose allocator has seen no step and holds no state are marked, so that a
    step > 0 raises instead of continuing the schedule on empty importance averages (a state dict
    does not carry the allocator state: PEFT's keys, key for key). ``rankallocator.load_state_dict``
    afterwards clears the mark."""
    alloc = getattr(model, "rankallocator", None)
    if alloc is None or alloc.last_step is not None or alloc.m1 is not None:
        return
    suffix = f".lora_E.{model.trainable_adapter_name}"
    for k, v in state_dict.items():
        if k.startswith(prefix) and k.endswith(suffix) and isinstance(v, torch.Tensor) and v.device.type != "meta":
            if bool(v.detach().ne(0).any()):
                alloc.loaded_without_state = "a state dict (load_state_dict)"
                return


def _trained(tensors: dict) -> bool:
    """Whether an adapter file holds trained adapters: some lora_E is not 0 (every E starts at 0)."""
    return any(k.endswith(".lora_E") and bool(v.ne(0).any()) for k, v in tensors.items())


def _check_rank_pattern(pattern: dict, layers: dict, adapter_name: str, config, config_path: str) -> dict:
    """{module: keep list} of a saved rank_pattern, every entry checked against the layers before any is resized."""
    out = {}
    for key, keep in pattern.items():
        mod = re.sub(rf"\.lora_E(\.{re.escape(adapter_name)})?$", "", key)
        if mod not in layers:
            raise CheckpointError(
                f"{config_path}: rank_pattern names {key!r}, but {mod!r} is not an adapted module "
                "of this model (target_modules and the model must be those of the save)"
            )
        r = layers[mod].r[adapter_name]
        if len(keep) != r:
            raise CheckpointError(
                f"{config_path}: rank_pattern[{key!r}] has {len(keep)} entries, but layer {mod!r} has rank {r} "
                f"(init_r={config.init_r}): the config's init_r and rank_pattern disagree (was init_r edited?)"
            )
        out[mod] = list(keep)
    return out


def _check_state_belongs(
    model, sd: dict, meta: dict, state_path: str, adapter_path: str, adapter_bytes: bytes, tensors: dict
) -> None:
    """Refuse a state file saved with another adapter file than the one beside it."""
    rec = meta.get("adapter_sha256")
    if rec is not None:
        if meta.get("adapter_file") == os.path.basename(adapter_path) and rec == sha256(adapter_bytes):
            return
        raise CheckpointError(
            f"{state_path} was saved (after step {meta.get('step') or '?'}) with an adapter file "
            f"{meta.get('adapter_file')!r} of sha256 {rec[:16]}..., but {adapter_path} beside it is another file "
            f"(sha256 {sha256(adapter_bytes)[:16]}...): this directory mixes two saves (a save_pretrained without "
            "save_allocator_state over one with it, files copied from elsewhere, or a save that was killed "
            "between its files), and resuming would take the weights of one and the schedule of the other. "
            "Load it with is_trainable=False for the adapter alone, or resume from a directory saved whole."
        )
    # A state written before the record existed: its full-rank adapters, resized by its own mask, must be
    # the ones in the adapter file.
    keep = sd.get("allocator.keep")
    off = 0
    for name, m in model.adapted_layers():
        A = sd.get(f"adapter.{name}.lora_A")
        if A is None:
            return  # checkpoint_adapters names what is missing
        r = A.shape[0]
        kt = keep[off : off + r].to(torch.bool) if keep is not None and keep.numel() >= off + r else None
        off += r
        for kind in LORA_KINDS:
            full = sd.get(f"adapter.{name}.{kind}")
            saved = tensors.get(f"{KEY_PREFIX}{name}.{kind}")
            if full is None or saved is None:
                return
            if kt is not None and int(kt.sum()) != r:
                full = full[:, kt] if kind == "lora_B" else full[kt]
            if tuple(full.shape) != tuple(saved.shape) or not torch.equal(full, saved.to(full.dtype)):
                raise CheckpointError(
                    f"{state_path} holds other weights for {name}.{kind} than {adapter_path} beside it: this "
                    "directory mixes two saves (a save_pretrained without save_allocator_state over one with it, or "
                    "files copied from elsewhere). Load it with is_trainable=False for the adapter alone, or resume "
                    "from a directory saved whole."
                )


def _read_adapter_file(model_id: str) -> tuple[str, bytes, dict]:
    """(path, bytes, tensors) of the adapter file in ``model_id``; both formats at once raise (an
    interrupted save or an older version left one behind, and which one is current cannot be told)."""
    st = os.path.join(model_id, WEIGHTS_NAME)
    legacy = os.path.join(model_id, LEGACY_WEIGHTS_NAME)
    has_st, has_legacy = os.path.isfile(st), os.path.isfile(legacy)
    if has_st and has_legacy:
        raise CheckpointError(
            f"{model_id!r} holds both {WEIGHTS_NAME} and {LEGACY_WEIGHTS_NAME}: one is left from an older save "
            "(save_pretrained now removes the other format; an interrupted save or an older version can leave "
            "both), and which one is current cannot be told. Remove the stale one."
        )
    if has_st:
        data = read_bytes(st, "adapter file")
        return st, data, read_safetensors(st, "adapter file", data)[0]
    if has_legacy:
        data = read_bytes(legacy, "adapter file")
        return legacy, data, read_torch(legacy, "adapter file", data)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {model_id!r}")


def _load_adapter_file(model, tensors: dict, where: str, layers: dict, adapter_name: str, with_lora: bool) -> None:
    """Copy a PEFT-format adapter file into the model: lora_A/B/E (unless ``with_lora`` is False:
    a resume took them at full rank from the allocator state), the modules to save, trained biases.
    ``where`` names the file (and the config fields that gave the model its shapes) in errors; every
    shape is checked before anything is copied."""
    own = {}
    if with_lora:
        for name, m in layers.items():
            for kind in LORA_KINDS:
                own[f"{KEY_PREFIX}{name}.{kind}"] = getattr(m, kind)[adapter_name]
    own.update(_modules_to_save_tensors(model))
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CheckpointError(f"{where} lacks adapter tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for k, v in tensors.items():
        p = own.get(k)
        if p is not None and tuple(v.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, but this model's is {tuple(p.shape)}")
    lora_suffixes = tuple(f".{kind}" for kind in LORA_KINDS)
    params = dict(model.model.named_parameters())
    by_saved_name = {strip_adapter_name(n, adapter_name): p for n, p in params.items()}
    unexpected = []
    with torch.no_grad():
        for k, v in tensors.items():
            if k in own:
                p = own[k]
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
        raise CheckpointError(f"{where} has tensors this model cannot take: {unexpected[:4]}")


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
                init_r = model.peft_config[a].init_r
                raise CheckpointError(
                    f"{where}: {key} has shape {tuple(sd[key].shape)}, but this model's {name}.{kind} has "
                    f"{tuple(p.shape)} (from init_r={init_r} and the model's layer): the state was saved with another "
                    "init_r (was adapter_config.json edited?) or for another model"
                )
            out.append((p, sd[key]))
    return out


def load_allocator_checkpoint(model, sd: dict, load_adapters: bool = True, where: str = "allocator checkpoint") -> None:
    """Restore what ``allocator_checkpoint`` returned: the full-rank adapters (unless
    ``load_adapters`` is False) and the allocator state."""
    from .compaction import prepare_allocator_load

    prepare_allocator_load(model, sd, where)  # a state saved after compact(): the model compacted the same way first
    alloc = _require_allocator(model)
    pairs = checkpoint_adapters(model, sd, where)
    alloc_sd = {k[len("allocator.") :]: v for k, v in sd.items() if k.startswith("allocator.")}
    if "ranks" not in alloc_sd:
        raise ValueError(f"{where} holds no allocator state")
    alloc.refresh()
    try:  # first: it checks everything before it changes anything, so a bad state leaves the adapters as they were
        alloc.load_state_dict(alloc_sd)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if load_adapters:
        with torch.no_grad():
            for p, v in pairs:
                p.copy_(v.to(p.dtype))
