"""Modules trained whole beside the adapters (``modules_to_save``): PEFT's ``ModulesToSaveWrapper``
(a frozen original and a trainable copy), the heads PEFT adds for a task type, and the wrapping of
every module the names match.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from .config import AdaLoraConfig
from .layer import AdaLoraLayer

# Modules PEFT trains whole for a task type, as its PeftModelFor<Task> classes add them to
# ``modules_to_save``: PeftModelForSequenceClassification / ...TokenClassification add
# ["classifier", "score"], PeftModelForQuestionAnswering ["qa_outputs"].
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


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


def add_task_defaults(config: AdaLoraConfig) -> tuple[list, list]:
    """Append the task type's default heads to ``config.modules_to_save``, as PeftModelFor<Task> does
    (without the duplicates PEFT appends). Returns (the names asked for, the task's defaults)."""
    asked = list(config.modules_to_save or [])
    defaults = TASK_MODULES_TO_SAVE.get(config.task_type, [])
    if defaults:
        config.modules_to_save = asked + [m for m in defaults if m not in asked]
    return asked, defaults


def wrap_modules_to_save(
    model: nn.Module, config: AdaLoraConfig, adapter_name: str, asked: list, defaults: list, adapted: list
) -> None:
    """PEFT's ``_set_trainable``: wrap every module of ``model`` whose name ends with a
    ``modules_to_save`` entry. ``adapted``: the names of the adapted layers (none may be wrapped);
    warns for each name asked for that matched nothing (for the task defaults: if none matched)."""
    names = config.modules_to_save
    if not names:
        return
    wrapped, matched = [], set()
    for key, module in list(model.named_modules()):
        hits = [t for t in names if key.endswith(t)]
        if not key or not hits or any(key.startswith(f"{w}.") for w in wrapped):
            continue
        if isinstance(module, (AdaLoraLayer, ModulesToSaveWrapper)) or any(key.startswith(f"{a}.") for a in adapted):
            raise ValueError(
                f"modules_to_save={names!r}: {key!r} is an adapted layer or part of one; a module cannot be "
                "both adapted (target_modules) and trained whole (modules_to_save)"
            )
        model.set_submodule(key, ModulesToSaveWrapper(module, adapter_name, inference_mode=config.inference_mode))
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
