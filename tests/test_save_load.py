"""Checkpoints in PEFT's format, both ways, on a tiny Llama (nn.Linear) and a tiny GPT-2 (Conv1D)."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import adalora_fast as af
from adalora_fast.layer import AdaLoraLinear
from tiny_models import tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def _llama():
    return tiny_llama(max_position_embeddings=64).eval()


def _gpt2():
    return tiny_gpt2(dropout=0.0).eval()


MODELS = {"llama": (_llama, ["q_proj", "v_proj"]), "gpt2": (_gpt2, ["c_attn"])}
SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=2, total_step=6, deltaT=1, lora_alpha=8)


def _ids(seed, n=2, t=8):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def _ours(kind, **over):
    make, targets = MODELS[kind]
    kw = dict(SCHEDULE, target_modules=targets, task_type="CAUSAL_LM")
    kw.update(over)
    return af.get_peft_model(make(), af.AdaLoraConfig(**kw))


def _peft(kind, **over):
    make, targets = MODELS[kind]
    kw = dict(SCHEDULE, target_modules=targets, task_type="CAUSAL_LM")
    kw.update(over)
    return peft.get_peft_model(make(), peft.AdaLoraConfig(**kw))


def _train(model, steps, update, opt=None, lr=1e-2):
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in steps:
        ids = _ids(100 + s)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        update(s)
        opt.zero_grad()
    model.eval()
    return opt


def _train_ours(model, steps, opt=None, lr=1e-2):
    return _train(model, steps, model.update_and_allocate, opt, lr)


def _train_peft(pm, steps):
    return _train(pm, steps, pm.base_model.update_and_allocate)


@torch.no_grad()
def _logits(model, seed=7):
    model.eval()
    return model(input_ids=_ids(seed, 3, 10)).logits


def _assert_logits_equal(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _pruned(rank_pattern):
    return sum(len(v) - sum(v) for v in rank_pattern.values())


# ----------------------------------------------------------------------------- ours -> PEFT
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_ours_load_with_peft(kind, tmp_path):
    ours = _ours(kind)
    _train_ours(ours, range(1, 6))  # warm-up, budgeting, final at step 4, frozen mask at 5
    rp = ours.rank_pattern
    assert rp is not None and _pruned(rp) > 0
    expect = _logits(ours)
    assert not torch.allclose(expect, _logits(MODELS[kind][0]()), atol=1e-4), "training changed the adapter"
    ours.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(MODELS[kind][0](), str(tmp_path))
    _assert_logits_equal(_logits(loaded), expect)
    # PEFT resized its layers by the saved pattern
    from peft.tuners.adalora.layer import AdaLoraLayer

    for name, m in loaded.base_model.model.named_modules():
        if isinstance(m, AdaLoraLayer):
            keep = rp[f"{name}.lora_E.default"]
            assert m.lora_A["default"].shape[0] == sum(keep)


# ----------------------------------------------------------------------------- PEFT -> ours
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("with_pattern", [True, False])
def test_save_peft_load_ours(kind, with_pattern, tmp_path):
    pm = _peft(kind)
    if with_pattern:
        _train_peft(pm, range(1, 6))
        assert pm.peft_config["default"].rank_pattern is not None
    else:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        assert pm.peft_config["default"].rank_pattern is None
    expect = _logits(pm)
    pm.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg.get("rank_pattern") is not None) == with_pattern
    ours = af.AdaLoraModel.from_pretrained(MODELS[kind][0](), str(tmp_path))
    _assert_logits_equal(_logits(ours), expect)
    if with_pattern:
        for name, m in ours.adapted_layers():
            keep = cfg["rank_pattern"][f"{name}.lora_E"]
            assert m.r["default"] == sum(keep)
            assert m.ranknum["default"].item() == SCHEDULE["init_r"], "ranknum keeps init_r (PEFT's scaling)"


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_saved_files_have_peft_keys_shapes_and_values(kind, tmp_path):
    ours = _ours(kind)
    _train_ours(ours, range(1, 4))  # stop in the budgeting phase: a pattern exists, not final
    rp = ours.rank_pattern
    assert rp is not None and _pruned(rp) > 0
    pm = _peft(kind)
    pm.base_model.load_state_dict(ours.state_dict())
    pm.peft_config["default"].rank_pattern = {k: list(v) for k, v in rp.items()}
    _assert_logits_equal(_logits(pm), _logits(ours))
    # same loss (orthogonal penalty included) in train mode
    ids = _ids(11)
    ours.train(), pm.train()
    lo, lp = ours(input_ids=ids, labels=ids).loss, pm(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
    ours.eval(), pm.eval()
    d_ours, d_peft = tmp_path / "ours", tmp_path / "peft"
    ours.save_pretrained(str(d_ours))
    pm.save_pretrained(str(d_peft))
    t_ours = load_file(str(d_ours / "adapter_model.safetensors"))
    t_peft = load_file(str(d_peft / "adapter_model.safetensors"))
    assert set(t_ours) == set(t_peft)
    assert not any("ranknum" in k for k in t_ours)
    for k in t_peft:
        assert t_ours[k].shape == t_peft[k].shape, k
        assert t_ours[k].dtype == t_peft[k].dtype, k
        torch.testing.assert_close(t_ours[k], t_peft[k], rtol=0, atol=0, msg=k)
    layers = dict(ours.adapted_layers())
    for name, layer in layers.items():
        r = sum(rp[f"{name}.lora_E.default"])
        pre = f"base_model.model.{name}"
        assert t_ours[f"{pre}.lora_A"].shape == (r, layer.in_features)
        assert t_ours[f"{pre}.lora_B"].shape == (layer.out_features, r)
        assert t_ours[f"{pre}.lora_E"].shape == (r, 1)
    c_ours = json.load(open(d_ours / "adapter_config.json"))
    c_peft = json.load(open(d_peft / "adapter_config.json"))
    assert c_ours["rank_pattern"] == c_peft["rank_pattern"]
    for f in (
        "peft_type",
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "total_step",
        "deltaT",
        "lora_alpha",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "fan_in_fan_out",
        "task_type",
        "bias",
    ):
        assert c_ours[f] == c_peft[f], f
    assert sorted(c_ours["target_modules"]) == sorted(c_peft["target_modules"])


# ----------------------------------------------------------------------------- allocator state
def _alloc_round_trip(tmp_path, stop, total):
    """Train to ``stop`` with SGD, save with the allocator state, reload trainable, continue to ``total``.

    Returns the rank patterns and logits of the uninterrupted and of the resumed run after each later step.
    """
    kind = "llama"
    cfg = dict(tinit=2, tfinal=2, total_step=8)
    full = _ours(kind, **cfg)
    opt = torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.05)
    _train_ours(full, range(1, stop + 1), opt)
    full.save_pretrained(str(tmp_path), save_allocator_state=True)
    assert os.path.isfile(tmp_path / "adalora_allocator_state.safetensors")
    resumed = af.AdaLoraModel.from_pretrained(MODELS[kind][0](), str(tmp_path), is_trainable=True)
    a, b = full.rankallocator, resumed.rankallocator
    assert torch.equal(a.m1, b.m1) and torch.equal(a.m2, b.m2)
    assert resumed.rank_pattern == full.rank_pattern
    _assert_logits_equal(_logits(resumed), _logits(full))
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    for s in range(stop + 1, total + 1):
        _train_ours(full, [s], opt)
        _train_ours(resumed, [s], opt2)
        assert resumed.rank_pattern == full.rank_pattern, f"step {s}"
        _assert_logits_equal(_logits(resumed), _logits(full))


def test_allocator_state_round_trip_during_warmup(tmp_path):
    _alloc_round_trip(tmp_path, stop=2, total=8)


def test_allocator_state_round_trip_after_a_masking_step(tmp_path):
    # Saved in the budgeting phase (a rank pattern exists): resuming must continue the same run.
    _alloc_round_trip(tmp_path, stop=4, total=8)


# ----------------------------------------------------------------------------- merge, disable, counts
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_matches_adapted_logits(kind):
    ours = _ours(kind)
    _train_ours(ours, range(1, 6))
    expect = _logits(ours)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, AdaLoraLinear) for m in merged.modules())
    assert type(merged) is type(MODELS[kind][0]())
    _assert_logits_equal(_logits(merged), expect)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disable_adapter_gives_base_logits(kind):
    ours = _ours(kind)
    _train_ours(ours, range(1, 4))
    adapted = _logits(ours)
    base = _logits(MODELS[kind][0]())
    assert not torch.allclose(adapted, base, atol=1e-4)
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours), base, rtol=0, atol=1e-6)
    _assert_logits_equal(_logits(ours), adapted)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_print_trainable_parameters_matches_peft(kind, capsys):
    ours = _ours(kind)
    pm = _peft(kind)
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    capsys.readouterr()
    ours.print_trainable_parameters()
    out_ours = capsys.readouterr().out
    pm.print_trainable_parameters()
    out_peft = capsys.readouterr().out
    assert out_ours.strip() and out_ours == out_peft


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_bias_checkpoints_match_peft(bias, tmp_path):
    """GPT-2's Conv1D layers have biases: with bias='all'/'lora_only' they are trained and saved."""
    ours = _ours("gpt2", bias=bias)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    pm = _peft("gpt2", bias=bias)
    assert trainable == {n for n, p in pm.base_model.named_parameters() if p.requires_grad}
    _train_ours(ours, range(1, 4))
    pm.base_model.load_state_dict(ours.state_dict())
    pm.peft_config["default"].rank_pattern = {k: list(v) for k, v in ours.rank_pattern.items()}
    expect = _logits(ours)
    _assert_logits_equal(_logits(pm), expect)
    ours.save_pretrained(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "peft"))
    t_ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    t_peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any(k.endswith("bias") for k in t_peft)
    assert set(t_ours) == set(t_peft), (
        f"only ours: {sorted(set(t_ours) - set(t_peft))}, only PEFT: {sorted(set(t_peft) - set(t_ours))}"
    )
    for k in t_peft:
        torch.testing.assert_close(t_ours[k], t_peft[k], rtol=0, atol=0, msg=k)
    # each side loads the other's checkpoint to the same logits
    _assert_logits_equal(_logits(af.AdaLoraModel.from_pretrained(_gpt2(), str(tmp_path / "peft"))), expect)
    _assert_logits_equal(_logits(peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "ours"))), expect)
