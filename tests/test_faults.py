"""Nothing lost, nothing silent: saves killed at every file, torn and mixed directories, every
resume path, unchecked kernel inputs and bad values. Each case asserts that the earlier checkpoint
still loads exactly, or that a clear error names the file, the layer or the field.

Kills are real: a subprocess saves, and a child forked from it ``os._exit``s just before the k-th
filesystem step of the save (a write flushed to disk, a rename, a removal), for every k until a
save runs to its end; the Trainer runs are killed in a subprocess at the two places a Trainer save
could strand its checkpoints.
"""

from __future__ import annotations

import copy
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import adalora_fast as af
from adalora_fast import CheckpointError
from adalora_fast.save_load import ALLOCATOR_STATE_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from tiny_models import tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIG_NAME = "adapter_config.json"
# warm-up 0..2, masks at 4 and 6 (reduction), final mask from step 9
SCHEDULE = dict(
    init_r=4,
    target_r=2,
    tinit=2,
    tfinal=3,
    deltaT=2,
    total_step=12,
    lora_dropout=0.0,
    target_modules=["q_proj", "v_proj"],
)


def _model(**over):
    return af.get_peft_model(tiny_llama(max_position_embeddings=64), af.AdaLoraConfig(**{**SCHEDULE, **over}))


def _ids(step):
    return torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(100 + step))


def _train(model, steps, opt=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for s in steps:
        ids = _ids(s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.update_and_allocate(s)
        opt.zero_grad()
    return opt


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids(99)).logits


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")]))


def _spawn(script_text, path, *argv):
    with open(path, "w") as f:
        f.write(script_text)
    return subprocess.Popen(
        [sys.executable, str(path), *map(str, argv)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc, ok=(0,)):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode in ok, out[-3000:]
    return out


def _load(d, trainable=False, base=None):
    base = tiny_llama(max_position_embeddings=64) if base is None else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return af.AdaLoraModel.from_pretrained(base, str(d), is_trainable=trainable)


# ----------------------------------------------------------------------------- saves killed at every file
# One process trains, saves "old" (step 4, after the first mask) with its allocator state, trains two
# more steps and saves "new"; then, for k = 1, 2, ..., a forked child copies "old" to kill<k> and saves
# the new state over it, killed just before its k-th filesystem step, until a save completes.
SAVE_KILLS = r"""
import os, shutil, sys, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
import test_faults as tf

root, safe, with_state = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
model = tf._model()
opt = tf._train(model, range(5))
model.save_pretrained(os.path.join(root, "old"), save_allocator_state=True)
tf._train(model, range(5, 7), opt)
model.save_pretrained(os.path.join(root, "new"), save_allocator_state=with_state, safe_serialization=safe)
k = 0
while True:
    k += 1
    d = os.path.join(root, f"kill{k}")
    shutil.copytree(os.path.join(root, "old"), d)
    pid = os.fork()
    if pid == 0:
        calls = [0]

        def killed_before(fn):
            def step(*a, **kw):
                calls[0] += 1
                if calls[0] == k:
                    os._exit(9)
                return fn(*a, **kw)
            return step

        os.fsync, os.replace, os.remove = killed_before(os.fsync), killed_before(os.replace), killed_before(os.remove)
        model.save_pretrained(d, save_allocator_state=with_state, safe_serialization=safe)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        break
    assert code == 9, code
print("KILL_POINTS", k - 1)
"""


def _files(d):
    """{name: content}: the bytes, or for a safetensors file its tensors and metadata (the order of the
    metadata in its header is not fixed from one save to the next)."""
    from adalora_fast.fileio import read_safetensors

    out = {}
    for f in os.listdir(d):
        if ".tmp-" in f:
            continue  # a temporary file of a killed write: never read by a load
        p = os.path.join(d, f)
        if f.endswith(".safetensors"):
            tensors, meta = read_safetensors(p, f)
            out[f] = (
                sorted(meta.items()),
                sorted((k, v.dtype, tuple(v.shape), v.flatten().tolist()) for k, v in tensors.items()),
            )
        else:
            with open(p, "rb") as fh:
                out[f] = fh.read()
    return out


def _check_killed_saves(root):
    old, new = root / "old", root / "new"
    ref = {}
    for name, d in (("old", old), ("new", new)):
        ref[name] = {"logits": _logits(_load(d).eval())}
        if (d / ALLOCATOR_STATE_NAME).exists():
            m = _load(d, trainable=True)
            ref[name]["resume"] = (m.rankallocator.last_step, _adapters(m), m.rankallocator.m1.clone())
    old_files, new_files = _files(old), _files(new)
    kills = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("kill")), key=lambda p: int(p.name[4:])
    )
    assert len(kills) >= 5, [p.name for p in kills]
    outcomes = []
    for d in kills:
        files = _files(d)
        for f, data in files.items():  # every file whole: the old one or the new one, never torn
            assert data in (old_files.get(f), new_files.get(f)), f"{d.name}/{f} is neither the old nor the new file"
        try:
            got = _logits(_load(d).eval())
            which = [n for n in ref if torch.equal(got, ref[n]["logits"])]
            assert which, f"{d.name}: the adapter loads, but as neither save"
            outcomes.append((d.name, "load", which[0]))
        except CheckpointError as exc:
            assert str(d) in str(exc), exc  # the error names a file of the directory
            outcomes.append((d.name, "load", "error"))
        if not (d / ALLOCATOR_STATE_NAME).exists():
            continue
        try:
            m = _load(d, trainable=True)
        except CheckpointError as exc:
            assert str(d / ALLOCATOR_STATE_NAME) in str(exc) or str(d) in str(exc), exc
            outcomes.append((d.name, "resume", "error"))
            continue
        step, adapters, m1 = m.rankallocator.last_step, _adapters(m), m.rankallocator.m1
        which = [n for n in ref if "resume" in ref[n] and ref[n]["resume"][0] == step]
        assert which, f"{d.name}: resumed at step {step}"
        s_ref, a_ref, m1_ref = ref[which[0]]["resume"]
        assert all(torch.equal(adapters[k], a_ref[k]) for k in a_ref), f"{d.name}: weights of another save"
        assert torch.equal(m1, m1_ref)
        outcomes.append((d.name, "resume", which[0]))
    # the first kill leaves the old checkpoint, which loads and resumes exactly; the last completed the new one
    assert outcomes[0] == ("kill1", "load", "old") and ("kill1", "resume", "old") in outcomes, outcomes
    return outcomes


@pytest.mark.parametrize("safe,with_state", [(True, True), (False, False)], ids=["same-format", "bin-without-state"])
def test_save_killed_at_every_file_leaves_old_new_or_a_named_error(tmp_path, safe, with_state):
    """A kill at any point of save_pretrained over an earlier checkpoint: every file is whole (old or
    new); the directory loads as one of the two saves (adapter and resume state of the same save) or
    raises CheckpointError naming its file. With a format switch and no state, the old .safetensors
    and the old state must not outlive the new .bin (a load would prefer them)."""
    proc = _spawn(SAVE_KILLS, tmp_path / "save_killed.py", tmp_path, int(safe), int(with_state))
    out = _wait(proc)
    assert "KILL_POINTS" in out, out[-2000:]
    outcomes = _check_killed_saves(tmp_path)
    last = max(
        (p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("kill")), key=lambda p: int(p.name[4:])
    )
    assert _files(last) == _files(tmp_path / "new")  # the completed save: exactly the new files, nothing stale
    if not safe:
        assert (tmp_path / "new" / LEGACY_WEIGHTS_NAME).exists() and not (tmp_path / "new" / WEIGHTS_NAME).exists()
        assert not (tmp_path / "new" / ALLOCATOR_STATE_NAME).exists()
        assert any(o[2] == "error" for o in outcomes)  # both formats beside each other at some kill point: refused


# ----------------------------------------------------------------------------- the Trainer's saves
TRAIN = r"""
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
import adalora_fast as af
from tiny_models import TokenRows, tiny_llama

mode, out_dir, result = sys.argv[1], sys.argv[2], sys.argv[3]
resume = sys.argv[4] if len(sys.argv) > 4 else None
resume = True if resume == "last" else resume
torch.set_num_threads(1)


class Kill(TrainerCallback):
    # listed before AdaLoraCallback: its on_save runs after the Trainer's rotation and before ours
    def on_save(self, args, state, control, **kwargs):
        if mode == "after_rotation" and state.global_step == 8:
            os._exit(9)

    def on_step_end(self, args, state, control, **kwargs):
        if mode == "in_state_write" and state.global_step == 8:  # the second file of the callback's write
            replace, calls = os.replace, [0]

            def killed(*a):
                calls[0] += 1
                if calls[0] == 2:
                    os._exit(9)
                return replace(*a)

            os.replace = killed


base = tiny_llama(max_position_embeddings=64)
cfg = af.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=12, lora_dropout=0.0,
                       target_modules=["q_proj", "v_proj"])
model = af.get_peft_model(base, cfg)
args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=2, max_steps=12, learning_rate=2e-2,
                         save_strategy="steps", save_steps=4, save_total_limit=1, report_to=[], logging_strategy="no",
                         use_cpu=True, disable_tqdm=True, seed=7, dataloader_num_workers=0)
callback = af.AdaLoraCallback(model)
trainer = Trainer(model=model, args=args, train_dataset=TokenRows(length=8), callbacks=[Kill(), callback])
trainer.train(resume_from_checkpoint=resume)
json.dump({"rank_pattern": model.rank_pattern, "restored_from": callback.restored_from,
           "last_step": model.rankallocator.last_step}, open(result + ".json", "w"))
save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}, result + ".safetensors")
"""


def _in_process(script, *argv, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)


def _same_run(a, b):
    (ma, wa), (mb, wb) = a, b
    assert ma["rank_pattern"] == mb["rank_pattern"] and ma["last_step"] == mb["last_step"] == 11
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def _result(prefix):
    with open(f"{prefix}.json") as f:
        return json.load(f), load_file(f"{prefix}.safetensors")


def test_trainer_killed_during_a_save_with_save_total_limit_1_resumes_exactly(tmp_path, monkeypatch):
    """save_total_limit=1: the Trainer deletes checkpoint-4 after writing checkpoint-8 and only then
    fires on_save. Killed right there, checkpoint-8 must already hold the allocator state (the
    callback writes it when the save is decided); killed inside the callback's own write, before the
    Trainer's save, checkpoint-4 is still there and resumes. Both end exactly as the uninterrupted run."""
    script = tmp_path / "train.py"
    rot = _spawn(TRAIN, script, "after_rotation", tmp_path / "rot", tmp_path / "unused")
    mid = _spawn(TRAIN, tmp_path / "train2.py", "in_state_write", tmp_path / "mid", tmp_path / "unused")
    _in_process(script, "full", tmp_path / "full", tmp_path / "full_res", monkeypatch=monkeypatch)
    full = _result(tmp_path / "full_res")
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint-12"]  # rotation on
    _wait(rot, ok=(9,)), _wait(mid, ok=(9,))
    assert os.listdir(tmp_path / "rot") == ["checkpoint-8"]  # checkpoint-4 was rotated away before the kill
    ck8 = tmp_path / "rot" / "checkpoint-8"
    assert {ALLOCATOR_STATE_NAME, WEIGHTS_NAME, CONFIG_NAME, "model.safetensors", "trainer_state.json"} <= set(
        os.listdir(ck8)
    )
    # the kill inside the callback's write: checkpoint-8 has the new adapter file only; checkpoint-4 whole
    assert sorted(os.listdir(tmp_path / "mid")) == ["checkpoint-4", "checkpoint-8"]
    assert {f for f in os.listdir(tmp_path / "mid" / "checkpoint-8") if ".tmp-" not in f} == {WEIGHTS_NAME}
    # resume_from_checkpoint=True takes the newest folder, the torn one: the Trainer's own error names it
    with pytest.raises((ValueError, OSError), match="checkpoint-8"):
        _in_process(script, "resume", tmp_path / "mid", tmp_path / "r_last", "last", monkeypatch=monkeypatch)
    for name, ck in (("r8", ck8), ("r4", tmp_path / "mid" / "checkpoint-4")):
        _in_process(script, "resume", tmp_path / f"{name}_out", tmp_path / name, ck, monkeypatch=monkeypatch)
        meta, w = _result(tmp_path / name)
        assert meta["restored_from"] == str(ck)
        _same_run((meta, w), full)


# ----------------------------------------------------------------------------- torn, empty and mixed files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model trained into the reduction phase (masked at steps 4 and 6), saved with its state."""
    d = tmp_path_factory.mktemp("saved") / "ckpt"
    model = _model()
    _train(model, range(7))
    model.save_pretrained(str(d), save_allocator_state=True)
    return d


def _copy(saved, tmp_path, name="ckpt"):
    d = tmp_path / name
    shutil.copytree(saved, d)
    return d


@pytest.mark.parametrize(
    "name,how",
    [
        (WEIGHTS_NAME, "truncate"),
        (WEIGHTS_NAME, "empty"),
        (CONFIG_NAME, "empty"),
        (CONFIG_NAME, "truncate"),
        (ALLOCATOR_STATE_NAME, "truncate"),
        (ALLOCATOR_STATE_NAME, "garbage"),
        (LEGACY_WEIGHTS_NAME, "truncate"),
    ],
)
def test_torn_or_corrupt_file_raises_naming_it(saved, tmp_path, name, how):
    d = _copy(saved, tmp_path)
    if name == LEGACY_WEIGHTS_NAME:
        m = _load(d)
        m.save_pretrained(str(d), safe_serialization=False)
        assert not (d / WEIGHTS_NAME).exists()
    data = (d / name).read_bytes()
    (d / name).write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[how])
    with pytest.raises(CheckpointError) as ei:
        _load(d, trainable=name == ALLOCATOR_STATE_NAME)
    assert str(d / name) in str(ei.value), ei.value


def test_stale_files_are_removed_and_a_mixed_directory_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    old_state = (d / ALLOCATOR_STATE_NAME).read_bytes()
    model = _load(d, trainable=True)
    _train(model, range(7, 8))
    # issue: save(d, state) then save(d) resumed the older weights; the state of the older save now goes
    model.save_pretrained(str(d))
    assert not (d / ALLOCATOR_STATE_NAME).exists()
    # the same weights saved again without state keep the state that matches them
    e = _copy(saved, tmp_path, "same")
    _load(e).save_pretrained(str(e))
    assert (e / ALLOCATOR_STATE_NAME).exists()
    # an older state put back beside newer adapters (copied by hand, or left by a killed save): refused
    (d / ALLOCATOR_STATE_NAME).write_bytes(old_state)
    with pytest.raises(CheckpointError, match="mixes two saves") as ei:
        _load(d, trainable=True)
    assert str(d / ALLOCATOR_STATE_NAME) in str(ei.value) and str(d / WEIGHTS_NAME) in str(ei.value)
    # the same, with a state written before the record existed (no header metadata): its adapters are compared
    sd = load_file(str(d / ALLOCATOR_STATE_NAME))
    save_file(sd, str(d / ALLOCATOR_STATE_NAME))
    with pytest.raises(CheckpointError, match="mixes two saves"):
        _load(d, trainable=True)
    f = _copy(saved, tmp_path, "legacy")
    save_file(load_file(str(f / ALLOCATOR_STATE_NAME)), str(f / ALLOCATOR_STATE_NAME))
    assert _load(f, trainable=True).rankallocator.last_step == 6  # a consistent legacy state still resumes
    # a later save in the other format removes the older one (which a load would prefer)
    model.save_pretrained(str(d), safe_serialization=False)
    assert (d / LEGACY_WEIGHTS_NAME).exists() and not (d / WEIGHTS_NAME).exists()
    model.save_pretrained(str(tmp_path / "ref"))
    torch.testing.assert_close(_logits(_load(d).eval()), _logits(_load(tmp_path / "ref").eval()), rtol=0, atol=0)
    # both formats beside each other: which one is current cannot be told
    shutil.copy(saved / WEIGHTS_NAME, d / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="both") as ei:
        _load(d)
    assert str(d) in str(ei.value)


def test_edited_init_r_names_the_layer_the_field_and_the_file(saved, tmp_path):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["init_r"] = 6
    cfg["target_r"] = 2
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as ei:
        _load(d)
    msg = str(ei.value)
    assert str(d / CONFIG_NAME) in msg and "init_r=6" in msg and "model.layers.0.self_attn.q_proj" in msg, msg
    with pytest.raises(CheckpointError) as ei:  # the resume: the state's full-rank adapters do not fit
        _load(d, trainable=True)
    msg = str(ei.value)
    assert str(d / ALLOCATOR_STATE_NAME) in msg and "init_r=6" in msg and "q_proj.lora_A" in msg, msg
    # a config that is not valid for its own fields names the file and the field
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg["total_step"] = None
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="total_step") as ei:
        _load(d)
    assert str(d / CONFIG_NAME) in str(ei.value)


def test_callback_resume_with_a_torn_state_says_which_file(saved, tmp_path):
    d = _copy(saved, tmp_path, "checkpoint-7")
    (d / ALLOCATOR_STATE_NAME).write_bytes((d / ALLOCATOR_STATE_NAME).read_bytes()[:100])
    model = _model()
    cb = af.AdaLoraCallback(model, resume_from_checkpoint=str(d))
    with pytest.raises(RuntimeError, match="no AdaLoRA allocator state") as ei:
        cb._restore(SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None), 7)
    assert str(d / ALLOCATOR_STATE_NAME) in str(ei.value) and "truncated or corrupt" in str(ei.value)


# ----------------------------------------------------------------------------- resume paths without the state
def test_from_pretrained_without_state_refuses_to_continue_the_schedule(saved, tmp_path):
    d = _copy(saved, tmp_path)
    os.remove(d / ALLOCATOR_STATE_NAME)
    model = _load(d, trainable=True)  # mid-reduction: resized ranks, a fresh allocator
    ids = _ids(7)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="without the rank allocator's state") as ei:
        model.update_and_allocate(7)
    assert repr(str(d)) in str(ei.value)
    assert model.rankallocator.last_step is None and model.rankallocator.m1 is None  # nothing changed
    model.update_and_allocate(0)  # a new schedule on these adapters, counted from 0, is allowed
    assert model.rankallocator.last_step == 0
    # an untrained adapter (every lora_E still 0) is no resume: any first step is taken
    e = tmp_path / "fresh"
    _model().save_pretrained(str(e))
    fresh = _load(e, trainable=True)
    fresh(input_ids=ids, labels=ids).loss.backward()
    fresh.update_and_allocate(3)


def test_state_dict_round_trip_needs_the_allocator_state():
    full = _model()
    opt = _train(full, range(5))
    msd = {k: v.clone() for k, v in full.state_dict().items()}
    asd = {k: v.clone() for k, v in full.rankallocator.state_dict().items()}
    assert not any(k.startswith("rankallocator") for k in msd)  # PEFT's keys, key for key
    resumed = _model()
    resumed.load_state_dict(msd)
    ids = _ids(5)
    resumed(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="a state dict"):
        resumed.update_and_allocate(5)
    resumed.zero_grad()
    resumed.rankallocator.load_state_dict(asd)  # the documented resume: both state dicts
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: load_state_dict keeps the tensors it is given
    _train(full, range(5, 10), opt)
    _train(resumed, range(5, 10), opt2)
    assert resumed.rank_pattern == full.rank_pattern
    for k, v in _adapters(full).items():
        torch.testing.assert_close(_adapters(resumed)[k], v, rtol=0, atol=0)


# ----------------------------------------------------------------------------- kernel inputs
@pytest.mark.parametrize("kind,shape", [("A", (6, 32)), ("B", (32, 6)), ("E", (6, 1)), ("E", (3, 1))])
def test_a_resized_data_tensor_is_refused_before_any_op(kind, shape):
    model = _model()
    _train(model, range(2))
    alloc = model.rankallocator
    m1 = alloc.m1.clone()
    ids = _ids(2)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = dict(model.adapted_layers())["model.layers.1.self_attn.q_proj"]
    p = getattr(layer, f"lora_{kind}")["default"]
    p.data = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"model\.layers\.1\.self_attn\.q_proj\.lora_{kind}\.default has shape"):
        model.update_and_allocate(2)
    assert torch.equal(alloc.m1, m1) and alloc.last_step == 1


def test_a_gradient_of_the_old_shape_is_refused():
    model = _model()
    ids = _ids(0)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = dict(model.adapted_layers())["model.layers.0.self_attn.v_proj"]
    p = layer.lora_A["default"]
    p.grad.data = torch.zeros(5, 32)  # p.grad = ... of another shape is refused by torch; .data is not
    with pytest.raises(ValueError, match=r"gradient of model\.layers\.0\.self_attn\.v_proj\.lora_A\.default"):
        model.update_and_allocate(0)
    assert model.rankallocator.m1 is None


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "field,value",
    [
        ("orth_reg_weight", math.nan),
        ("orth_reg_weight", math.inf),
        ("lora_alpha", math.nan),
        ("lora_alpha", -8),
        ("lora_alpha", math.inf),
    ],
)
def test_non_finite_or_negative_weights_and_alphas_raise(field, value):
    with pytest.raises(ValueError) as ei:
        af.AdaLoraConfig(total_step=10, **{field: value})
    assert field in str(ei.value) and repr(value) in str(ei.value)


def test_orth_reg_weight_set_to_nan_later_is_not_dropped():
    model = _model()
    model.peft_config["default"].orth_reg_weight = math.nan
    ids = _ids(0)
    with pytest.raises(ValueError, match="orth_reg_weight=nan"):
        model(input_ids=ids, labels=ids)


def test_total_step_beyond_max_steps_warns():
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(world_size=1, output_dir="unused")
    for max_steps, match in ((8, "never falls to target_r"), (11, "fewer than tfinal")):
        with pytest.warns(UserWarning, match=match):
            af.AdaLoraCallback(_model()).on_train_begin(args, TrainerState(max_steps=max_steps), TrainerControl())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for max_steps in (12, 20):
            af.AdaLoraCallback(_model()).on_train_begin(args, TrainerState(max_steps=max_steps), TrainerControl())


def test_micro_batch_step_counter_warns_once():
    """peft#1801: update_and_allocate on every micro-batch with a micro-step counter runs the schedule
    `accumulation` times too fast; the weights do not change between those calls."""
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(RuntimeWarning, match="micro-batch counter") as rec:
        for micro in range(8):
            ids = _ids(micro)
            (model(input_ids=ids, labels=ids).loss / 4).backward()
            model.update_and_allocate(micro)
            if micro % 4 == 3:
                opt.step()
                opt.zero_grad()
    assert len([w for w in rec if "micro-batch" in str(w.message)]) == 1
    # the right loop (one call per optimizer step), and an optimizer step skipped by a GradScaler, do not warn
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            for micro in range(2):
                ids = _ids(micro)
                model(input_ids=ids, labels=ids).loss.backward()
            if step != 1:
                opt.step()
            model.update_and_allocate(step)
            opt.zero_grad()


def test_fp64_model_gets_fp64_adapters_as_in_peft(tmp_path):
    import peft

    torch.manual_seed(0)
    ours = af.get_peft_model(tiny_llama(max_position_embeddings=64).double(), af.AdaLoraConfig(**SCHEDULE))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(max_position_embeddings=64).double(), peft.AdaLoraConfig(**SCHEDULE))
    a = {n: p for n, p in ours.named_parameters() if "lora_" in n or "ranknum" in n}
    b = {n[len("base_model.") :]: p for n, p in theirs.named_parameters() if "lora_" in n or "ranknum" in n}
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype == torch.float64, n
        assert torch.equal(a[n], b[n]), n
    _train(ours, range(5))
    ours.save_pretrained(str(tmp_path), save_allocator_state=True)
    assert {v.dtype for v in load_file(str(tmp_path / WEIGHTS_NAME)).values()} == {torch.float64}
    back = _load(tmp_path, trainable=True, base=tiny_llama(max_position_embeddings=64).double())
    assert back.rankallocator.last_step == 4 and all(
        p.dtype == torch.float64 for n, p in back.named_parameters() if "lora_" in n
    )
