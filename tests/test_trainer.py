"""The HF Trainer drives the AdaLoRA schedule through AdaLoraCallback (PEFT's never runs it), and
Trainer checkpoints carry the allocator state: a run resumed in a fresh process ends exactly as the
uninterrupted one."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import adalora_fast as af
from tiny_models import TokenRows, tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def test_trainer_runs_schedule_to_target_budget(tmp_path):
    base = tiny_llama()
    cfg = af.AdaLoraConfig(
        init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, target_modules=["q_proj", "v_proj"]
    )
    model = af.get_peft_model(base, cfg)
    seen = []
    orig = model.update_and_allocate
    model.update_and_allocate = lambda step: (seen.append(step), orig(step))[1]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=12,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=TokenRows(low=0), callbacks=[af.AdaLoraCallback(model)]).train()
    assert seen == list(range(12))
    rp = model.rank_pattern
    assert rp is not None and len(rp) == 4
    assert sum(sum(v) for v in rp.values()) == 2 * 4
    for (name, m), v in zip(model.adapted_layers(), rp.values()):
        E = m.lora_E["default"].detach().view(-1)
        assert torch.all(E[~torch.tensor(v)] == 0), name


def test_callback_rejects_a_plain_model():
    with pytest.raises(TypeError, match="AdaLoraModel"):
        af.AdaLoraCallback(torch.nn.Linear(2, 2))


def test_callback_rejects_a_peft_model_and_points_to_the_patch():
    """PEFT's AdaLoRA model has update_and_allocate and rankallocator too, but not our allocator's
    checkpoint: the callback refuses it and names the way that runs PEFT's schedule in a Trainer."""
    import peft

    pm = peft.get_peft_model(
        tiny_llama(), peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    )
    with pytest.raises(TypeError, match="patch_peft"):
        af.AdaLoraCallback(pm)


# ----------------------------------------------------------------------------- checkpoints and resume
# One script for every run: "full" trains 18 steps uninterrupted; "crash" is the same run killed
# (os._exit) right after the checkpoint of step 16 is written; "resume" continues from a checkpoint in
# a fresh process. Schedule: warm-up 0..3, masks at 4, 6, 8, 10 (reduction), final mask at 12, frozen
# after; checkpoints every 4 steps, so checkpoint-8 is in the reduction phase, checkpoint-16 in the
# final phase. lora_dropout=0: the data order (seeded) is all that could differ.
RUN = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
import adalora_fast as af
from tiny_models import TokenRows, tiny_llama

mode, out_dir, result = sys.argv[1], sys.argv[2], sys.argv[3]
resume = sys.argv[4] if len(sys.argv) > 4 else None
torch.set_num_threads(1)


class Crash(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if mode == "crash" and state.global_step == 16:
            os._exit(0)  # killed right after the checkpoint: no train end, nothing flushed


base = tiny_llama(max_position_embeddings=64)
cfg = af.AdaLoraConfig(init_r=4, target_r=2, tinit=3, tfinal=6, deltaT=2, total_step=18, lora_dropout=0.0,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
model = af.get_peft_model(base, cfg)
args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, max_steps=18, learning_rate=2e-2,
                         save_strategy="steps", save_steps=4, report_to=[], logging_strategy="no", use_cpu=True,
                         disable_tqdm=True, seed=7, lr_scheduler_type="linear", dataloader_num_workers=0)
callback = af.AdaLoraCallback(model)
trainer = Trainer(model=model, args=args, train_dataset=TokenRows(48), callbacks=[callback, Crash()])
trainer.train(resume_from_checkpoint=(True if resume == "last" else resume))
json.dump({"rank_pattern": model.rank_pattern, "restored_from": callback.restored_from,
           "last_step": model.rankallocator.last_step}, open(result + ".json", "w"))
save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}, result + ".safetensors")
"""


def _run(script, *argv):
    # the checkout, and tests/ for the shared tiny model
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, script, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def _result(prefix):
    return json.load(open(prefix + ".json")), load_file(prefix + ".safetensors")


def _in_process(script, *argv, monkeypatch):
    """The uninterrupted run, here (while the crash run's process works), with the script's one thread."""
    import runpy

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def test_resumed_runs_end_exactly_as_the_uninterrupted_run(tmp_path, monkeypatch):
    script = str(tmp_path / "run.py")
    open(script, "w").write(RUN)
    crash = _run(script, "crash", str(tmp_path / "crash"), str(tmp_path / "unused"))
    _in_process(script, "full", str(tmp_path / "full"), str(tmp_path / "full_result"), monkeypatch=monkeypatch)
    _wait(crash)
    ckpt = tmp_path / "crash"
    assert sorted(os.listdir(ckpt)) == [f"checkpoint-{s}" for s in (12, 16, 4, 8)], "killed after checkpoint-16"
    assert not os.path.exists(tmp_path / "unused.json")
    for s in (4, 8, 12, 16):
        files = set(os.listdir(ckpt / f"checkpoint-{s}"))
        assert {
            "adalora_allocator_state.safetensors",
            "adapter_model.safetensors",
            "adapter_config.json",
            "model.safetensors",
            "trainer_state.json",
        } <= files, files
    st = load_file(str(ckpt / "checkpoint-8" / "adalora_allocator_state.safetensors"))
    assert int(st["allocator.last_step"]) == 7 and not bool(st["allocator.finalized"]) and "allocator.exp_avg_ipt" in st
    st = load_file(str(ckpt / "checkpoint-16" / "adalora_allocator_state.safetensors"))
    assert int(st["allocator.last_step"]) == 15 and bool(st["allocator.finalized"]) and "allocator.keep" in st
    # fresh processes: from the reduction phase (a path outside the new run's output_dir;
    # args.resume_from_checkpoint unset) and from the final phase (resume_from_checkpoint=True: the last
    # checkpoint of output_dir, 16)
    r8 = _run(script, "resume", str(tmp_path / "r8_out"), str(tmp_path / "r8"), str(ckpt / "checkpoint-8"))
    r16 = _run(script, "resume", str(ckpt), str(tmp_path / "r16"), "last")
    _wait(r8), _wait(r16)
    ref_meta, ref_w = _result(str(tmp_path / "full_result"))
    assert ref_meta["last_step"] == 17 and ref_meta["restored_from"] is None
    pattern = ref_meta["rank_pattern"]
    ranks = [sum(v) for v in pattern.values()]
    assert sum(ranks) == 2 * 8 and ranks != [4, 4, 4, 4, 0, 0, 0, 0], f"not the all-zero-scores pattern: {ranks}"
    for name, at in (("r8", 8), ("r16", 16)):
        meta, w = _result(str(tmp_path / name))
        assert meta["restored_from"] == str(ckpt / f"checkpoint-{at}")
        assert meta["rank_pattern"] == pattern, name
        assert set(w) == set(ref_w)
        for k in ref_w:
            assert torch.equal(w[k], ref_w[k]), f"{name}: {k}"


class _Tokens(TokenRows):
    def __getitem__(self, i):
        return {"input_ids": self.ids[i] % 63 + 1, "labels": self.ids[i] % 63 + 1}


def _trainer(model, out, **kw):
    kw = {"max_steps": 12, "save_strategy": "steps", "save_steps": 5, **kw}
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        **kw,
    )
    return Trainer(model=model, args=args, train_dataset=_Tokens(low=0), callbacks=[af.AdaLoraCallback(model)])


def _small():
    return af.get_peft_model(
        tiny_llama(),
        af.AdaLoraConfig(
            init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, target_modules=["q_proj", "v_proj"]
        ),
    )


def test_resume_without_allocator_state_raises_and_changes_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(_small(), tmp_path / "run", max_steps=10).train()  # checkpoints 5 and 10
        ckpt = tmp_path / "run" / "checkpoint-10"  # in the final phase (it starts at step 9)
        old = tmp_path / "old" / "checkpoint-10"  # as written without AdaLoraCallback
        shutil.copytree(ckpt, old)
        os.remove(old / "adalora_allocator_state.safetensors")
        model = _small()
        with pytest.raises(RuntimeError, match="no AdaLoRA allocator state") as ei:
            _trainer(model, tmp_path / "elsewhere").train(resume_from_checkpoint=str(old))
        assert "adalora_allocator_state.safetensors" in str(ei.value)
        alloc = model.rankallocator
        assert alloc.last_step is None and alloc.m1 is None and model.rank_pattern is None
        # a state of another checkpoint (same output dir, other step) is not taken for it either
        other = tmp_path / "mixed"
        shutil.copytree(tmp_path / "run", other)
        shutil.copy(other / "checkpoint-5" / "adalora_allocator_state.safetensors", other / "checkpoint-10")
        with pytest.raises(RuntimeError, match="saved after step 4"):
            _trainer(_small(), other).train(resume_from_checkpoint=True)
        # the state itself resumes it
        model = _small()
        _trainer(model, tmp_path / "run").train(resume_from_checkpoint=True)
        assert model.rankallocator.last_step == 11
        assert all(sum(v) > 0 for v in model.rank_pattern.values())


def test_final_mask_is_never_fixed_on_empty_scores():
    """What a resume without the state did: the first step at or past total_step - tfinal fixed the final
    mask on all-zero scores, keeping the first triplets in layout order and pruning whole layers to rank 0."""
    model = _small()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    E = [m.lora_E["default"].detach().clone() for _, m in model.adapted_layers()]
    for step in (9, 10):
        with pytest.raises(RuntimeError, match="no importance scores"):
            model.update_and_allocate(step)
    alloc = model.rankallocator
    assert not alloc.finalized and alloc.last_step is None and model.rank_pattern is None
    assert all(torch.equal(a, m.lora_E["default"]) for a, (_, m) in zip(E, model.adapted_layers()))


def test_training_again_from_step_zero_on_a_trained_model_raises(tmp_path):
    model = _small()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(model, tmp_path, save_strategy="no", max_steps=3).train()
        with pytest.raises(RuntimeError, match="already run to step 2"):
            _trainer(model, tmp_path, save_strategy="no", max_steps=3).train()
