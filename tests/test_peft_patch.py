"""PEFT's own AdaLoRA accelerated in place (``af.patch_peft()``, ``af.accelerate(model)``) and its rank
schedule run with no call in the user's script: TRL's SFTTrainer, the HF Trainer, an accelerate loop
and hand-written loops; the same losses and rank patterns as our native path and as PEFT driven by
hand; checkpoints that load in unpatched PEFT; fallbacks to PEFT's forward; unpatching."""

import copy
import os
import subprocess
import sys
import warnings

import peft
import pytest
import torch
import transformers
from peft.tuners.adalora import AdaLoraConfig as PeftAdaLoraConfig
from peft.tuners.adalora import AdaLoraModel as PeftAdaLoraModel
from peft.tuners.adalora import SVDLinear
from torch import nn

import adalora_fast as af
from adalora_fast import auto_schedule, peft_patch
from tiny_models import tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# PEFT's and transformers' methods as they were before any test patched them
ORIGINAL = {
    "SVDLinear.forward": SVDLinear.__dict__["forward"],
    "AdaLoraModel.forward": PeftAdaLoraModel.__dict__["forward"],
    "AdaLoraModel.__init__": PeftAdaLoraModel.__dict__["__init__"],
    "AdaLoraModel.update_and_allocate": PeftAdaLoraModel.__dict__["update_and_allocate"],
    "AdaLoraConfig.__post_init__": PeftAdaLoraConfig.__dict__["__post_init__"],
    "GradScaler.step": torch.amp.GradScaler.__dict__["step"],
    "Trainer.__init__": transformers.Trainer.__dict__["__init__"],
    "Trainer._load_from_checkpoint": transformers.Trainer.__dict__["_load_from_checkpoint"],
}

TARGETS = ["q_proj", "v_proj", "down_proj"]
N_LAYERS = 2 * len(TARGETS)
# warm-up 0..3, masks at 4, 6, 8 (reduction), final mask at 10, frozen after
SCHED = dict(init_r=6, target_r=3, tinit=3, tfinal=4, deltaT=2, total_step=14, lora_alpha=16, target_modules=TARGETS)
STEPS = 14


@pytest.fixture(autouse=True)
def _unpatched_after():
    yield
    af.unpatch_peft()


def peft_model(patch=False, **kw):
    if patch:
        af.patch_peft()
    cfg = {**SCHED, "lora_dropout": 0.0, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(task_type="CAUSAL_LM", **cfg))


def lora_init(model) -> dict:
    """The adapter tensors of a PEFT model under the tuner's state-dict keys (= our AdaLoraModel's)."""
    return {k: v.detach().clone() for k, v in model.base_model.state_dict().items() if "lora_" in k}


def native_model(init, **kw):
    m = af.get_peft_model(tiny_llama(), af.AdaLoraConfig(**{**SCHED, "lora_dropout": 0.0, **kw}))
    assert not m.load_state_dict(init, strict=False).unexpected_keys
    return m


def pattern_of(model):
    """The rank pattern, keys with the adapter name (PEFT's save_pretrained drops it from the config's keys)."""
    rp = model.rank_pattern if isinstance(model, af.AdaLoraModel) else model.peft_config["default"].rank_pattern
    if rp is None:
        return None
    return {(k if k.endswith(".default") else k + ".default"): list(v) for k, v in rp.items()}


def kept(pattern) -> int:
    return sum(sum(v) for v in pattern.values())


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)


def manual_loop(model, ids_list, call=None, first=0, opt=None):
    """AdamW steps; ``call(model, step)`` after optimizer.step() (None: no call, the automatic schedule)."""
    opt = adamw(model) if opt is None else opt
    out = []
    for step, ids in enumerate(ids_list, start=first):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if call is not None:
            call(model, step)
        opt.zero_grad()
        out.append((loss.item(), pattern_of(model)))
    return out


def peft_call(model, step):
    model.base_model.update_and_allocate(step)


def spy_steps(model) -> list:
    """The steps our allocator runs for an accelerated PEFT model, recorded."""
    acc = peft_patch.state_of(model)
    seen, orig = [], acc.allocator.update_and_allocate

    def rec(step):
        seen.append(step)
        return orig(step)

    acc.allocator.update_and_allocate = rec
    return seen


def assert_final_budget(model):
    rp = pattern_of(model)
    assert len(rp) == N_LAYERS and kept(rp) == SCHED["target_r"] * N_LAYERS
    assert any(0 < sum(v) < SCHED["init_r"] for v in rp.values()) or any(sum(v) == 0 for v in rp.values())
    for name, m in model.base_model.model.named_modules():
        if isinstance(m, SVDLinear):
            keep = torch.tensor(rp[f"{name}.lora_E.default"])
            assert torch.all(m.lora_E["default"].detach().view(-1)[~keep] == 0), name


# ----------------------------------------------------------------------------- hand-written loops
def test_patched_peft_matches_native_and_peft_by_hand():
    ref = peft_model()  # unpatched PEFT, schedule driven by hand
    init = lora_init(ref)
    data = batches(STEPS)
    theirs = manual_loop(ref, data, peft_call)
    ours = manual_loop(native_model(init), data, lambda m, s: m.update_and_allocate(s))
    model = peft_model(patch=True)
    model.base_model.load_state_dict(init, strict=False)
    assert isinstance(model, peft.PeftModel) and type(model.base_model) is PeftAdaLoraModel
    assert set(peft_patch.explain(model).values()) == {None}
    patched = manual_loop(model, data)  # no update_and_allocate call: the optimizer step hook runs it
    for step, ((lt, pt), (lo, po), (lp, pp)) in enumerate(zip(theirs, ours, patched)):
        assert lp == lo, f"step {step}: patched PEFT loss {lp}, native {lo}"
        assert lp == pytest.approx(lt, rel=1e-5), f"step {step}: patched PEFT loss {lp}, PEFT {lt}"
        assert pp == po == pt, f"step {step}: rank patterns differ"
    assert patched[-1][1] is not None and kept(patched[-1][1]) == SCHED["target_r"] * N_LAYERS
    assert_final_budget(model)


@pytest.mark.parametrize("where", ["after_step", "before_step"])
def test_explicit_update_and_allocate_is_not_done_twice(where):
    model = peft_model(patch=True)
    seen = spy_steps(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step, ids in enumerate(batches(8)):
        model(input_ids=ids, labels=ids).loss.backward()
        if where == "before_step":
            model.base_model.update_and_allocate(step)
        opt.step()
        if where == "after_step":
            model.base_model.update_and_allocate(step)  # as PEFT's docs write it
        opt.zero_grad()
    assert seen == list(range(8))  # once per step: the hook ran step 0, the user's call for it was skipped


def test_accelerate_takes_over_peft_state_and_unpatch_hands_it_back():
    ref = peft_model()
    init = lora_init(ref)
    data = batches(STEPS)
    theirs = manual_loop(ref, data, peft_call)
    model = peft_model()
    model.base_model.load_state_dict(init, strict=False)
    opt = adamw(model)
    first = manual_loop(model, data[:6], peft_call, opt=opt)  # PEFT's own code: warm-up and the mask of step 4
    assert af.accelerate(model, next_step=6) is model
    assert model.peft_config["default"].rank_pattern is not None
    mid = manual_loop(model, data[6:10], first=6, opt=opt)  # ours, by the hook: masks at 6 and 8
    af.unpatch_peft()
    assert peft_patch.state_of(model) is None
    last = manual_loop(model, data[10:], peft_call, first=10, opt=opt)  # PEFT's code again: the final mask at 10
    for step, ((lt, pt), (lm, pm)) in enumerate(zip(theirs, first + mid + last)):
        assert lm == pytest.approx(lt, rel=1e-5), f"step {step}"
        assert pm == pt, f"step {step}: rank patterns differ"


def test_accelerate_mid_schedule_without_a_step_waits_for_explicit_calls():
    model = peft_model()
    opt = adamw(model)
    manual_loop(model, batches(5), peft_call, opt=opt)
    af.accelerate(model)
    seen = spy_steps(model)
    with pytest.warns(UserWarning, match="next_step"):
        manual_loop(model, batches(2, seed=5), peft_call, first=5, opt=opt)
    assert seen == [5, 6]


# ----------------------------------------------------------------------------- AMP and accelerate loops
def test_amp_skipped_step_keeps_its_step_number():
    model = peft_model(patch=True)
    seen = spy_steps(model)
    acc = peft_patch.state_of(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    scaler = torch.amp.GradScaler("cpu")
    skip = SCHED["total_step"] - SCHED["tfinal"]  # the step that fixes the final mask
    for step, ids in enumerate(batches(STEPS)):
        loss = model(input_ids=ids, labels=ids).loss
        if step == skip:
            loss = loss * float("inf")  # the scaler finds inf gradients and skips optimizer.step()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert seen == [s for s in range(STEPS) if s != skip]
    assert acc.next_step == STEPS
    assert_final_budget(model)  # fixed at the step after the skipped one


def test_accelerate_loop_with_gradient_accumulation():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model = peft_model(patch=True)
    seen = spy_steps(model)
    ids = torch.cat(batches(STEPS))
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]
    try:
        accel = Accelerator(gradient_accumulation_steps=2, cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        dl = torch.utils.data.DataLoader(data, batch_size=1)
        model_p, opt_p, dl_p = accel.prepare(model, opt, dl)
        for batch in dl_p:
            with accel.accumulate(model_p):
                accel.backward(model_p(**batch).loss)
                opt_p.step()
                opt_p.zero_grad()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert seen == list(range(STEPS))  # 2 * STEPS micro-batches, one schedule step per optimizer step
    assert_final_budget(model)


# ----------------------------------------------------------------------------- fallbacks and unpatching
class MyLinear(nn.Linear):
    """A base layer kind our op does not fuse (as bitsandbytes' Linear8bitLt is an nn.Linear subclass)."""


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), MyLinear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_layers_our_op_cannot_run_fall_back_to_peft_forward():
    af.patch_peft()
    torch.manual_seed(0)
    model = peft.get_peft_model(
        Three(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["a", "b", "c"])
    )
    for m in model.modules():
        if isinstance(m, SVDLinear):  # nonzero singular values, so the adapters change the output
            nn.init.normal_(m.lora_E["default"])
    tuner = model.base_model.model
    tuner.c.base_layer.register_forward_hook(lambda mod, inp, out: out * 2)
    reasons = peft_patch.explain(model)
    assert reasons["base_model.model.a"] is None
    assert "MyLinear is not fused" in reasons["base_model.model.b"]
    assert "hooks" in reasons["base_model.model.c"]
    x = torch.randn(3, 8)
    orig = ORIGINAL["SVDLinear.forward"]
    for name in ("b", "c"):
        with pytest.warns(UserWarning, match="PEFT's own forward"):
            peft_patch._WARNED.clear()
            torch.testing.assert_close(getattr(tuner, name)(x), orig(getattr(tuner, name), x), rtol=0, atol=0)
    layer = tuner.a
    torch.testing.assert_close(layer(x), orig(layer, x))
    # state that PEFT's forward handles: merged, disabled, several active adapters
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # expected states: no warning
        layer.merge()
        assert peft_patch.fallback_reason(layer) == "merged"
        torch.testing.assert_close(layer(x), orig(layer, x), rtol=0, atol=0)
        layer.unmerge()
        with model.disable_adapter():
            assert peft_patch.fallback_reason(layer) == "adapters disabled"
            torch.testing.assert_close(layer(x), tuner.a.base_layer(x), rtol=0, atol=0)
    model.add_adapter("other", peft.AdaLoraConfig(init_r=2, total_step=10, inference_mode=True, target_modules=["a"]))
    model.base_model.set_adapter(["default", "other"])
    assert peft_patch.fallback_reason(layer).startswith("several active adapters")
    with pytest.warns(UserWarning, match="several active adapters"):
        torch.testing.assert_close(layer(x), orig(layer, x), rtol=0, atol=0)


def test_unpatch_restores_peft_and_patching_twice_is_harmless():
    af.patch_peft()
    af.patch_peft()
    assert af.peft_patch.is_patched()
    assert SVDLinear.__dict__["forward"] is not ORIGINAL["SVDLinear.forward"]
    model = peft_model(total_step=None)  # PEFT raises on a missing total_step; while patched it waits for max_steps
    assert model.peft_config["default"].total_step is None and peft_patch.state_of(model) is not None
    af.unpatch_peft()
    af.unpatch_peft()
    left = _patched_methods_in_place()
    assert not any(left.values()), left  # every original back, the optimizer step hook removed
    assert peft_patch.state_of(model) is None
    assert peft_patch.state_of(peft_model()) is None
    with pytest.raises(ValueError, match="total_step"):
        peft.AdaLoraConfig(target_modules=TARGETS)


def _patched_methods_in_place() -> dict:
    """Which of PEFT's and transformers' methods are not their originals now, and whether the
    optimizer step hook is registered."""
    from torch.optim import optimizer as optim_mod

    cls = {
        "SVDLinear": SVDLinear,
        "AdaLoraModel": PeftAdaLoraModel,
        "AdaLoraConfig": PeftAdaLoraConfig,
        "GradScaler": torch.amp.GradScaler,
        "Trainer": transformers.Trainer,
    }
    out = {key: cls[key.split(".")[0]].__dict__[key.split(".")[1]] is not fn for key, fn in ORIGINAL.items()}
    out["optimizer hook"] = auto_schedule._after_optimizer_step in optim_mod._global_optimizer_post_hooks.values()
    return out


def test_suspended_runs_peft_own_code_and_keeps_accelerated_models():
    """``peft_patch.suspended()``: PEFT's original methods and no schedule triggers in the block, a PEFT
    model built there stays PEFT's, an accelerated model keeps its state and is accelerated again after."""
    model = peft_model(patch=True)
    acc = peft_patch.state_of(model)
    alloc = acc.allocator
    seen = spy_steps(model)
    opt = adamw(model)
    patched = _patched_methods_in_place()
    assert all(patched.values()), patched
    data = batches(4)
    with peft_patch.suspended():
        assert not any(_patched_methods_in_place().values())
        assert not peft_patch.is_patched()
        plain = peft_model()  # built in the block: PEFT's own
        assert peft_patch.state_of(plain) is None
        manual_loop(model, data[:2], opt=opt)  # PEFT's own forward, and no schedule step
        assert seen == []
    assert _patched_methods_in_place() == patched and peft_patch.is_patched()
    assert peft_patch.state_of(model) is acc and acc.allocator is alloc
    assert peft_patch.state_of(plain) is None
    manual_loop(model, data[2:], opt=opt)
    assert seen == [0, 1]  # the automatic schedule runs again, from its first step
    with peft_patch.suspended():
        af.unpatch_peft()  # honoured: the block's exit patches nothing back
    assert not any(_patched_methods_in_place().values()) and not peft_patch.is_patched()
    with peft_patch.suspended():  # not patched: nothing to do
        assert not any(_patched_methods_in_place().values())


def test_a_deepcopy_of_an_accelerated_model_runs_its_own_schedule():
    model = peft_model(patch=True)
    twin = copy.deepcopy(model)
    acc = peft_patch.state_of(twin)
    assert acc is not peft_patch.state_of(model) and acc.tuner is twin.base_model
    seen = spy_steps(twin)
    manual_loop(twin, batches(6))
    assert seen == list(range(6)) and pattern_of(twin) is not None
    assert peft_patch.state_of(model).allocator.last_step is None  # the original untouched


def test_from_pretrained_while_patched_is_accelerated(trainer_runs):
    run = trainer_runs["accelerated"]
    af.patch_peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(run["checkpoint"]))
    reasons = peft_patch.explain(loaded)
    ranks = {n: sum(v) for n, v in run["pattern"].items()}
    for name, why in reasons.items():  # resized to the pattern: a layer that kept nothing has rank 0
        r = ranks[name[len("base_model.model.") :] + ".lora_E.default"]
        assert why == (None if r else "rank 0"), name
    torch.testing.assert_close(eval_logits(loaded), run["logits"], rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainable = peft.PeftModel.from_pretrained(tiny_llama(), str(run["checkpoint"]), is_trainable=True)
    manual_loop(trainable, batches(1))  # the allocator is rebuilt for the loaded ranks
    assert peft_patch.state_of(trainable).allocator.layout.ranks == list(ranks.values())


def test_peft_outside_the_tested_range_is_refused(monkeypatch):
    monkeypatch.setattr(peft_patch, "_PEFT", {})
    monkeypatch.setattr(peft, "__version__", "0.30.0")
    with pytest.raises(
        RuntimeError, match=r"tested with peft >= 0\.21\.0, < 0\.22\.0; this environment has peft 0\.30\.0"
    ):
        af.patch_peft()
    with pytest.raises(RuntimeError, match="tested with peft"):
        af.accelerate(object())


# ----------------------------------------------------------------------------- trainers
def tokenizer():
    """A word-level tokenizer built here (no download): w0..w59 and four special tokens, 64 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(60)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def texts(n=64):
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(
            f"w{int(i)}" for i in torch.randint(0, 60, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g)
        )
        for _ in range(n)
    ]


def train_args(cls, out_dir, **kw):
    base = dict(
        output_dir=str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        log_level="error",
    )
    if cls.__name__ == "SFTConfig":
        base.update(bf16=False, gradient_checkpointing=False, max_length=16)
    base.update(kw)
    return cls(**base)


def quiet(trainer):
    """The trainer without the PrinterCallback that disable_tqdm adds (a line per logged step)."""
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer


def losses_of(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


EVAL_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=EVAL_IDS).logits


# TRL computes the loss from the fused LM head's log-probabilities, so the orthogonal penalty PEFT's
# AdaLoRA adds to outputs.loss never reaches it (PEFT's behaviour, patched or not): the native run
# it is compared with leaves the penalty out too.
SFT_SCHED = dict(SCHED, lora_dropout=0.1, orth_reg_weight=0.0)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    import datasets
    from trl import SFTConfig, SFTTrainer

    tok, data = tokenizer(), datasets.Dataset.from_dict({"text": texts()})
    datasets.disable_progress_bars()
    runs = {}
    for mode in ("patched", "unpatched"):
        if mode == "patched":
            af.patch_peft()  # the script's only addition
        out = tmp_path_factory.mktemp(f"sft_{mode}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = quiet(
                SFTTrainer(
                    model=tiny_llama(),
                    args=train_args(SFTConfig, out),
                    train_dataset=data,
                    processing_class=tok,
                    peft_config=peft.AdaLoraConfig(task_type="CAUSAL_LM", **SFT_SCHED),
                )
            )
            init = lora_init(trainer.model)
            trainer.train()
        model = trainer.model
        runs[mode] = dict(
            model=model,
            trainer=trainer,
            losses=losses_of(trainer),
            pattern=pattern_of(model),
            checkpoint=out / f"checkpoint-{STEPS}",
            init=init,
            logits=eval_logits(model),
        )
        af.unpatch_peft()
    # our native path, same init, same tokenised data and collator, through the HF Trainer (TRL 1.16's
    # SFTTrainer cannot run our AdaLoraModel: test_native_model_under_trl_sft_trainer_fails_at_its_first_step)
    sft = runs["patched"]["trainer"]
    native = native_model(runs["patched"]["init"], lora_dropout=0.1, orth_reg_weight=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet(
            transformers.Trainer(
                model=native,
                args=train_args(SFTConfig, tmp_path_factory.mktemp("sft_native")),
                train_dataset=sft.train_dataset,
                data_collator=sft.data_collator,
                callbacks=[af.AdaLoraCallback(native)],
            )
        )
        trainer.train()
    runs["native"] = dict(losses=losses_of(trainer), pattern=native.rank_pattern)
    datasets.enable_progress_bars()
    return runs


def test_trl_sft_trainer_runs_the_schedule_when_patched(sft_runs):
    run, native = sft_runs["patched"], sft_runs["native"]
    model = run["model"]
    assert isinstance(model, peft.PeftModel)
    assert any(isinstance(c, auto_schedule.PeftScheduleCallback) for c in run["trainer"].callback_handler.callbacks)
    assert len(run["losses"]) == STEPS
    assert_final_budget(model)
    # the fused LM head's log-softmax and the model's cross-entropy round differently
    assert run["losses"] == pytest.approx(native["losses"], rel=1e-6)
    assert run["pattern"] == native["pattern"]


def test_trl_sft_trainer_unpatched_never_reduces_the_ranks(sft_runs):
    model = sft_runs["unpatched"]["model"]
    assert peft_patch.state_of(model) is None
    assert model.peft_config["default"].rank_pattern is None
    for m in model.modules():
        if isinstance(m, SVDLinear):
            assert torch.all(m.lora_E["default"] != 0)  # every triplet of every layer still trained


def _fused_head_warnings(records) -> list:
    return [str(w.message) for w in records if "TRL's fused LM head" in str(w.message)]


def test_native_model_under_trl_sft_trainer_fails_at_its_first_step(tmp_path):
    """TRL 1.16 installs its fused LM head on a model that is not a peft.PeftModel and runs its
    ``base_model`` as the backbone, which our AdaLoraModel's is not: a clear error at the first step
    that says what to do, not TRL's AttributeError on ``last_hidden_state``."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    native = af.get_peft_model(tiny_llama(), af.AdaLoraConfig(**SFT_SCHED))
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = quiet(
                SFTTrainer(
                    model=native,
                    args=train_args(SFTConfig, tmp_path),
                    train_dataset=datasets.Dataset.from_dict({"text": texts(16)}),
                    processing_class=tokenizer(),
                    callbacks=[af.AdaLoraCallback(native)],
                )
            )
            with pytest.raises(
                TypeError,
                match=r"fused_lm_head=True, TRL's fused LM head.*af\.patch_peft\(\) and give SFTTrainer the plain "
                r"transformers model with peft_config=peft\.AdaLoraConfig\(\.\.\.\), or af\.accelerate\(peft_model\)",
            ):
                trainer.train()
    finally:
        datasets.enable_progress_bars()
    assert trainer.state.global_step == 0


def test_fused_head_on_the_wrapped_model_runs_and_warns_that_the_penalty_is_dropped():
    """TRL's fused head where it works with our model (on the wrapped transformers model, as TRL's
    docs place it): the flag passes through, also through a replaced ``forward`` (accelerate's
    autocast wrapper, ``torch.compile``); ``outputs.loss`` has the penalty, and in training with
    ``orth_reg_weight > 0`` a warning, once per model, says that TRL's loss from ``log_probs`` drops it."""
    import types

    from trl.trainer.utils import add_fused_lm_head

    base = tiny_llama()
    add_fused_lm_head(base)
    model = af.get_peft_model(base, af.AdaLoraConfig(**{**SCHED, "lora_dropout": 0.0}))
    # what accelerate's prepare_model does under mixed precision: the instance's forward replaced
    model.forward = types.MethodType(torch.autocast("cpu", enabled=False)(type(model).forward), model)
    ids = batches(1)[0]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [model(input_ids=ids, labels=ids, fused_lm_head=True) for _ in range(2)]
    msgs = _fused_head_warnings(rec)
    assert len(msgs) == 1, msgs
    assert "penalty never reaches the gradient" in msgs[0] and "orth_reg_weight=0" in msgs[0]
    out = outs[0]
    fused_loss = -out.log_probs.sum() / out.label_mask.sum()
    torch.testing.assert_close(out.loss, fused_loss + 0.5 * model.orth_penalty())
    for quiet_model in (
        af.get_peft_model(tiny_llama(), af.AdaLoraConfig(**{**SCHED, "orth_reg_weight": 0.0})),  # no penalty
        af.get_peft_model(tiny_llama(), af.AdaLoraConfig(**SCHED)).eval(),  # not training
    ):
        add_fused_lm_head(quiet_model.model)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert quiet_model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs is not None
        assert _fused_head_warnings(rec) == []
    # a plain call through a compiled forward: not taken for TRL's head
    compiled = af.get_peft_model(tiny_llama(), af.AdaLoraConfig(**SCHED))
    compiled.forward = torch.compile(compiled.forward, backend="eager")
    torch.testing.assert_close(
        compiled(input_ids=ids, labels=ids).loss, type(compiled).forward(compiled, input_ids=ids, labels=ids).loss
    )


def test_trl_sft_trainer_patched_warns_once_that_the_penalty_is_dropped(tmp_path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    af.patch_peft()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            trainer = quiet(
                SFTTrainer(
                    model=tiny_llama(),
                    args=train_args(SFTConfig, tmp_path, max_steps=3, save_strategy="no"),
                    train_dataset=datasets.Dataset.from_dict({"text": texts(16)}),
                    processing_class=tokenizer(),
                    peft_config=peft.AdaLoraConfig(task_type="CAUSAL_LM", **{**SFT_SCHED, "orth_reg_weight": 0.5}),
                )
            )
            trainer.train()
    finally:
        datasets.enable_progress_bars()
    assert peft_patch.state_of(trainer.model) is not None and trainer.state.global_step == 3
    msgs = _fused_head_warnings(rec)
    assert len(msgs) == 1 and "orth_reg_weight (0.5)" in msgs[0], msgs


def token_dataset(n=64):
    ids = torch.randint(1, 64, (n, 10), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in ids]


def hf_trainer(model, out_dir, callbacks=(), **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quiet(
            transformers.Trainer(
                model=model,
                args=train_args(transformers.TrainingArguments, out_dir, **kw),
                train_dataset=token_dataset(),
                callbacks=list(callbacks),
            )
        )


TRAINER_SCHED = dict(lora_dropout=0.1)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    model = peft_model(**TRAINER_SCHED)  # built by PEFT, before (without) patch_peft
    init = lora_init(model)
    af.accelerate(model)
    out = tmp_path_factory.mktemp("hf_accelerated")
    trainer = hf_trainer(model, out, save_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    runs = {
        "accelerated": dict(
            model=model,
            trainer=trainer,
            losses=losses_of(trainer),
            pattern=pattern_of(model),
            checkpoint=out / f"checkpoint-{STEPS}",
            out=out,
            init=init,
            logits=eval_logits(model),
        )
    }
    af.unpatch_peft()
    native = native_model(init, **TRAINER_SCHED)
    trainer = hf_trainer(native, tmp_path_factory.mktemp("hf_native"), callbacks=[af.AdaLoraCallback(native)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    runs["native"] = dict(losses=losses_of(trainer), pattern=native.rank_pattern)
    return runs


def test_hf_trainer_runs_the_schedule_of_an_accelerated_peft_model(trainer_runs):
    run, native = trainer_runs["accelerated"], trainer_runs["native"]
    assert isinstance(run["model"], peft.PeftModel)
    assert len(run["losses"]) == STEPS
    assert_final_budget(run["model"])
    assert run["losses"] == native["losses"]
    assert run["pattern"] == native["pattern"]
    assert os.path.isfile(run["checkpoint"] / auto_schedule.RESUME_NAME)


UNPATCHED_LOAD = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch, peft
from tiny_models import tiny_llama
for folder, expected in zip(sys.argv[1::2], sys.argv[2::2]):
    model = peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()
    ids, logits = torch.load(expected)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
    ranks = {n: m.lora_A["default"].shape[0] for n, m in model.named_modules() if hasattr(m, "lora_E")}
    print(folder, sorted(ranks.values()))
assert "adalora_fast" not in sys.modules
"""


def test_checkpoints_load_in_unpatched_peft_in_another_process(sft_runs, trainer_runs, tmp_path):
    argv = []
    for name, run in (("sft", sft_runs["patched"]), ("hf", trainer_runs["accelerated"])):
        torch.save((EVAL_IDS, run["logits"]), tmp_path / f"{name}.pt")
        argv += [str(run["checkpoint"]), str(tmp_path / f"{name}.pt")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", UNPATCHED_LOAD, *argv],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, run in zip(lines, (sft_runs["patched"], trainer_runs["accelerated"])):
        # PEFT resized each layer to its kept triplets
        assert line.endswith(str(sorted(sum(v) for v in run["pattern"].values())))


def test_hf_trainer_resume_continues_the_schedule(trainer_runs, tmp_path):
    full = trainer_runs["accelerated"]
    model = peft_model(**TRAINER_SCHED)
    model.base_model.load_state_dict(full["init"], strict=False)
    af.accelerate(model)
    trainer = hf_trainer(model, tmp_path / "resumed", save_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(full["out"] / "checkpoint-6"))  # in the reduction phase
    assert losses_of(trainer)[-(STEPS - 6) :] == full["losses"][6:]
    assert pattern_of(model) == full["pattern"]
    ref = dict(full["model"].named_parameters())
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, ref[n], msg=n)
    # a checkpoint without the allocator state is refused, not silently restarted
    bare = tmp_path / "checkpoint-6"
    bare.mkdir()
    for f in os.listdir(full["out"] / "checkpoint-6"):
        if f != auto_schedule.RESUME_NAME:
            os.link(full["out"] / "checkpoint-6" / f, bare / f)
    model = peft_model(**TRAINER_SCHED)
    af.accelerate(model)
    trainer = hf_trainer(model, tmp_path, save_steps=6)
    with pytest.raises(RuntimeError, match="no " + auto_schedule.RESUME_NAME):
        trainer.train(resume_from_checkpoint=str(bare))


def test_hf_trainer_takes_a_missing_total_step_from_max_steps(tmp_path):
    model = peft_model(patch=True, total_step=None)
    seen = spy_steps(model)
    trainer = hf_trainer(
        model, tmp_path, save_strategy="no", gradient_accumulation_steps=2, per_device_train_batch_size=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert model.peft_config["default"].total_step == STEPS
    assert seen == list(range(STEPS))  # once per optimizer step, not per micro-batch
    assert_final_budget(model)
    # a given total_step that differs from max_steps: kept, with a warning
    model = peft_model(patch=True, total_step=20)
    trainer = hf_trainer(model, tmp_path, save_strategy="no", max_steps=2)
    with pytest.warns(UserWarning, match="total_step=20, but the Trainer runs max_steps=2"):
        trainer.train()
    assert model.peft_config["default"].total_step == 20
