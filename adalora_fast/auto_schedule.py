"""The rank schedule of an accelerated PEFT AdaLoRA model (``peft_patch``), run with no call in the
user's script: neither the HF ``Trainer`` nor TRL calls ``update_and_allocate``, and most scripts
written for PEFT never do.

Trigger: a global optimizer step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``).
After every optimizer step, the accelerated models whose adapter parameters that optimizer holds
run one schedule step (``update_and_allocate``: after the step, before ``zero_grad``, where PEFT
documents the call). It works in any loop that steps a ``torch.optim`` optimizer: the HF Trainer,
TRL's trainers, an ``accelerate`` loop, a hand-written one.

* Gradient accumulation: the optimizer steps once per accumulated step (the Trainer, accelerate's
  ``accumulate``, a hand-written loop alike), so the schedule runs once per optimizer step.
* AMP: a step that ``torch.amp.GradScaler`` skips (an inf/NaN gradient) never calls the optimizer.
  ``GradScaler.step`` is wrapped to see it: the skipped step still takes its schedule step number,
  as the Trainer's ``global_step`` counts it, so the schedule stays aligned with ``max_steps`` /
  ``total_step``; its gradient is not used (the weights did not move). A masking step that is skipped
  masks at the next masking step; a skipped ``total_step - tfinal`` fixes the final mask at the next step.
* Step numbers: 0, 1, 2, ... per optimizer step, continuing after the allocator's last step. Under
  the HF Trainer they are ``state.global_step`` (set before each optimizer step by the callback below).
* An explicit ``update_and_allocate(step)`` by the user: the first one hands the schedule to the
  user for good (the hook stands down for that model), and is skipped if the hook already handled
  the optimizer step it follows; nothing is done twice.
* Compaction (``patch_peft(compact=True)`` / ``accelerate(model, compact=True)``): right after the
  schedule step that fixes the final mask, in the same hook, with the optimizer that stepped
  (``compaction.compact_peft``); when the user drives the schedule, after the first optimizer step
  that follows it.

HF Trainer (and subclasses: TRL's ``SFTTrainer``, ...): while installed, ``Trainer.__init__``
attaches :class:`PeftScheduleCallback` when its model is accelerated (so build the Trainer after
``accelerate(model)``, or under ``patch_peft()``). The callback

* fills a missing ``total_step`` from ``state.max_steps`` when training begins, and warns when a
  given ``total_step`` differs from ``max_steps`` (the schedule follows ``total_step``);
* keeps the step numbers equal to ``state.global_step``;
* writes :data:`RESUME_NAME` into every checkpoint (the trainable parameters at full rank and the
  allocator state), beside PEFT's files, which stay as PEFT writes them;
* on ``train(resume_from_checkpoint=...)``: ``Trainer._load_from_checkpoint`` is wrapped to restore
  that file instead of PEFT's ``load_adapter`` (which would resize the layers to the rank pattern:
  the pruned triplets, which later masks may bring back, would be lost and the optimizer state
  would no longer fit). A checkpoint without the file (written unpatched, or by another tool)
  raises ``RuntimeError``: the importance state is not there, and the schedule would restart.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
from transformers import TrainerCallback

RESUME_NAME = "adalora_fast_peft_state.safetensors"
_FORMAT = "adalora_fast peft resume 1"

_LIVE: "weakref.WeakSet" = weakref.WeakSet()  # every accelerated model's state (peft_patch._Accelerated)
_VERSION = [0]  # bumped when _LIVE changes: the optimizer -> owners cache is rebuilt
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_IN_SCALER: dict = {}  # id(optimizer) -> whether it stepped, while GradScaler.step runs
_ORIGINALS: dict = {}  # (class, name) -> original
_HOOK: list = []  # the optimizer post-hook's handle


# ---------------------------------------------------------------------------------- registry
def register(acc) -> None:
    if acc not in _LIVE:
        _LIVE.add(acc)
        _VERSION[0] += 1


def unregister(acc) -> None:
    _LIVE.discard(acc)
    _VERSION[0] += 1


def live() -> list:
    return list(_LIVE)


def _owners(optimizer) -> list:
    """The accelerated models whose adapter parameters ``optimizer`` holds (cached per optimizer)."""
    key = (_VERSION[0], tuple(len(g["params"]) for g in optimizer.param_groups))
    hit = _OWNERS.get(optimizer)
    if hit is None or hit[0] != key:
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        hit = (key, [weakref.ref(a) for a in list(_LIVE) if a.allocator is not None and a.param_ids() & ids])
        _OWNERS[optimizer] = hit
    return [a for a in (r() for r in hit[1]) if a is not None]


# ---------------------------------------------------------------------------------- triggers
def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if not _LIVE:
        return
    key = id(optimizer)
    if key in _IN_SCALER:
        _IN_SCALER[key] = True
    for acc in _owners(optimizer):
        acc.on_optimizer_step(skipped=False)
        if acc.compact:
            from .compaction import compact_peft_if_final

            compact_peft_if_final(acc, optimizer)


def _scaler_step(self, optimizer, *args, **kwargs):
    orig = _ORIGINALS[(torch.amp.GradScaler, "step")]
    if not _LIVE or not self.is_enabled():
        return orig(self, optimizer, *args, **kwargs)
    key = id(optimizer)
    _IN_SCALER[key] = False
    try:
        out = orig(self, optimizer, *args, **kwargs)
    finally:
        stepped = _IN_SCALER.pop(key, True)
    if not stepped:  # the scaler found inf/NaN gradients and skipped optimizer.step()
        for acc in _owners(optimizer):
            acc.on_optimizer_step(skipped=True)
    return out


def _trainer_init(self, *args, **kwargs):
    from transformers import Trainer

    _ORIGINALS[(Trainer, "__init__")](self, *args, **kwargs)
    from .peft_patch import state_of

    acc = state_of(getattr(self, "model", None))
    if (
        acc is not None
        and acc.allocator is not None
        and not any(isinstance(c, PeftScheduleCallback) for c in self.callback_handler.callbacks)
    ):
        self.add_callback(PeftScheduleCallback(acc))


def _trainer_load_from_checkpoint(self, resume_from_checkpoint, model=None):
    from transformers import Trainer

    from .peft_patch import state_of

    acc = state_of(model if model is not None else self.model)
    if acc is None or acc.allocator is None:
        return _ORIGINALS[(Trainer, "_load_from_checkpoint")](self, resume_from_checkpoint, model)
    load_resume_state(acc, resume_from_checkpoint)


def install() -> None:
    """Install the triggers (idempotent)."""
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))
    _patch(torch.amp.GradScaler, "step", _scaler_step)
    try:
        from transformers import Trainer
    except (ImportError, RuntimeError):  # the Trainer needs accelerate; without it, the hook alone runs
        return
    _patch(Trainer, "__init__", _trainer_init)
    _patch(Trainer, "_load_from_checkpoint", _trainer_load_from_checkpoint)


def uninstall() -> None:
    while _HOOK:
        _HOOK.pop().remove()
    for (cls, name), orig in list(_ORIGINALS.items()):
        setattr(cls, name, orig)
    _ORIGINALS.clear()
    _OWNERS.clear()


def _patch(cls, name: str, fn) -> None:
    if (cls, name) not in _ORIGINALS:
        _ORIGINALS[(cls, name)] = cls.__dict__[name]
        setattr(cls, name, fn)


# ---------------------------------------------------------------------------------- Trainer
class PeftScheduleCallback(TrainerCallback):
    """Attached by ``Trainer.__init__`` for an accelerated PEFT AdaLoRA model (see the module's
    docstring): ``total_step`` from ``max_steps``, step numbers = ``global_step``, resume state in
    every checkpoint. The schedule steps themselves run in the optimizer step hook."""

    def __init__(self, acc) -> None:
        self.acc = acc

    def on_train_begin(self, args, state, control, **kwargs):
        acc = self.acc
        if acc not in _LIVE:  # unpatch_peft() handed the model back to PEFT
            return control
        cfg = acc.config
        if cfg.total_step is None:
            if cfg.tinit >= state.max_steps - cfg.tfinal:
                raise ValueError(
                    f"AdaLoRA's total_step was left out and the Trainer runs max_steps={state.max_steps}: with "
                    f"tinit={cfg.tinit} and tfinal={cfg.tfinal} there is no budgeting phase; decrease tfinal/tinit, "
                    "train longer, or set total_step"
                )
            cfg.total_step = state.max_steps
        elif cfg.total_step != state.max_steps:
            warnings.warn(
                f"AdaLoRA's total_step={cfg.total_step}, but the Trainer runs max_steps={state.max_steps}: the rank "
                f"schedule follows total_step (the final mask is fixed at step {cfg.total_step - cfg.tfinal}). Leave "
                "total_step out of the AdaLoraConfig (under adalora_fast.patch_peft()) to take max_steps.",
                stacklevel=2,
            )
        if acc.compact and getattr(args, "world_size", 1) > 1:
            from .compaction import _DISTRIBUTED_MESSAGE

            raise RuntimeError(f"compact=True: {_DISTRIBUTED_MESSAGE}")
        if acc.explicit:
            return control
        last = acc.current_allocator().last_step
        if state.global_step > 0 and acc.resumed_at != state.global_step:
            raise RuntimeError(
                f"the Trainer resumes at step {state.global_step}, but the AdaLoRA rank allocator's state for that "
                f"checkpoint was not restored (no {RESUME_NAME}, or a checkpoint of another step): the importance "
                "averages would restart empty and the resumed run would prune differently"
            )
        if state.global_step == 0 and last is not None:
            raise RuntimeError(
                f"training starts at step 0, but this model's rank schedule has already run to step {last}; steps "
                "would repeat. Build a fresh PEFT model, or resume with trainer.train(resume_from_checkpoint=...)"
            )
        acc.next_step = state.global_step
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.acc.next_step = state.global_step
        return control

    def on_save(self, args, state, control, **kwargs):
        if not getattr(args, "should_save", True) or self.acc not in _LIVE:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(
                f"adalora_fast: the Trainer saved a checkpoint, but {folder!r} does not exist; the rank allocator's "
                "state was not written, so this checkpoint cannot be resumed",
                stacklevel=2,
            )
            return control
        save_resume_state(self.acc, folder, state.global_step)
        return control


def save_resume_state(acc, folder: str, global_step: int) -> None:
    """Write :data:`RESUME_NAME` into ``folder``: every trainable parameter of the tuner at full rank
    (``param.<tuner state-dict key>``: adapters, modules to save, trained biases) and the allocator
    state (``allocator.<key>``), tied to ``global_step``."""
    from safetensors.torch import save

    from .fileio import atomic_write

    tensors = {f"param.{k}": p.detach().cpu().contiguous() for k, p in acc.tuner.named_parameters() if p.requires_grad}
    for k, v in acc.current_allocator().state_dict().items():
        tensors[f"allocator.{k}"] = v.detach().cpu().contiguous()
    atomic_write(
        os.path.join(folder, RESUME_NAME),
        save(tensors, metadata={"format": _FORMAT, "global_step": str(int(global_step))}),
    )


def load_resume_state(acc, folder: str) -> None:
    """Restore what :func:`save_resume_state` wrote (checked whole before anything changes)."""
    from safetensors import safe_open

    path = os.path.join(os.fspath(folder), RESUME_NAME)
    if not os.path.isfile(path):
        raise RuntimeError(
            f"resuming an accelerated PEFT AdaLoRA model from {os.fspath(folder)!r}, which has no {RESUME_NAME} (it "
            "was written without adalora_fast's schedule, or by another tool): without the rank allocator's state "
            "the importance averages would restart empty and the resumed run would prune differently. Resume from "
            "a checkpoint written while patched, or train from the start."
        )
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != _FORMAT or "global_step" not in meta:
        raise RuntimeError(f"{path!r} is not an adalora_fast PEFT resume state (format {meta.get('format')!r})")
    state = {k[len("allocator.") :]: v for k, v in tensors.items() if k.startswith("allocator.")}
    if "compacted" in state and bool(state["compacted"]):
        from .compaction import prepare_peft_resume

        prepare_peft_resume(acc, state, repr(path))  # the layers take the saved, compacted shapes first
    named = dict(acc.tuner.named_parameters())
    params = {}
    for k, v in tensors.items():
        if not k.startswith("param."):
            continue
        p = named.get(k[len("param.") :])
        if p is None or p.shape != v.shape:
            what = "no such parameter" if p is None else f"shape {tuple(v.shape)}, the model's {tuple(p.shape)}"
            raise RuntimeError(f"{path!r}: {k[len('param.') :]}: {what}; the checkpoint is of another model")
        params[p] = v
    alloc = acc.current_allocator()
    ranks = [int(r) for r in state["ranks"].tolist()] if "ranks" in state else None
    model_ranks = getattr(alloc, "full_ranks", alloc.layout.ranks)  # a compacted model: the ranks before it
    if ranks != model_ranks:
        raise RuntimeError(f"{path!r}: allocator state for ranks {ranks}, the model's layers have {model_ranks}")
    with torch.no_grad():
        for p, v in params.items():
            p.copy_(v.to(p.dtype))
    alloc.load_state_dict(state)
    if alloc.rank_pattern is not None:
        acc.config.rank_pattern = alloc.rank_pattern
    acc.resumed_at = acc.next_step = int(meta["global_step"])
