"""adalora_fast: PEFT's AdaLoRA, with fused kernels and a fast CPU path.

import adalora_fast as af
model = af.get_peft_model(base_model, af.AdaLoraConfig(init_r=12, target_r=8, total_step=1000,
                                                       target_modules=["q_proj", "v_proj"]))
"""

from .allocator import RankAllocator, budget_schedule
from .bases import AdaLoraConv2d, AdaLoraLinear4bit, AdaLoraLinear8bitLt, AdaLoraLinearUnfused, adapter_layer
from .compaction import compact_model as compact
from .config import AdaLoraConfig, PeftType
from .fileio import CheckpointError
from .layer import AdaLoraLayer, AdaLoraLinear
from .model import AdaLoraModel, ModulesToSaveWrapper, get_peft_model
from .ops import backend_name
from .peft_patch import accelerate, patch_peft, unpatch_peft


def __getattr__(name):
    # The Trainer callback imports transformers.TrainerCallback (and accelerate): load it on demand.
    if name == "AdaLoraCallback":
        from .callback import AdaLoraCallback

        return AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraConv2d",
    "AdaLoraLayer",
    "AdaLoraLinear",
    "AdaLoraLinear4bit",
    "AdaLoraLinear8bitLt",
    "AdaLoraLinearUnfused",
    "AdaLoraModel",
    "CheckpointError",
    "ModulesToSaveWrapper",
    "PeftType",
    "RankAllocator",
    "accelerate",
    "adapter_layer",
    "backend_name",
    "budget_schedule",
    "compact",
    "get_peft_model",
    "patch_peft",
    "unpatch_peft",
]
