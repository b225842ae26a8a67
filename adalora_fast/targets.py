"""Which modules of a model get an adapter: ``target_modules`` matching as PEFT's
``check_target_module_exists`` does it (names, suffixes, a regex, ``exclude_modules``,
``layers_to_transform``), PEFT's defaults by ``model_type``, ``"all-linear"``, and the checks that
a match can be adapted.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .config import AdaLoraConfig
from .layer import AdaLoraLinear, is_adaptable

# Default target modules by `model.config.model_type`, as PEFT's
# TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (the subset with nn.Linear/Conv1D layers).
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}


def resolve_target_modules(model: nn.Module, config: AdaLoraConfig) -> None:
    """Replace ``config.target_modules`` None (PEFT's default for the model type) or ``"all-linear"``
    (every adaptable layer but the output embeddings) by the names they stand for."""
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


def layer_index(key: str, layers_pattern) -> Optional[int]:
    """The index of the layer a module name lies in (``layers.3.``), as PEFT reads it for ``layers_to_transform``."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        return int(m.group("idx")) if m else None
    for pat in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
        if m:
            return int(m.group("idx"))
    return None


def is_target(config: AdaLoraConfig, key: str) -> bool:
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
        idx = layer_index(key, config.layers_pattern)
        wanted = config.layers_to_transform
        wanted = [wanted] if isinstance(wanted, int) else wanted
        found = idx is not None and idx in wanted
    return found


def find_targets(model: nn.Module, config: AdaLoraConfig) -> list:
    """Names of the modules of ``model`` to adapt, in model order. A match that is no linear layer
    raises, unless it holds submodules and ``target_modules`` is a list (PEFT skips those); so does
    a ``target_modules`` that matches nothing."""
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLinear) or not name:
            continue
        if ".base_layer" in f".{name}" or not is_target(config, name):
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
            + ", ".join([n for n, m in model.named_modules() if is_adaptable(m)][:8])
        )
    return targets
