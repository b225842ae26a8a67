"""One fine-tune: build the wrapped model, train it with the Hugging Face ``Trainer`` (recording
each step's time, cross-entropy and the allocator's total rank), test it, and read its final ranks."""

from __future__ import annotations

import functools
import os
import re
import statistics
import time
import warnings
from typing import Dict, List, Optional, Tuple

from .data import LABEL2ID, LABELS, Examples, model_dir
from .plan import ADALORA, KINDS, METHODS, TARGET_MODULES, Plan


def kind_of(module_name: str) -> Tuple[int, str]:
    """(layer index, module kind) of an adapted BERT module from its full name."""
    m = re.search(r"layer\.(\d+)\.(.+)$", module_name)
    if not m:
        raise ValueError(f"not a BERT encoder module: {module_name!r}")
    rest = m.group(2)
    for kind, suffix in KINDS:  # attention.output.dense before output.dense
        if rest == suffix or rest.endswith("." + suffix):
            return int(m.group(1)), kind
    raise ValueError(f"unknown module kind in {module_name!r}")


def _adalora_modules(model):
    """(name, module) of every module holding a default AdaLoRA adapter (a ``lora_E`` dict)."""
    for name, mod in model.named_modules():
        E = getattr(mod, "lora_E", None)
        if E is not None and hasattr(E, "keys") and "default" in E:
            yield name, mod


def adapted_E(model) -> List[Tuple[str, object]]:
    """(module name, lora_E tensor of the default adapter) for every AdaLoRA-adapted module."""
    return [(name, mod.lora_E["default"]) for name, mod in _adalora_modules(model)]


def ranks_now(model) -> Dict[Tuple[int, str], int]:
    """Nonzero entries of lora_E per (layer, kind): both implementations mask a triplet by setting
    its E entry to exactly 0 (and re-apply the mask every step of the final phase), so after the
    last step this is the final rank; a cross-check of ``rank_pattern``."""
    import torch

    with torch.no_grad():
        return {kind_of(n): int((E != 0).sum()) for n, E in adapted_E(model)}


def ranks_from_pattern(pattern: Optional[dict]) -> Optional[Dict[Tuple[int, str], int]]:
    """Rank per (layer, kind) from a ``rank_pattern`` dict ({"...<module>.lora_E[.default]": [bool]*r})."""
    if not pattern:
        return None
    out = {}
    for key, bits in pattern.items():
        mod = re.sub(r"\.lora_E(\.default)?$", "", key)
        out[kind_of(mod)] = int(sum(bool(b) for b in bits))
    return out


def ranks_chosen(model, method: str, init_r: int) -> Dict[Tuple[int, str], int]:
    """The allocator's current mask as a rank per (layer, kind): ``rank_pattern`` (ours: the
    property; PEFT: ``peft_config["default"].rank_pattern``, set at each masking step), or
    ``init_r`` everywhere before the first mask."""
    if method in ("ours", "ours_compact"):
        pattern = model.rank_pattern
    else:
        pattern = model.peft_config["default"].rank_pattern
    got = ranks_from_pattern(pattern)
    if got is None:
        return {kind_of(n): init_r for n, _ in adapted_E(model)}
    return got


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_head_trainable(model, method: str) -> None:
    head = [n for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    if not head:
        raise RuntimeError(
            f"{method}: the classifier head is not trainable after wrapping with task_type='SEQ_CLS' "
            "(its modules_to_save support is missing in this version?); the comparison would not be fair"
        )


def build(method: str, plan: Plan, seed: int, device):
    """A fresh all-MiniLM-L6-v2 with a 3-way head (the same head init for every method at one seed),
    wrapped by ``method``. Returns (model, callbacks, adalora config or None)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.set_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=dict(LABEL2ID)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method in ("ours", "ours_compact"):
            import adalora_fast as af

            cfg = af.AdaLoraConfig(task_type="SEQ_CLS", **plan.adalora_kwargs())
            model = af.get_peft_model(base, cfg)
            callbacks = [af.AdaLoraCallback(model, compact=method == "ours_compact")]
        elif method == "peft_adalora":
            import peft

            cfg = peft.AdaLoraConfig(task_type="SEQ_CLS", **plan.adalora_kwargs())
            model = peft.get_peft_model(base, cfg)
            callbacks = [PeftAdaLoraCallback(model)]
        elif method == "peft_lora":
            import peft

            cfg = None
            model = peft.get_peft_model(
                base,
                peft.LoraConfig(
                    task_type="SEQ_CLS",
                    r=plan.target_r,
                    lora_alpha=plan.lora_alpha,
                    lora_dropout=plan.lora_dropout,
                    target_modules=list(TARGET_MODULES),
                ),
            )
            callbacks = []
        else:
            raise ValueError(f"method={method!r}: one of {METHODS}")
    _check_head_trainable(model, method)
    return model.to(device), callbacks, cfg


@functools.lru_cache(maxsize=None)
def _trainer_classes():
    """Callbacks and the Trainer subclass, defined on first use (transformers imports are slow)."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainerCallback

    class _PeftAdaLoraCallback(TrainerCallback):
        """PEFT's AdaLoRA under the Trainer: ``update_and_allocate`` after the optimizer step and before
        ``zero_grad`` (PEFT reads ``p.grad``), with the Trainer's 0-based optimizer-step counter,
        exactly where ``adalora_fast.AdaLoraCallback`` calls ours."""

        def __init__(self, model):
            self.model = model

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.model.base_model.update_and_allocate(state.global_step)
            return control

    class _Recorder(TrainerCallback):
        """Per step: wall time (on_step_begin -> on_step_end: forward, backward, optimizer step,
        update_and_allocate, zero_grad; minus the recorder's own reading of the mask), the training
        cross-entropy, and at each deltaT-th step the total rank the allocator keeps (its mask,
        read after update_and_allocate)."""

        def __init__(self, model, plan: Plan, method: str, on_step):
            self.model, self.plan, self.method, self.on_step = model, plan, method, on_step
            self.adalora = method in ADALORA
            self.step_s: List[float] = []
            self.ce: List[float] = []
            self.loss: List[float] = []
            self.total_rank: List[Tuple[int, int]] = []
            self._t0 = 0.0
            self._own = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._own = 0.0
            self._t0 = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            step = state.global_step
            if self.adalora and (step % self.plan.deltaT == 0 or step == self.plan.total_step - 1):
                t = time.perf_counter()
                ranks = ranks_chosen(self.model, self.method, self.plan.init_r)
                self.total_rank.append((step, sum(ranks.values())))
                self._own += time.perf_counter() - t

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self._t0 - self._own)
            self.on_step(state.global_step - 1, self.ce[-1] if self.ce else float("nan"))

    class _Trainer(Trainer):
        """The Trainer, also keeping each step's plain cross-entropy (the AdaLoRA losses include
        orth_reg_weight x the orthogonal penalty, LoRA's does not: the curves compare the CE)."""

        recorder: Optional[_Recorder] = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            loss = out["loss"] if isinstance(out, dict) else out.loss
            if self.recorder is not None and model.training:
                with torch.no_grad():
                    ce = F.cross_entropy(out.logits.float(), inputs["labels"])
                self.recorder.ce.append(float(ce))
                self.recorder.loss.append(float(loss.detach()))
            return (loss, out) if return_outputs else loss

    return _PeftAdaLoraCallback, _Recorder, _Trainer


def PeftAdaLoraCallback(model):
    return _trainer_classes()[0](model)


def accuracy_and_macro_f1(pred, gold, n_classes: int = len(LABELS)) -> Tuple[float, float]:
    """Accuracy, and the unweighted mean over all ``n_classes`` classes of F1 = 2 TP / (2 TP + FP + FN)
    (a class with no gold and no predicted item counts F1 = 0)."""
    import torch

    pred = torch.as_tensor(pred).long().view(-1)
    gold = torch.as_tensor(gold).long().view(-1)
    if pred.numel() != gold.numel() or pred.numel() == 0:
        raise ValueError(f"pred has {pred.numel()} items, gold {gold.numel()}: need the same, > 0")
    conf = torch.bincount(gold * n_classes + pred, minlength=n_classes * n_classes).view(n_classes, n_classes)
    tp = conf.diag().double()
    fp = conf.sum(0).double() - tp
    fn = conf.sum(1).double() - tp
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))
    return float(tp.sum() / gold.numel()), float(f1.mean())


def evaluate(model, data: Examples, collator, batch: int, device) -> Tuple[float, float, float]:
    """(accuracy, macro-F1, seconds) of ``model`` on ``data`` (eval mode, no grad)."""
    import torch

    t0 = time.perf_counter()
    model.eval()
    preds, gold = [], []
    order = sorted(range(len(data)), key=lambda j: len(data.enc["input_ids"][j]))  # little padding
    with torch.no_grad():
        for i in range(0, len(data), batch):
            b = collator([data[j] for j in order[i : i + batch]])
            labels = b.pop("labels")
            b = {k: v.to(device) for k, v in b.items()}
            preds.append(model(**b).logits.argmax(-1).cpu())
            gold.append(labels)
    acc, f1 = accuracy_and_macro_f1(torch.cat(preds), torch.cat(gold))
    return acc, f1, time.perf_counter() - t0


def run_one(method: str, seed: int, plan: Plan, train_ds, test_ds, tokenizer, device, workdir: str, on_step) -> dict:
    """Train ``method`` at ``seed`` on ``train_ds``, test on ``test_ds``; ``on_step(step, ce)`` after each
    step. Returns the figures and per-step records of the run (one row of the results)."""
    from transformers import DataCollatorWithPadding, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _, Recorder, Trainer = _trainer_classes()
    t_start = time.perf_counter()
    model, callbacks, cfg = build(method, plan, seed, device)
    n_trainable = trainable_count(model)
    recorder = Recorder(model, plan, method, on_step=on_step)
    args = TrainingArguments(
        output_dir=os.path.join(workdir, f"{method}-{seed}"),
        max_steps=plan.total_step,
        per_device_train_batch_size=plan.batch,
        learning_rate=plan.lr,
        lr_scheduler_type="linear",
        warmup_steps=plan.warmup_steps,
        weight_decay=plan.weight_decay,
        seed=seed,
        data_seed=seed,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
    )
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, data_collator=collator, callbacks=callbacks + [recorder]
    )
    trainer.recorder = recorder
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    acc, f1, eval_s = evaluate(model, test_ds, collator, plan.eval_batch, device)

    final_ranks = ranks_chosen(model, method, plan.init_r) if cfg is not None else None
    rank_check = None
    if final_ranks is not None:
        rank_check = ranks_now(model) == final_ranks
    tail = max(1, plan.total_step // 10)
    res = dict(
        method=method,
        seed=seed,
        accuracy=acc,
        macro_f1=f1,
        final_train_ce=statistics.fmean(recorder.ce[-tail:]),
        final_train_ce_steps=tail,
        median_step_ms=1e3 * statistics.median(recorder.step_s),
        # the steps after the one that fixes the final mask (where ours_compact has compacted)
        final_phase_step_ms=1e3
        * statistics.median(recorder.step_s[plan.total_step - plan.tfinal + 1 :] or [float("nan")]),
        train_s=train_s,
        eval_s=eval_s,
        total_s=time.perf_counter() - t_start,
        trainable_params=n_trainable,
        steps=len(recorder.step_s),
        ce=recorder.ce,
        loss=recorder.loss,
        step_s=recorder.step_s,
        total_rank=recorder.total_rank,
    )
    if final_ranks is not None:
        res["final_ranks"] = {f"{layer}:{kind}": r for (layer, kind), r in sorted(final_ranks.items())}
        res["final_total_rank"] = sum(final_ranks.values())
        res["rank_pattern_matches_nonzero_E"] = rank_check
        res["final_adapter_params"] = _final_adapter_params(model, final_ranks)
        alloc = getattr(model, "rankallocator", None) or getattr(model.base_model, "rankallocator", None)
        res["init_bgt"], res["target_bgt"] = int(alloc.init_bgt), int(alloc.target_bgt)
    elif method == "peft_lora":
        res["final_total_rank"] = plan.target_r * _count_lora_modules(model)
        res["final_adapter_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return res


def _final_adapter_params(model, ranks: Dict[Tuple[int, str], int]) -> int:
    """Adapter parameters in use at the end: r_i x (in + out + 1) per module (A rows, B columns, E)."""
    total = 0
    for name, mod in _adalora_modules(model):
        k, d = mod.lora_A["default"].shape[1], mod.lora_B["default"].shape[0]
        total += ranks[kind_of(name)] * (k + d + 1)
    return total


def _count_lora_modules(model) -> int:
    return sum(
        1
        for _, m in model.named_modules()
        if hasattr(m, "lora_A") and hasattr(m.lora_A, "keys") and "default" in m.lora_A
    )
