"""Which modules of a model get an adapter: ``target_modules`` matching as PEFT's
``check_target_module_exists`` does it (names, suffixes, a regex, ``exclude_modules``,
``layers_to_transform``), PEFT's defaults by ``model_type``, ``"all-linear"``, and the checks that
a match can be adapted.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .bases import is_adaptable, is_linear_like, unsupported_reason
from .config import AdaLoraConfig
from .layer import AdaLoraLayer

# PEFT 0.21's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING (peft/utils/constants.py), entry
# for entry: peft is no runtime dependency, and tests/test_bases.py fails when PEFT's table changes.
# A value is a list of module-name suffixes or, as PEFT's "gemma4", one regex.
PEFT_ADALORA_TARGET_MODULES = {
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
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# Defaults PEFT's AdaLoRA table lacks (PEFT raises "Please specify `target_modules`" for these):
# taken from PEFT's LoRA table.
EXTRA_TARGET_MODULES = {
    "mistral": ["q_proj", "v_proj"],
}

DEFAULT_TARGET_MODULES = {**PEFT_ADALORA_TARGET_MODULES, **EXTRA_TARGET_MODULES}


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
        default = DEFAULT_TARGET_MODULES[mt]
        config.target_modules = default if isinstance(default, str) else set(default)  # a regex stays one (PEFT)
    elif isinstance(tm, str) and tm.lower() == "all-linear":
        # PEFT's selection: every nn.Linear (bitsandbytes' layers included) and Conv1D; one that
        # cannot be adapted raises in find_targets rather than being skipped silently
        names = {n for n, m in model.named_modules() if is_linear_like(m) and ".base_layer" not in f".{n}"}
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
    """Names of the modules of ``model`` to adapt, in model order. A match that no path adapts
    (``bases.base_kind``) raises naming its type, unless it holds submodules and ``target_modules``
    is a list (PEFT skips those); so does a ``target_modules`` that matches nothing."""
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) or not name:
            continue
        if ".base_layer" in f".{name}" or not is_target(config, name):
            continue
        if not is_adaptable(module):
            if list(module.children()) and not isinstance(config.target_modules, str):
                continue
            raise ValueError(f"target module {name!r}: {unsupported_reason(module)}")
        targets.append(name)
    if not targets:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model that can be adapted; "
            "such modules are, for example: " + ", ".join([n for n, m in model.named_modules() if is_adaptable(m)][:8])
        )
    return targets
