"""Hugging Face ``Trainer`` integration: PEFT's AdaLoRA never has ``update_and_allocate`` called
by the Trainer, so the budget silently stays at ``init_r``. This callback calls it at the right
moment: after ``optimizer.step()`` and before the Trainer zeroes the gradients.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback


class AdaLoraCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AdaLoraCallback(model)])`` with ``model`` an ``AdaLoraModel``.

    ``state.global_step`` counts optimizer steps from 0 when the event fires, so the schedule
    sees the same step numbers as the manual loop ``for step in range(total_step)``.
    """

    def __init__(self, model) -> None:
        if not hasattr(model, "update_and_allocate"):
            raise TypeError(f"AdaLoraCallback needs an adalora_fast.AdaLoraModel, got {type(model).__name__}")
        self.model = model

    def on_init_end(self, args, state, control, **kwargs):
        # Trainer drops dataset columns that are not parameters of model.forward; ours takes
        # (*args, **kwargs) and hands everything to the base model, so dropping would empty the batch.
        if getattr(args, "remove_unused_columns", False):
            warnings.warn(
                "AdaLoraCallback: setting TrainingArguments.remove_unused_columns=False, since "
                "AdaLoraModel.forward passes every batch key to the base model",
                stacklevel=2,
            )
            args.remove_unused_columns = False
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.update_and_allocate(state.global_step)
        return control
