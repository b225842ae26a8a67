"""``model.compact(optimizer)``: once the final mask is fixed, the pruned triplets leave the adapters,
the optimizer state and the allocator.

* before the final mask: a clear error, nothing changed;
* right after: the same logits, ranks cut to the pattern (rank-0 layers run the base layer alone),
  AdamW's state sliced to the kept rows in the same param group, idempotent;
* training afterwards equals PEFT training the model it loads from a checkpoint saved at that step,
  with the optimizer state sliced (the orthogonal penalty over the kept rows);
* saving and loading both ways (PEFT's format, the allocator state, a whole state dict), merging;
* the HF Trainer with ``AdaLoraCallback(compact=True)``: checkpoints and exact resume, from before
  and after the compaction;
* ``torch.compile``: at most one recompile at compaction;
* DDP, FSDP and optimizer state that cannot be sliced: clear errors, nothing changed.
"""

from __future__ import annotations

import copy
import datetime
import os
import tempfile
import warnings
from types import SimpleNamespace

import peft
import pytest
import torch

import adalora_fast as af
from adalora_fast import auto_schedule, compaction, peft_patch
from tiny_models import TokenRows, tiny_llama
from tolerances import assert_close

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# warm-up 0..2, masks at 4 and 6, the final mask at step 8 (= total_step - tfinal), frozen after
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, total_step=12, lora_alpha=8)
FINAL = SCHEDULE["total_step"] - SCHEDULE["tfinal"]


def _data(n=12):
    return torch.randint(0, 64, (n, 2, 10), generator=torch.Generator().manual_seed(1))


def _model(orth=0.5, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = af.get_peft_model(
            tiny_llama(seed),
            af.AdaLoraConfig(**SCHEDULE, target_modules=TARGETS, lora_dropout=0.0, orth_reg_weight=orth),
        )
    for _, m in model.adapted_layers():  # E = 0 at init would hide the adapters' effect on the logits
        torch.nn.init.normal_(m.lora_E["default"], std=0.1)
    return model


def _step(model, opt, ids, step):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    model.update_and_allocate(step)
    opt.zero_grad()
    return loss.item()


def _trained(until=FINAL, **kw):
    """A model and its AdamW after steps 0..until (the final mask is fixed at step FINAL)."""
    model = _model(**kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = _data()
    for s in range(until + 1):
        _step(model, opt, data[s], s)
    return model, opt, data


def _lora(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _logits(model, ids):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.train(was)
    return out


# ------------------------------------------------------------------------------------ the operation
def test_compact_before_the_final_mask_raises_and_changes_nothing():
    model, opt, _ = _trained(until=FINAL - 1)
    before = _lora(model)
    with pytest.raises(RuntimeError, match=f"total_step - tfinal = {FINAL}.*last step seen is {FINAL - 1}"):
        model.compact(opt)
    assert not compaction.is_compacted(model)
    after = _lora(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compact_keeps_the_function_and_slices_the_optimizer_state(monkeypatch):
    model, opt, data = _trained()
    a = "default"
    pattern = model.rank_pattern
    keeps = [torch.tensor(pattern[f"{n}.lora_E.{a}"]) for n, _ in model.adapted_layers()]
    assert any(not k.any() for k in keeps), "the schedule should leave a rank-0 layer to test"
    old = {n: (m.lora_A[a], m.lora_B[a], m.lora_E[a], m.ranknum[a]) for n, m in model.adapted_layers()}
    old_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for ps in old.values() for p in ps[:3]}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    ids = data[0]
    ref = _logits(model, ids)
    n_before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.compact(opt)
    assert compaction.is_compacted(model)
    # the same function (sums over fewer zero terms: equal up to float rounding)
    assert_close(_logits(model, ids), ref, what="logits after compaction")
    assert model.rank_pattern == pattern, "the saved pattern stays the full-length one"
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    for (name, m), keep in zip(model.adapted_layers(), keeps):
        A0, B0, E0, rn0 = old[name]
        r = int(keep.sum())
        assert m.r[a] == r and m.ranknum[a] is rn0 and rn0.item() == SCHEDULE["init_r"]
        A, B, E = m.lora_A[a], m.lora_B[a], m.lora_E[a]
        assert A.shape == (r, m.in_features) and B.shape == (m.out_features, r) and E.shape == (r, 1)
        for new, o, dim in ((A, A0, 0), (B, B0, 1), (E, E0, 0)):
            assert torch.equal(new.detach(), o.detach().index_select(dim, keep.nonzero().view(-1)))
            if r < SCHEDULE["init_r"]:
                assert new is not o and id(o) not in held and id(new) in held and o not in opt.state
            st, st0 = opt.state[new], old_state[id(o)]
            assert torch.equal(st["step"], st0["step"])
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[k], st0[k].index_select(dim, keep.nonzero().view(-1))), (name, k)
    n_after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_after < n_before
    # rank-0 layers run the base layer alone; the others the one adapter op
    calls = []
    real = af.layer.ops.adapter_linear
    monkeypatch.setattr(af.layer.ops, "adapter_linear", lambda *args: (calls.append(1), real(*args))[1])
    _logits(model, ids)
    assert len(calls) == sum(int(k.any()) for k in keeps)
    zero = next(m for (_, m), k in zip(model.adapted_layers(), keeps) if not k.any())
    x = torch.randn(3, zero.in_features)
    assert torch.equal(zero(x), zero.base_layer(x))
    # idempotent: nothing moves, the optimizer included
    params = [p for g in opt.param_groups for p in g["params"]]
    model.compact(opt)
    model.compact()
    assert [p for g in opt.param_groups for p in g["params"]] == params
    # the final phase goes on (and still refuses repeated steps)
    _step(model, opt, data[FINAL + 1], FINAL + 1)
    with pytest.raises(RuntimeError, match="repeats the previous step"):
        model.update_and_allocate(FINAL + 1)
    assert model.rankallocator.last_step == FINAL + 1 and model.rank_pattern == pattern


def test_an_optimizer_built_before_an_earlier_compaction_is_brought_over():
    model, opt, data = _trained()
    model.compact()  # no optimizer: opt still holds the replaced parameters
    model.compact(opt)
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for g in opt.param_groups for p in g["params"])
    _step(model, opt, data[FINAL + 1], FINAL + 1)


def test_optimizer_state_that_cannot_be_sliced_raises_and_changes_nothing():
    model, opt, _ = _trained()
    p = next(m for _, m in model.adapted_layers() if not all(model.rank_pattern[f"{_}.lora_E.default"])).lora_A[
        "default"
    ]
    opt.state[p]["factored_row"] = torch.zeros(p.shape[0] + p.shape[1])  # e.g. Adafactor's row statistics
    before = _lora(model)
    with pytest.raises(ValueError, match="'factored_row'.*Nothing was changed"):
        model.compact(opt)
    assert not compaction.is_compacted(model)
    assert all(torch.equal(v, _lora(model)[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="holds none of the adapter parameters"):
        model.compact(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))


# ------------------------------------------------------------------------------------ equals PEFT
def test_training_after_compaction_equals_peft_training_the_checkpoint(tmp_path):
    """Save at the compaction step, load in PEFT, give PEFT's AdamW our sliced state: the same losses
    and weights for the following steps (orthogonal penalty on, over the kept rows on both sides)."""
    model, opt, data = _trained()
    model.compact(opt)
    model.save_pretrained(str(tmp_path / "ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "ckpt"), is_trainable=True)
    theirs = dict(pm.base_model.named_parameters())
    ours = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(theirs[n].shape == p.shape for n, p in ours)
    opt_p = torch.optim.AdamW([theirs[n] for n, _ in ours], lr=1e-2)
    for n, p in ours:
        opt_p.state[theirs[n]] = copy.deepcopy(opt.state[p])
    for s in range(FINAL + 1, SCHEDULE["total_step"]):
        lo = _step(model, opt, data[s], s)
        lp = pm.base_model(input_ids=data[s], labels=data[s]).loss  # the tuner's forward adds the penalty
        lp.backward()
        opt_p.step()
        opt_p.zero_grad()
        torch.testing.assert_close(lo, lp.item(), rtol=1e-5, atol=1e-6)
    for n, p in ours:
        assert_close(p.detach(), theirs[n].detach(), what=n, rtol=1e-4)


# ------------------------------------------------------------------------------------ files
def test_save_and_load_both_ways_after_compaction(tmp_path):
    model, opt, data = _trained()
    model.compact(opt)
    ids = data[0]
    ref = _logits(model, ids)
    out = str(tmp_path / "ours")
    model.save_pretrained(out, save_allocator_state=True)
    # PEFT loads ours (the full-length pattern resizes its init_r layers to the saved tensors)
    pm = _peft_loads(out, ids, ref, "PEFT loading a compacted save")
    # ours loads PEFT's save of it
    pm.save_pretrained(str(tmp_path / "peft"))
    back = af.AdaLoraModel.from_pretrained(tiny_llama(0), str(tmp_path / "peft"))
    assert_close(_logits(back, ids), ref, what="PEFT's save loaded here")
    back.compact()  # inference model: already at the kept ranks, nothing to do
    # ours, trainable, with the allocator state: compacted the same way, the final phase goes on
    again = af.AdaLoraModel.from_pretrained(tiny_llama(0), out, is_trainable=True)
    assert compaction.is_compacted(again) and again.rank_pattern == model.rank_pattern
    assert_close(_logits(again, ids), ref, what="trainable reload")
    with pytest.raises(RuntimeError, match="repeats"):
        again.update_and_allocate(FINAL)
    again.update_and_allocate(FINAL + 1)
    # a whole state dict into a fresh model: the layers take the saved shapes, the allocator waits
    # for its state (clear errors meanwhile), then the allocator checkpoint completes it
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="not the allocator state"):
        fresh.update_and_allocate(FINAL + 1)
    with pytest.raises(RuntimeError, match="not the allocator state"):
        fresh.save_pretrained(str(tmp_path / "bad"))
    fresh.load_allocator_checkpoint(model.allocator_checkpoint())
    assert fresh.rank_pattern == model.rank_pattern
    assert_close(_logits(fresh, ids), ref, what="load_state_dict + allocator checkpoint")
    # a state from before compaction does not go into a compacted model
    early, _, _ = _trained(until=FINAL - 2)
    with pytest.raises(ValueError, match="saved before compaction"):
        fresh.load_allocator_checkpoint(early.allocator_checkpoint())
    with pytest.raises(RuntimeError, match="saved before compaction"):
        fresh.load_state_dict(early.state_dict())


def test_merge_and_unload_after_compaction():
    model, opt, data = _trained()
    model.compact(opt)
    ids = data[0]
    ref = _logits(model, ids)
    merged = model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, ref, what="merged")


# ------------------------------------------------------------------------------------ Trainer
def _hf_trainer(model, out, callbacks=(), **kw):
    """An HF Trainer over 24 token rows: 12 steps of 2, a checkpoint every 5 steps."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        max_steps=12,
        save_strategy="steps",
        save_steps=5,
        seed=7,
        **kw,
    )
    return Trainer(model=model, args=args, train_dataset=TokenRows(), callbacks=list(callbacks))


def _trainer(model, out, compact=True, **kw):
    cb = af.AdaLoraCallback(model, compact=compact)
    return _hf_trainer(model, out, [cb], **kw), cb


def test_trainer_compacts_and_resumes_exactly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _model(orth=0.1)
        _trainer(full, tmp_path / "run")[0].train()
        assert compaction.is_compacted(full) and full.rankallocator.last_step == 11
        ref = _lora(full)
        ck = tmp_path / "run"
        assert os.path.isfile(ck / "checkpoint-10" / "adalora_allocator_state.safetensors")
        # from after the compaction (step 8): the layers take the saved shapes before the optimizer is built
        for at in (10, 5):  # and from before it: the resumed run compacts at step 8 itself
            model = _model(orth=0.1)
            tr, cb = _trainer(model, tmp_path / f"r{at}")
            tr.train(resume_from_checkpoint=str(ck / f"checkpoint-{at}"))
            assert cb.restored_from == str(ck / f"checkpoint-{at}")
            assert compaction.is_compacted(model) and model.rank_pattern == full.rank_pattern
            got = _lora(model)
            assert set(got) == set(ref)
            for k in ref:
                assert torch.equal(got[k], ref[k]), f"resumed from checkpoint-{at}: {k}"


def test_callback_refuses_compaction_in_a_multi_process_run():
    cb = af.AdaLoraCallback(_model(), compact=True)
    with pytest.raises(RuntimeError, match="2 processes"):
        cb.on_train_begin(SimpleNamespace(world_size=2), SimpleNamespace(global_step=0), None)


# ------------------------------------------------------------------------------------ compile
def test_compiled_model_recompiles_at_most_once_at_compaction():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager, opt_e, data = _trained(until=FINAL - 2)
    comp = copy.deepcopy(eager)
    opt_c = torch.optim.AdamW([p for p in comp.parameters() if p.requires_grad], lr=1e-2)
    opt_c.load_state_dict(copy.deepcopy(opt_e.state_dict()))  # state_dict() holds the live tensors
    cnt = CompileCounterWithBackend("aot_eager")
    fwd = torch.compile(comp, backend=cnt)
    for s in range(FINAL - 1, SCHEDULE["total_step"]):
        le = _step(eager, opt_e, data[s], s)
        loss = fwd(input_ids=data[s], labels=data[s]).loss
        loss.backward()
        opt_c.step()
        comp.update_and_allocate(s)
        opt_c.zero_grad()
        for m, o in ((eager, opt_e), (comp, opt_c)):
            compaction.compact_if_final(m, o)
        torch.testing.assert_close(loss.item(), le, rtol=1e-5, atol=1e-6)
    assert compaction.is_compacted(comp)
    assert cnt.frame_count <= 2, f"{cnt.frame_count} compiles: more than one recompile at compaction"
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ distributed
def test_ddp_and_fsdp_wrapped_models_are_refused():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    store = tempfile.NamedTemporaryFile(delete=False)
    store.close()
    os.remove(store.name)
    dist.init_process_group(
        "gloo", init_method=f"file://{store.name}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model, opt, _ = _trained()
        ddp = DistributedDataParallel(model)
        with pytest.raises(RuntimeError, match="DistributedDataParallel"):
            model.compact(opt)
        assert not compaction.is_compacted(model)
        del ddp
        model.compact(opt)  # unwrapped again (after training, say): allowed
        assert compaction.is_compacted(model)
        model, opt, data = _trained()
        fully_shard(model)
        ids = data[0]
        model(input_ids=ids, labels=ids)  # FSDP2 leaves whole parameters between its hooks; resharded after
        with pytest.raises(RuntimeError, match="FSDP"):
            model.compact(opt)
        assert not compaction.is_compacted(model)
    finally:
        dist.destroy_process_group()
        if os.path.exists(store.name):
            os.remove(store.name)


# ------------------------------------------------------------------------------------ PEFT, patched
# patch_peft(compact=True) / accelerate(model, compact=True): the automatic schedule compacts PEFT's
# own model right after the optimizer step that fixes the final mask, with that optimizer.
@pytest.fixture
def unpatch_after():
    yield
    af.unpatch_peft()


def _peft_model(orth=0.5):
    """A PEFT AdaLoRA model (built under whatever patching is active) with E != 0, and its adapter
    tensors under the tuner's state-dict keys (= our AdaLoraModel's), for a native twin."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            tiny_llama(0),
            peft.AdaLoraConfig(
                **SCHEDULE, target_modules=TARGETS, lora_dropout=0.0, orth_reg_weight=orth, task_type="CAUSAL_LM"
            ),
        )
    torch.manual_seed(3)
    for n, p in pm.base_model.named_parameters():
        if "lora_E" in n:
            torch.nn.init.normal_(p, std=0.1)
    init = {k: v.detach().clone() for k, v in pm.base_model.state_dict().items() if "lora_" in k}
    return pm, init


def _native_twin(init, orth=0.5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = af.get_peft_model(
            tiny_llama(0),
            af.AdaLoraConfig(**SCHEDULE, target_modules=TARGETS, lora_dropout=0.0, orth_reg_weight=orth),
        )
    assert not model.load_state_dict(init, strict=False).unexpected_keys
    return model


def _peft_lora(pm) -> dict:
    return {k: v.detach().clone() for k, v in pm.base_model.named_parameters() if "lora_" in k}


def _peft_loads(folder: str, ids, ref, what: str):
    """PEFT's own from_pretrained of ``folder`` on a fresh tiny LLaMA, in eval mode, its logits for
    ``ids`` checked against ``ref``; returns the PeftModel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(0), folder)
    pm.eval()
    with torch.no_grad():
        assert_close(pm(input_ids=ids).logits, ref, what=what)
    return pm


def _svd_ranks(pm) -> dict:
    from peft.tuners.adalora.layer import SVDLinear

    return {n: m.lora_A["default"].shape[0] for n, m in pm.base_model.model.named_modules() if isinstance(m, SVDLinear)}


def test_patched_peft_compacts_itself_in_a_plain_loop_as_the_native_path_does(tmp_path, unpatch_after):
    """No call in the loop: the schedule runs and compacts at step FINAL; losses and weights equal
    to our native model with update_and_allocate + compact(opt) by hand; the optimizer's state is
    sliced; the model is still PEFT's, and PEFT (unpatched) loads its save with equal logits."""
    af.patch_peft(compact=True)
    pm, init = _peft_model()
    native = _native_twin(init)
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    opt_n = torch.optim.AdamW([p for p in native.parameters() if p.requires_grad], lr=1e-2)
    data = _data()
    for s in range(SCHEDULE["total_step"]):
        lp = pm(input_ids=data[s], labels=data[s]).loss
        lp.backward()
        opt_p.step()  # the automatic schedule (and at step FINAL the compaction) runs in its post-hook
        opt_p.zero_grad()
        ln = _step(native, opt_n, data[s], s)
        if s == FINAL:
            native.compact(opt_n)
        assert lp.item() == ln, f"step {s}"
        acc = peft_patch.state_of(pm)
        assert isinstance(acc.allocator, compaction.CompactedAllocator) == (s >= FINAL), s
    assert isinstance(pm, peft.PeftModel)
    ranks = _svd_ranks(pm)
    pattern = pm.peft_config["default"].rank_pattern
    assert ranks == {n: sum(pattern[f"{n}.lora_E.default"]) for n in ranks}
    assert any(r == 0 for r in ranks.values()) and sum(ranks.values()) == SCHEDULE["target_r"] * len(ranks)
    theirs = _peft_lora(pm)
    for n, p in native.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.detach(), theirs[n]), n
    held = {id(p) for g in opt_p.param_groups for p in g["params"]}
    for p in pm.parameters():
        if p.requires_grad:
            assert id(p) in held and opt_p.state[p]["exp_avg"].shape == p.shape
    ids = data[0]
    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    out = str(tmp_path / "patched")
    pm.save_pretrained(out)
    with pytest.warns(UserWarning, match="compacted PEFT AdaLoRA model back to PEFT"):
        af.unpatch_peft()
    back = _peft_loads(out, ids, ref, "unpatched PEFT loading the compacted save")
    assert _svd_ranks(back) == ranks


def test_patched_peft_compacts_in_the_trainer_and_resumes_exactly(tmp_path, unpatch_after):
    """HF Trainer, no callback in the script: compacted at step FINAL; resuming from a checkpoint
    written after the compaction (the fresh model is compacted by the saved mask before the Trainer
    builds its optimizer and loads the sliced state) and from one before it gives the same weights."""
    af.patch_peft(compact=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, _ = _peft_model(orth=0.1)
        _hf_trainer(full, tmp_path / "run").train()
        ref = _peft_lora(full)
        assert isinstance(peft_patch.state_of(full).allocator, compaction.CompactedAllocator)
        ranks = _svd_ranks(full)
        assert sum(ranks.values()) == SCHEDULE["target_r"] * len(ranks)
        for at in (10, 5):
            model, _ = _peft_model(orth=0.1)
            _hf_trainer(model, tmp_path / f"r{at}").train(
                resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{at}")
            )
            assert isinstance(peft_patch.state_of(model).allocator, compaction.CompactedAllocator)
            assert model.peft_config["default"].rank_pattern == full.peft_config["default"].rank_pattern
            got = _peft_lora(model)
            assert set(got) == set(ref)
            for k in ref:
                assert torch.equal(got[k], ref[k]), f"resumed from checkpoint-{at}: {k}"


def test_accelerate_with_compact_and_the_public_compact(unpatch_after):
    """accelerate(model, compact=True) on a model built unpatched; af.compact: clear errors before the
    final mask, for a PEFT model not accelerated, and in a multi-process Trainer run."""
    pm, init = _peft_model()
    with pytest.raises(TypeError, match="accelerated by adalora_fast"):
        af.compact(pm)
    af.accelerate(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    data = _data()
    for s in range(FINAL):
        pm(input_ids=data[s], labels=data[s]).loss.backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="total_step - tfinal"):
        af.compact(pm, opt)
    af.accelerate(pm, compact=True)  # already accelerated: only switches compaction on
    acc = peft_patch.state_of(pm)
    assert acc.compact
    cb = auto_schedule.PeftScheduleCallback(acc)
    with pytest.raises(RuntimeError, match="several processes"):
        cb.on_train_begin(SimpleNamespace(world_size=2), SimpleNamespace(global_step=0, max_steps=12), None)
    pm(input_ids=data[FINAL], labels=data[FINAL]).loss.backward()
    opt.step()
    assert isinstance(acc.allocator, compaction.CompactedAllocator)
    assert af.compact(pm, opt) is pm  # idempotent
