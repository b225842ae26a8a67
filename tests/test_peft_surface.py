"""The attributes PEFT users rely on, each against peft 0.21.2's PeftModel on the same model, and
update_and_allocate's step argument (integral scalars as PEFT takes them; repeated or backward
steps refused, which PEFT silently accepts)."""

from __future__ import annotations

import inspect
import os
import warnings

import numpy as np
import peft
import pytest
import torch
from transformers import LlamaForCausalLM

import adalora_fast as af
from tiny_models import tiny_llama

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

SCHEDULE = dict(
    init_r=4,
    target_r=2,
    tinit=1,
    tfinal=2,
    deltaT=1,
    total_step=8,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj"],
    task_type="CAUSAL_LM",
)


def _llama():
    return tiny_llama(max_position_embeddings=64).eval()


def _pair(**over):
    kw = dict(SCHEDULE, **over)
    ours = af.get_peft_model(_llama(), af.AdaLoraConfig(**kw))
    pm = peft.get_peft_model(_llama(), peft.AdaLoraConfig(**kw))
    ours.load_state_dict(pm.base_model.state_dict())
    return ours, pm


def _ids(seed, n=2, t=8):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _step(model, opt, seed, update):
    model.train()
    ids = _ids(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    update()
    opt.zero_grad()
    model.eval()


def _opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


@torch.no_grad()
def _logits(model):
    return model(input_ids=_ids(7, 3, 10)).logits


# ----------------------------------------------------------------------------- base model, types, names
def test_base_model_is_the_tuner_and_get_base_model_the_wrapped_model():
    ours, pm = _pair()
    # PEFT: peft_model.base_model is the tuner (AdaLoraModel), whose .model is the transformers model
    assert type(pm.base_model).__name__ == "AdaLoraModel"
    assert ours.base_model is ours
    assert ours.base_model.model is ours.model and ours.get_base_model() is ours.model
    assert type(ours.get_base_model()) is type(pm.get_base_model()) is LlamaForCausalLM
    assert type(ours.base_model.model) is type(pm.base_model.model)
    # PEFT's documented call and its tuner attributes resolve the same way
    for name in (
        "update_and_allocate",
        "rankallocator",
        "peft_config",
        "model",
        "targeted_module_names",
        "merge_and_unload",
        "unload",
        "disable_adapter_layers",
        "enable_adapter_layers",
        "active_adapter",
    ):
        assert hasattr(pm.base_model, name), name
        assert hasattr(ours.base_model, name), name
    assert ours.base_model.targeted_module_names == pm.base_model.targeted_module_names
    # the tuner's state dict: ours is PEFT's base_model.state_dict() key for key (PeftModel adds "base_model.")
    assert list(ours.state_dict()) == list(pm.base_model.state_dict())
    assert {f"base_model.{k}" for k in ours.state_dict()} == set(pm.state_dict())
    # attributes of the transformers model are reached through ours, as through PEFT
    assert ours.config is ours.model.config and pm.config is pm.get_base_model().config
    assert ours.get_input_embeddings() is ours.model.get_input_embeddings()
    assert callable(ours.generate) and callable(pm.generate)


def test_peft_type_config_and_active_adapter_as_peft():
    ours, pm = _pair()
    assert pm.peft_type == peft.PeftType.ADALORA
    assert ours.peft_type == pm.peft_type == "ADALORA"
    assert str(ours.peft_type) == str(pm.peft_type) and ours.peft_type.value == pm.peft_type.value
    assert ours.peft_config["default"].peft_type == pm.peft_config["default"].peft_type
    assert isinstance(ours.peft_config, dict) and list(ours.peft_config) == list(pm.peft_config) == ["default"]
    assert ours.peft_config["default"].task_type == pm.peft_config["default"].task_type == "CAUSAL_LM"
    assert ours.active_adapter == pm.active_adapter == "default"
    assert ours.active_adapters == pm.active_adapters == ["default"]
    assert ours.modules_to_save is None and pm.modules_to_save is None
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert af.PeftType.ADALORA == peft.PeftType.ADALORA


def test_peft_config_rank_pattern_follows_the_masks_as_peft():
    ours, pm = _pair()
    oo, op = _opt(ours), _opt(pm)
    for s in range(8):  # warm-up (0, 1), masking steps 2..5, final mask at 6, frozen at 7
        _step(pm, op, s, lambda: pm.base_model.update_and_allocate(s))
        _step(ours, oo, s, lambda: ours.update_and_allocate(s))
        theirs = pm.peft_config["default"].rank_pattern
        assert ours.peft_config["default"].rank_pattern == theirs, f"step {s}"
        assert (theirs is None) == (s < 2)
        assert ours.base_model.peft_config["default"].rank_pattern == ours.rank_pattern == theirs
    torch.testing.assert_close(_logits(ours), _logits(pm), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- merge, unload, disable
def test_merge_and_unload_and_unload_take_peft_arguments():
    sig_o = inspect.signature(af.AdaLoraModel.merge_and_unload).parameters
    sig_p = inspect.signature(peft.tuners.adalora.AdaLoraModel.merge_and_unload).parameters
    assert list(sig_o)[:4] == list(sig_p)[:4] == ["self", "progressbar", "safe_merge", "adapter_names"]
    ours, pm = _pair()
    _step(ours, _opt(ours), 1, lambda: ours.update_and_allocate(1))
    pm.base_model.load_state_dict(ours.state_dict())
    adapted = _logits(ours)
    torch.testing.assert_close(_logits(pm), adapted, rtol=1e-5, atol=1e-5)
    merged = ours.merge_and_unload(True, True, ["default"])  # progressbar, safe_merge, adapter_names as in PEFT
    torch.testing.assert_close(
        _logits(merged), _logits(pm.merge_and_unload(True, True, ["default"])), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapter_names"):
        _pair()[0].merge_and_unload(adapter_names=["other"])
    ours, pm = _pair()
    _step(ours, _opt(ours), 1, lambda: ours.update_and_allocate(1))
    base = _logits(_llama())
    torch.testing.assert_close(_logits(ours.unload()), base, rtol=0, atol=0)
    torch.testing.assert_close(_logits(pm.unload()), base, rtol=0, atol=0)


def test_disable_and_enable_adapter_layers_as_peft():
    ours, pm = _pair()
    _step(ours, _opt(ours), 1, lambda: ours.update_and_allocate(1))
    pm.base_model.load_state_dict(ours.state_dict())
    adapted, base = _logits(ours), _logits(_llama())
    assert not torch.allclose(adapted, base, atol=1e-5)
    for m in (ours, pm):
        m.base_model.disable_adapter_layers()
        torch.testing.assert_close(_logits(m), base, rtol=0, atol=1e-6)
        m.base_model.enable_adapter_layers()
        torch.testing.assert_close(_logits(m), adapted, rtol=1e-5, atol=1e-5)
        with m.disable_adapter():
            torch.testing.assert_close(_logits(m), base, rtol=0, atol=1e-6)
        torch.testing.assert_close(_logits(m), adapted, rtol=1e-5, atol=1e-5)


def test_one_adapter_only_and_clear_errors_for_adapter_management():
    ours, _ = _pair()
    ours.set_adapter("default")
    with pytest.raises(ValueError, match="one adapter"):
        ours.set_adapter("other")
    # without these the calls would reach transformers' own PEFT integration on the inner model
    assert hasattr(ours.model, "load_adapter")
    for name in ("add_adapter", "load_adapter", "delete_adapter"):
        with pytest.raises(NotImplementedError, match="one adapter"):
            getattr(ours, name)("other")


# ----------------------------------------------------------------------------- save_pretrained arguments
def test_save_pretrained_takes_peft_arguments(tmp_path):
    ours, _ = _pair()
    _step(ours, _opt(ours), 1, lambda: ours.update_and_allocate(1))
    expect = _logits(ours)
    ours.save_pretrained(str(tmp_path / "none"), is_main_process=False)
    assert not os.path.exists(tmp_path / "none")
    ours.save_pretrained(str(tmp_path / "bin"), safe_serialization=False, selected_adapters=["default"])
    assert sorted(os.listdir(tmp_path / "bin")) == ["adapter_config.json", "adapter_model.bin"]
    loaded = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "bin"))
    torch.testing.assert_close(_logits(loaded), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        _logits(af.AdaLoraModel.from_pretrained(_llama(), str(tmp_path / "bin"))), expect, rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="selected_adapters"):
        ours.save_pretrained(str(tmp_path / "x"), selected_adapters=["other"])


# ----------------------------------------------------------------------------- update_and_allocate(step)
def _ready(**over):
    """Ours and PEFT with the same weights after one optimizer step (so E != 0 and every gradient
    is nonzero), and the gradients of a second batch, ready for update_and_allocate."""
    ours, pm = _pair(**over)
    for m in (ours, pm):
        _step(m, _opt(m), 0, lambda: None)
        m.train()
        ids = _ids(3)
        m(input_ids=ids, labels=ids).loss.backward()
    return ours, pm


ACCEPTED = [
    np.int64(2),
    np.int32(3),
    np.uint8(4),
    torch.tensor(5),
    torch.tensor(6, dtype=torch.int32),
    7.0,
    np.float64(8.0),
]
REJECTED = [
    True,
    np.bool_(True),
    torch.tensor(True),
    1.5,
    np.float64(2.5),
    -1,
    np.int64(-2),
    torch.tensor(-1),
    torch.tensor([1, 2]),
    torch.tensor(2.5),
    float("nan"),
    "3",
    None,
]


def test_update_and_allocate_takes_integral_scalars_as_peft():
    ours, pm = _ready(total_step=20)
    for step in ACCEPTED:  # masking steps 2..8 of the reduction phase, one type each
        pm.base_model.update_and_allocate(step)  # PEFT takes it
        ours.update_and_allocate(step)
        assert ours.rankallocator.last_step == int(step) and type(ours.rankallocator.last_step) is int
        assert ours.rank_pattern == pm.peft_config["default"].rank_pattern, repr(step)


def test_update_and_allocate_rejects_non_integral_steps():
    ours, _ = _ready()
    for bad in REJECTED:
        with pytest.raises(ValueError, match="global_step"):
            ours.update_and_allocate(bad)
        assert ours.rankallocator.m1 is None and ours.rankallocator.last_step is None, f"{bad!r}: nothing changed"


def _snapshot(model):
    a = model.rankallocator
    E = [m.lora_E["default"].detach().clone() for _, m in model.adapted_layers()]
    return a.m1.clone(), a.m2.clone(), E, a.last_step, model.rank_pattern


@pytest.mark.parametrize("second", [3, 2], ids=["same-step", "backwards"])
def test_repeated_or_backward_step_raises_naming_both_steps_and_changes_nothing(second):
    ours, pm = _ready()
    ours.update_and_allocate(3)
    pm.base_model.update_and_allocate(3)
    before = _snapshot(ours)
    with pytest.raises(RuntimeError) as ei:
        ours.update_and_allocate(second)
    msg = str(ei.value)
    assert f"global_step={second}" in msg and "previous step 3" in msg, msg
    after = _snapshot(ours)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert before[3:] == after[3:]
    # PEFT accepts the call and updates its importance averages a second time
    ipt = {k: v.clone() for k, v in pm.base_model.rankallocator.exp_avg_ipt.items()}
    pm.base_model.update_and_allocate(second)
    assert any(not torch.equal(v, pm.base_model.rankallocator.exp_avg_ipt[k]) for k, v in ipt.items())
    ours.update_and_allocate(4)  # the next step is fine
    assert ours.rankallocator.last_step == 4


def test_last_step_travels_with_the_allocator_state(tmp_path):
    ours, _ = _pair()
    opt = _opt(ours)
    for s in range(4):
        _step(ours, opt, s, lambda: ours.update_and_allocate(s))
    sd = ours.rankallocator.state_dict()
    assert int(sd["last_step"]) == 3
    fresh, _ = _ready()
    fresh.rankallocator.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="previous step 3"):
        fresh.update_and_allocate(3)
    ours.save_pretrained(str(tmp_path), save_allocator_state=True)
    resumed = af.AdaLoraModel.from_pretrained(_llama(), str(tmp_path), is_trainable=True)
    assert resumed.rankallocator.last_step == 3
    resumed.train()
    resumed(input_ids=_ids(4), labels=_ids(4)).loss.backward()
    with pytest.raises(RuntimeError, match="goes back from the previous step 3"):
        resumed.update_and_allocate(1)
    resumed.update_and_allocate(4)
    # a state written before last_step existed loads, and the order is checked from then on
    old = {k: v for k, v in sd.items() if k != "last_step"}
    fresh2 = af.get_peft_model(_llama(), af.AdaLoraConfig(**SCHEDULE))
    fresh2.rankallocator.load_state_dict(old)
    assert fresh2.rankallocator.last_step is None
