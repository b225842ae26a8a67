"""What a fine-tune run does: the methods compared, the modules they adapt, and the two plans
(steps, batch, AdaLoRA schedule, seeds) of ``python -m bench finetune`` and its ``--quick`` run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# ours_compact: ours with AdaLoraCallback(compact=True), the pruned triplets dropped once the final
# mask is fixed (its ranks are ours', so the rank and budget plots leave it out)
METHODS = ("ours", "ours_compact", "peft_adalora", "peft_lora")
# the methods with a rank allocator: the ones drawn in the rank and budget plots
ADALORA = ("ours", "peft_adalora")
# The six kinds of BERT linear layer, as they end a module's name (rows of the rank heatmap).
KINDS = (
    ("query", "attention.self.query"),
    ("key", "attention.self.key"),
    ("value", "attention.self.value"),
    ("attention.output.dense", "attention.output.dense"),
    ("intermediate.dense", "intermediate.dense"),
    ("output.dense", "output.dense"),
)
# PEFT-style suffix targets: "output.dense" also matches "attention.output.dense"; the pooler's
# "pooler.dense" matches none, the classifier is trained whole (modules_to_save), not adapted.
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass(frozen=True)
class Plan:
    name: str
    n_train: int
    n_test: int
    max_length: int
    batch: int
    total_step: int
    tinit: int
    tfinal: int
    deltaT: int
    seeds: Tuple[int, ...]
    init_r: int = 12
    target_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lr: float = 3e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    orth_reg_weight: float = 0.5
    beta1: float = 0.85
    beta2: float = 0.85
    eval_batch: int = 128
    smooth: int = 10  # moving-average window of the loss curves, steps

    def adalora_kwargs(self) -> dict:
        return dict(
            init_r=self.init_r,
            target_r=self.target_r,
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.deltaT,
            total_step=self.total_step,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(TARGET_MODULES),
        )

    def describe(self) -> str:
        return (
            f"{self.total_step} steps x batch {self.batch} ({self.n_train} train texts, one pass), max_length "
            f"{self.max_length}, AdamW lr {self.lr:g} linear decay, warm-up {self.warmup_steps} steps, "
            f"weight decay {self.weight_decay:g}; AdaLoRA init_r={self.init_r} -> target_r={self.target_r}, "
            f"tinit={self.tinit} tfinal={self.tfinal} deltaT={self.deltaT} beta={self.beta1}/{self.beta2} "
            f"orth_reg_weight={self.orth_reg_weight}; lora_alpha={self.lora_alpha} lora_dropout={self.lora_dropout}; "
            f"PEFT LoRA r={self.target_r}; test on {self.n_test} texts; seeds {list(self.seeds)}"
        )


# total_step * batch = n_train: every training text is seen once. The final phase (mask frozen at
# target_r per module) starts at total_step - tfinal, after (total_step - tfinal - tinit) / deltaT
# masking steps of the cubic budget reduction.
DEFAULT = Plan(
    "default",
    n_train=2400,
    n_test=1000,
    max_length=64,
    batch=16,
    total_step=150,
    tinit=30,
    tfinal=40,
    deltaT=10,
    seeds=(0, 1, 2),
    warmup_steps=10,
    smooth=10,
)
QUICK = Plan(
    "quick",
    n_train=192,
    n_test=96,
    max_length=32,
    batch=8,
    total_step=24,
    tinit=4,
    tfinal=8,
    deltaT=4,
    seeds=(0,),
    warmup_steps=2,
    eval_batch=96,
    smooth=3,
)


def phase_of(step: int, plan: Plan) -> str:
    if step <= plan.tinit:
        return "warm-up"
    if step < plan.total_step - plan.tfinal:
        return "budget reduction"
    return "final"
