"""AdaLoraConfig validation and target-module selection, compared with PEFT where PEFT defines it."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import adalora_fast as af
from adalora_fast.layer import AdaLoraLinear
from tiny_models import tiny_gpt2, tiny_llama

BASE = dict(total_step=100, target_modules=["q_proj"])


@pytest.mark.parametrize(
    "field,value,extra",
    [
        ("total_step", None, {}),
        ("total_step", 0, {}),
        ("total_step", -5, {}),
        ("tinit", 90, {"tfinal": 10}),  # tinit == total_step - tfinal
        ("tinit", 95, {"tfinal": 10}),  # tinit > total_step - tfinal
        ("orth_reg_weight", -0.1, {}),
        ("target_r", 13, {"init_r": 12}),
        ("beta1", 0.0, {}),
        ("beta1", 1.0, {}),
        ("beta1", 1.5, {}),
        ("beta2", -0.2, {}),
        ("beta2", 1.0, {}),
        ("deltaT", 0, {}),
        ("init_r", 0, {"target_r": 0}),
        ("lora_dropout", 1.0, {}),
        ("lora_dropout", 1.7, {}),
        ("lora_dropout", -0.1, {}),
        ("bias", "some", {}),
    ],
)
def test_bad_value_raises_naming_field_and_value(field, value, extra):
    kw = dict(BASE)
    kw.update(extra)
    kw[field] = value
    with pytest.raises(ValueError) as ei:
        af.AdaLoraConfig(**kw)
    msg = str(ei.value)
    assert field in msg, msg
    assert repr(value) in msg, msg


def test_valid_config_and_defaults_match_peft():
    ours = af.AdaLoraConfig(total_step=100)
    theirs = peft.AdaLoraConfig(total_step=100)
    for f in (
        "target_r",
        "init_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "r",
        "init_lora_weights",
    ):
        assert getattr(ours, f) == getattr(theirs, f), f


def test_warns_when_r_is_not_8():
    with pytest.warns(UserWarning, match="init_r"):
        af.AdaLoraConfig(total_step=10, r=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        af.AdaLoraConfig(total_step=10, r=8)


# ----------------------------------------------------------------------------- target selection vs PEFT
def _llama():
    return tiny_llama(max_position_embeddings=64)


def _gpt2():
    return tiny_gpt2()


def _peft_adapted(make, **cfg):
    pm = peft.get_peft_model(make(), peft.AdaLoraConfig(total_step=10, **cfg))
    from peft.tuners.adalora.layer import AdaLoraLayer

    return {n for n, m in pm.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)}


def _ours_adapted(make, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = af.get_peft_model(make(), af.AdaLoraConfig(total_step=10, **cfg))
    names = {n for n, _ in m.adapted_layers()}
    assert all(isinstance(m.model.get_submodule(n), AdaLoraLinear) for n in names)
    return names


@pytest.mark.parametrize(
    "make,cfg",
    [
        (_llama, dict(target_modules=["q_proj", "v_proj"])),
        (_llama, dict(target_modules=["gate_proj", "model.layers.1.self_attn.o_proj"])),
        (_llama, dict(target_modules=r".*\.(q|k)_proj")),
        (_llama, dict(target_modules=r"model\.layers\.1\.mlp\.(gate|down)_proj")),
        (_llama, dict(target_modules="all-linear")),
        (
            _llama,
            dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
        ),
        (_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["down_proj"])),
        (_llama, dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*")),
        (_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
        (_llama, dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers")),
        # a full module name in target_modules is taken as is: PEFT applies layers_to_transform to suffixes only
        (_llama, dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])),
        (_llama, dict()),  # default targets for model_type llama
        (_gpt2, dict(target_modules=["c_attn", "c_fc"])),
        (_gpt2, dict(target_modules="all-linear")),
        (_gpt2, dict()),
    ],
    ids=lambda v: v.__name__ if callable(v) else repr(v)[:60],
)
def test_target_and_exclude_modules_select_what_peft_selects(make, cfg):
    theirs = _peft_adapted(make, **cfg)
    ours = _ours_adapted(make, **cfg)
    assert theirs, "the case must adapt something"
    assert ours == theirs


def test_get_peft_model_accepts_peft_config():
    pc = peft.AdaLoraConfig(
        total_step=50,
        init_r=6,
        target_r=3,
        tinit=5,
        tfinal=10,
        deltaT=2,
        beta1=0.8,
        beta2=0.9,
        lora_alpha=16,
        orth_reg_weight=0.3,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = af.get_peft_model(_llama(), pc)
    c = m.peft_config["default"]
    assert isinstance(c, af.AdaLoraConfig)
    for f in (
        "total_step",
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "lora_alpha",
        "orth_reg_weight",
    ):
        assert getattr(c, f) == getattr(pc, f), f
    assert c.task_type == "CAUSAL_LM"
    assert {n for n, _ in m.adapted_layers()} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    for _, layer in m.adapted_layers():
        assert layer.r["default"] == 6 and layer.scaling["default"] == 16


def test_target_matching_nothing_raises():
    with pytest.raises(ValueError, match="matched no"):
        af.get_peft_model(_llama(), af.AdaLoraConfig(total_step=10, target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="matched no"):
        af.get_peft_model(_llama(), af.AdaLoraConfig(total_step=10, target_modules=r".*\.nothing"))


@pytest.mark.parametrize("targets", [["embed_tokens"], ["q_proj", "embed_tokens"], r"model\.embed_tokens", ["norm"]])
def test_non_linear_target_raises(targets):
    with pytest.raises(ValueError) as ei:
        af.get_peft_model(_llama(), af.AdaLoraConfig(total_step=10, target_modules=targets))
    msg = str(ei.value)
    assert "Linear" in msg or "matched no" in msg


def test_no_default_targets_for_unknown_model_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules"):
        af.get_peft_model(model, af.AdaLoraConfig(total_step=10))


def test_config_dict_round_trip():
    c = af.AdaLoraConfig(
        total_step=77, init_r=5, target_r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    d = c.to_dict()
    assert d["peft_type"] == "ADALORA" and d["target_modules"] == ["q_proj", "v_proj"]
    c2 = af.AdaLoraConfig.from_dict(d)
    assert (c2.total_step, c2.init_r, c2.target_r, c2.target_modules) == (77, 5, 2, {"q_proj", "v_proj"})
    with pytest.raises(ValueError, match="peft_type"):
        af.AdaLoraConfig.from_dict({**d, "peft_type": "LORA"})
