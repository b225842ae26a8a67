"""Hugging Face ``Trainer`` integration: PEFT's AdaLoRA never has ``update_and_allocate`` called
by the Trainer, so the budget silently stays at ``init_r``. This callback calls it at the right
moment (after ``optimizer.step()``, before the Trainer zeroes the gradients), writes the
allocator state into every Trainer checkpoint and restores it when training resumes.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

import torch
from transformers import TrainerCallback

from .fileio import CheckpointError
from .save_load import ALLOCATOR_STATE_NAME, checkpoint_adapters, read_allocator_state


class AdaLoraCallback(TrainerCallback):
    """``Trainer(..., callbacks=[AdaLoraCallback(model)])`` with ``model`` an ``AdaLoraModel``.

    ``state.global_step`` counts optimizer steps from 0 when the event fires, so the schedule
    sees the same step numbers as the manual loop ``for step in range(total_step)``.

    Checkpoints: at every Trainer save the callback writes, into the checkpoint folder
    ``<output_dir>/checkpoint-<global_step>``, ``model.save_pretrained(folder,
    save_allocator_state=True)``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``
    (so a checkpoint also loads with ``peft.PeftModel.from_pretrained``) and
    ``adalora_allocator_state.safetensors`` (importance averages, mask, phase, last step, full-rank
    adapters), each file atomically. It writes them when the save is decided (``on_step_end`` /
    ``on_epoch_end``), before the Trainer writes its files and deletes checkpoints beyond
    ``save_total_limit``, so a kill at any point of a save leaves the previous checkpoint or a
    complete new one (``on_save`` covers saves decided after evaluation, ``save_strategy="best"``).
    The Trainer itself saves the whole state dict (``model.safetensors``, full-rank adapters
    included), the optimizer, scheduler and RNG states. A warning says when ``total_step`` is
    larger than the Trainer's ``max_steps`` (the budget would not reach ``target_r``).

    Resume: ``trainer.train(resume_from_checkpoint=...)`` restores the weights, then fires
    ``on_train_begin`` with ``state.global_step`` > 0; the event does not carry the path. The
    callback looks for the allocator state in, in order: ``resume_from_checkpoint`` given here;
    the path the running ``Trainer`` resumes from (read from its training loop's frame, where
    ``train(resume_from_checkpoint=True)`` has already become the last checkpoint's path);
    ``args.resume_from_checkpoint`` (a path); ``<args.output_dir>/checkpoint-<global_step>``. A
    folder is taken only if its state was saved after step ``global_step - 1`` and its full-rank
    adapters equal the weights the Trainer just restored; its allocator state is then loaded,
    and the resumed run continues exactly as the uninterrupted one.

    If no such state is found the callback raises ``RuntimeError`` (it never warns and goes on):
    without its importance state the allocator would mask on fresh scores (different ranks in
    the reduction phase; past ``total_step - tfinal``, a final mask fixed on all-zero scores that
    prunes whole layers to rank 0). A checkpoint written without this callback cannot be resumed
    exactly; train again, or resume with a new callback from a checkpoint that has the state.

    ``compact=True``: right after the step that fixes the final mask (``total_step - tfinal``, or
    the first step after it that the callback sees) the callback calls ``model.compact(optimizer)``
    with the Trainer's optimizer, so the final phase trains only the kept triplets (see
    ``AdaLoraModel.compact``). Checkpoints written after it hold the compacted tensors; a resumed
    run takes their shapes when the Trainer loads the weights (before it builds the optimizer) and
    continues exactly. Single process only (a DDP/FSDP run raises when training begins).
    """

    def __init__(self, model, resume_from_checkpoint: Optional[str] = None, compact: bool = False) -> None:
        from .model import AdaLoraModel

        if not isinstance(model, AdaLoraModel):
            hint = (
                " (a PEFT model: af.patch_peft() or af.accelerate(model) runs its rank schedule in the "
                "Trainer without a callback)"
                if type(model).__module__.startswith("peft")
                else ""
            )
            raise TypeError(f"AdaLoraCallback needs an adalora_fast.AdaLoraModel, got {type(model).__name__}{hint}")
        self.model = model
        self.resume_from_checkpoint = resume_from_checkpoint
        # compact=True: model.compact(optimizer) right after the step that fixes the final mask (off by
        # default: PEFT keeps the pruned triplets, and training after compaction is not bit-identical)
        self.compact = bool(compact)
        self.restored_from: Optional[str] = None
        self._saved: Optional[tuple] = None  # (folder, step) of the state written ahead of the Trainer's save

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

    def on_train_begin(self, args, state, control, **kwargs):
        alloc = self.model.rankallocator
        if alloc is None:
            raise RuntimeError("AdaLoraCallback: the model was built with inference_mode=True; it cannot be trained")
        if self.compact and getattr(args, "world_size", 1) > 1:
            raise RuntimeError(
                f"AdaLoraCallback(compact=True): this run has {args.world_size} processes (DDP/FSDP); compaction "
                "replaces parameters their wrappers hold. Train with compact=False and call model.compact() "
                "after training"
            )
        self._check_total_step(alloc.config, getattr(state, "max_steps", 0) or 0)
        if state.global_step > 0:
            self._restore(args, state.global_step)
        elif alloc.last_step is not None:
            raise RuntimeError(
                f"AdaLoraCallback: training starts at step 0, but this model's rank allocator has already run to "
                f"step {alloc.last_step}; steps would repeat. Wrap a fresh base model (get_peft_model), or resume "
                "from a checkpoint with trainer.train(resume_from_checkpoint=...)"
            )
        return control

    @staticmethod
    def _check_total_step(cfg, max_steps: int) -> None:
        """Warn when the schedule is longer than the run: the callback passes steps 0 .. max_steps - 1."""
        if max_steps <= 0 or cfg.total_step <= max_steps:
            return
        final_start = cfg.total_step - cfg.tfinal
        if final_start > max_steps - 1:
            what = (
                f"the run ends at step {max_steps - 1}, before the final phase starts at step {final_start}: the "
                "budget never falls to target_r per layer and the final mask is never fixed"
            )
        else:
            what = f"the final mask is fixed at step {final_start} but kept for fewer than tfinal={cfg.tfinal} steps"
        warnings.warn(
            f"AdaLoraCallback: AdaLoraConfig.total_step={cfg.total_step} is larger than the Trainer's "
            f"max_steps={max_steps}; {what}. Set total_step to the run's number of optimizer steps ({max_steps}).",
            UserWarning,
            stacklevel=3,
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.update_and_allocate(state.global_step)
        if self.compact:
            from .compaction import compact_if_final

            compact_if_final(self.model, kwargs.get("optimizer"))
        return control

    # ------------------------------------------------------------------ checkpoints
    # The Trainer's _save_checkpoint writes checkpoint-N, then deletes the checkpoints beyond
    # save_total_limit, and only then fires on_save: state written in on_save alone would leave a
    # window (a kill after the rotation) in which the newest checkpoint has no state and the one
    # before it is gone. So the state goes into checkpoint-N at the event that decides the save
    # (on_step_end / on_epoch_end, after DefaultFlowCallback has set control.should_save), before
    # the Trainer writes anything; on_save writes it only for saves decided later (save_strategy
    # "best", decided after evaluation). The model does not change between the two events.
    def on_step_end(self, args, state, control, **kwargs):
        self._save_ahead(args, state, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._save_ahead(args, state, control)
        return control

    def _save_ahead(self, args, state, control) -> None:
        if not control.should_save or getattr(state, "is_hyper_param_search", False):
            return  # hyperparameter search: the Trainer saves into a run folder of its own; on_save warns
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # every rank: under FSDP the adapters are gathered (collective); only the main process writes
        main = getattr(args, "should_save", True)
        self.model.save_pretrained(folder, save_allocator_state=True, is_main_process=main)
        if main:
            self._saved = (folder, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if not getattr(args, "should_save", True):
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._saved == (folder, state.global_step) and os.path.isfile(os.path.join(folder, ALLOCATOR_STATE_NAME)):
            return control  # written before the Trainer's save (_save_ahead)
        if not os.path.isdir(folder):
            warnings.warn(
                f"AdaLoraCallback: the Trainer saved a checkpoint, but {folder!r} does not exist (hyperparameter "
                "search runs save elsewhere); the allocator state was not written, so this checkpoint cannot "
                "be resumed exactly",
                stacklevel=2,
            )
            return control
        self.model.save_pretrained(folder, save_allocator_state=True)
        return control

    # ------------------------------------------------------------------ resume
    @staticmethod
    def _trainer_resume_path() -> Optional[str]:
        """The ``resume_from_checkpoint`` local of the Trainer's training loop that fired this event.

        Read from the caller's frames because the Trainer hands callbacks no checkpoint path: the
        events carry args, state, control, model, optimizer, scheduler and dataloaders; the Trainer
        stores the path nowhere, not in ``args.resume_from_checkpoint``, nor in ``TrainerState``;
        and ``trainer_state.json`` cannot name its own folder, which may have been moved or copied.
        """
        from transformers import Trainer

        frame = sys._getframe(1)
        while frame is not None:
            loc = frame.f_locals
            if isinstance(loc.get("self"), Trainer) and "resume_from_checkpoint" in loc:
                path = loc["resume_from_checkpoint"]
                return path if isinstance(path, (str, os.PathLike)) else None
            frame = frame.f_back
        return None

    def _candidates(self, args, global_step: int) -> list:
        out = []
        for c in (
            self.resume_from_checkpoint,
            self._trainer_resume_path(),
            getattr(args, "resume_from_checkpoint", None),
            os.path.join(args.output_dir, f"checkpoint-{global_step}"),
        ):
            if isinstance(c, (str, os.PathLike)) and os.fspath(c) not in out:
                out.append(os.fspath(c))
        return out

    def _restore(self, args, global_step: int) -> None:
        why = []
        for folder in self._candidates(args, global_step):
            path = os.path.join(folder, ALLOCATOR_STATE_NAME)
            if not os.path.isfile(path):
                why.append(
                    f"{folder!r}: no {ALLOCATOR_STATE_NAME}" if os.path.isdir(folder) else f"{folder!r}: not a folder"
                )
                continue
            try:
                sd, _ = read_allocator_state(path)
            except CheckpointError as exc:  # torn or corrupt: say so, and look at the other candidates
                why.append(str(exc))
                continue
            saved_step = int(sd["allocator.last_step"]) if "allocator.last_step" in sd else None
            if saved_step is not None and saved_step != global_step - 1:
                why.append(f"{folder!r}: saved after step {saved_step}, the Trainer resumes at step {global_step}")
                continue
            pairs = checkpoint_adapters(self.model, sd, repr(path))
            if not all(torch.equal(p.detach().cpu(), v.to(p.dtype)) for p, v in pairs):
                why.append(f"{folder!r}: its adapters differ from the weights the Trainer restored (another run?)")
                continue
            self.model.load_allocator_checkpoint(sd, load_adapters=False, where=repr(path))
            self.restored_from = folder
            return
        raise RuntimeError(
            f"AdaLoraCallback: the Trainer resumes at step {global_step}, but no AdaLoRA allocator state for that "
            "checkpoint was found (" + "; ".join(why) + "). Without it the importance scores would start empty "
            "and the resumed run would prune differently (past total_step - tfinal, whole layers to rank 0). "
            "A checkpoint written without AdaLoraCallback holds no allocator state and cannot be resumed "
            "exactly; if the state lies elsewhere, pass its folder as AdaLoraCallback(model, "
            "resume_from_checkpoint=...)."
        )
