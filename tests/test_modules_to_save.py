"""modules_to_save and the task types' default heads (SEQ_CLS: "classifier"/"score"), against
peft 0.21.2: a frozen original plus a trainable copy, PEFT's state-dict and checkpoint keys, both
ways; merge_and_unload/unload put the trained copy in place; disable_adapter uses the original.
Tiny BertForSequenceClassification (head "classifier") and LlamaForSequenceClassification ("score")."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaForSequenceClassification

import adalora_fast as af
from tiny_models import tiny_llama

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=6, lora_alpha=8)


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def _llama():
    return tiny_llama(
        cls=LlamaForSequenceClassification, max_position_embeddings=64, num_labels=2, pad_token_id=0
    ).eval()


MODELS = {"bert": (_bert, ["query", "value"], "classifier", 3), "llama": (_llama, ["q_proj", "v_proj"], "score", 2)}


def _config(source, kind, **over):
    kw = dict(SCHEDULE, target_modules=MODELS[kind][1], task_type="SEQ_CLS")
    kw.update(over)
    return af.AdaLoraConfig(**kw) if source == "ours" else peft.AdaLoraConfig(**kw)


def _pair(kind, source="ours", **over):
    """Ours (config from ``source``) and PEFT on the same base weights, adapters copied from PEFT."""
    make = MODELS[kind][0]
    ours = af.get_peft_model(make(), _config(source, kind, **over))
    pm = peft.get_peft_model(make(), _config("peft", kind, **over))
    ours.load_state_dict(pm.base_model.state_dict())  # same keys, the wrapped head included
    return ours, pm


def _batch(seed, kind, n=4, t=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (n, t), generator=g), torch.randint(0, MODELS[kind][3], (n,), generator=g)


@torch.no_grad()
def _logits(model, kind):
    model.eval()
    return model(input_ids=_batch(99, kind, n=5)[0]).logits


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _head(model, kind):
    return getattr(model.get_base_model(), MODELS[kind][2])


def _train_pair(ours, pm, kind, steps=range(6)):
    """The same steps on both (warm-up, masking, final mask at 4, frozen at 5): losses and patterns must agree."""
    oo = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    op = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for s in steps:
        ids, labels = _batch(s, kind)
        losses = []
        for m, opt, upd in ((pm, op, pm.base_model.update_and_allocate), (ours, oo, ours.update_and_allocate)):
            m.train()
            loss = m(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            upd(s)
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6, msg=f"step {s}")
        assert ours.peft_config["default"].rank_pattern == pm.peft_config["default"].rank_pattern, f"step {s}"


# ----------------------------------------------------------------------------- wrapping
@pytest.mark.parametrize("source", ["ours", "peft"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_task_head_is_a_trainable_copy_as_in_peft(kind, source, capsys):
    ours, pm = _pair(kind, source)
    head_name = MODELS[kind][2]
    w = _head(ours, kind)
    assert isinstance(w, af.ModulesToSaveWrapper)
    assert type(w.original_module) is type(w.modules_to_save["default"]) is nn.Linear
    assert w.modules_to_save["default"] is not w.original_module
    assert (
        ours.peft_config["default"].modules_to_save
        == pm.peft_config["default"].modules_to_save
        == ["classifier", "score"]
    )
    assert ours.modules_to_save == pm.modules_to_save == {"classifier", "score"}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in pm.base_model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        n for n, _ in w.modules_to_save.named_parameters(prefix=f"model.{head_name}.modules_to_save")
    }
    assert not any(p.requires_grad for p in w.original_module.parameters())
    assert list(ours.state_dict()) == list(pm.base_model.state_dict())
    assert ours.targeted_module_names == pm.base_model.targeted_module_names  # the head is not adapted
    assert ours.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    capsys.readouterr()
    ours.print_trainable_parameters()
    pm.print_trainable_parameters()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1]
    # attributes of the head are read through the wrapper, as PEFT's wrapper does
    assert w.weight is w.modules_to_save["default"].weight and w.out_features == MODELS[kind][3]


# ----------------------------------------------------------------------------- training and checkpoints
@pytest.mark.parametrize("source", ["ours", "peft"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_trained_head_saves_and_loads_both_ways_with_peft(kind, source, tmp_path):
    ours, pm = _pair(kind, source)
    head0 = _head(ours, kind).original_module.weight.detach().clone()
    _train_pair(ours, pm, kind)
    expect = _logits(ours, kind)
    _close(_logits(pm, kind), expect)
    head = _head(ours, kind)
    assert not torch.equal(head.modules_to_save["default"].weight, head0), "the copy was trained"
    assert torch.equal(head.original_module.weight, head0), "the original was not"
    ours.save_pretrained(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "peft"))
    t_ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    t_peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(t_ours) == set(t_peft)
    head_keys = {k for k in t_peft if "lora_" not in k}
    assert head_keys == {
        f"base_model.model.{MODELS[kind][2]}.{k}" for k in head.modules_to_save["default"].state_dict()
    }
    for k in t_peft:
        torch.testing.assert_close(t_ours[k], t_peft[k], rtol=1e-5, atol=1e-6, msg=k)
    c_ours = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    c_peft = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    for f in ("task_type", "modules_to_save", "peft_type", "rank_pattern"):
        assert c_ours[f] == c_peft[f], f
    make = MODELS[kind][0]
    # ours -> PEFT
    loaded = peft.PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    _close(_logits(loaded, kind), expect)
    # PEFT -> ours (this raised "modules_to_save ... is not supported" before)
    mine = af.AdaLoraModel.from_pretrained(make(), str(tmp_path / "peft"))
    _close(_logits(mine, kind), expect)
    assert not any(p.requires_grad for p in mine.parameters()), "inference mode, as PEFT's from_pretrained"
    head_key = f"base_model.model.{MODELS[kind][2]}.weight"
    assert torch.equal(_head(mine, kind).modules_to_save["default"].weight, t_peft[head_key])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_merge_and_unload_and_unload_put_the_trained_copy_in_place(kind):
    ours, pm = _pair(kind)
    _train_pair(ours, pm, kind, steps=range(3))
    expect = _logits(ours, kind)
    copy_w = _head(ours, kind).modules_to_save["default"].weight
    merged = ours.merge_and_unload()
    merged_peft = pm.merge_and_unload()
    head = getattr(merged, MODELS[kind][2])
    assert type(head) is nn.Linear and head.weight is copy_w
    assert type(getattr(merged_peft, MODELS[kind][2])) is nn.Linear
    assert not any(isinstance(m, af.ModulesToSaveWrapper) for m in merged.modules())
    _close(_logits(merged, kind), expect)
    _close(_logits(merged_peft, kind), expect)
    # unload: no merge, but the copy replaces the original (PEFT does the same)
    ours, pm = _pair(kind)
    _train_pair(ours, pm, kind, steps=range(2))
    copy_w = _head(ours, kind).modules_to_save["default"].weight
    u, u_peft = ours.unload(), pm.unload()
    assert getattr(u, MODELS[kind][2]).weight is copy_w
    _close(_logits(u, kind), _logits(u_peft, kind))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_disable_adapter_runs_the_original_head(kind):
    ours, pm = _pair(kind)
    _train_pair(ours, pm, kind, steps=range(2))
    adapted = _logits(ours, kind)
    base = _logits(MODELS[kind][0](), kind)
    assert not torch.allclose(adapted, base, atol=1e-4)
    copy_params = list(_head(ours, kind).modules_to_save.parameters())
    with ours.disable_adapter():
        _close(_logits(ours, kind), base)
        assert not any(p.requires_grad for p in copy_params), "frozen inside the context, as PEFT"
        with pm.disable_adapter():
            _close(_logits(pm, kind), base)
    assert all(p.requires_grad for p in copy_params)
    _close(_logits(ours, kind), adapted)


# ----------------------------------------------------------------------------- other modules and options
def test_user_modules_to_save_join_the_task_defaults_as_in_peft(tmp_path):
    ours, pm = _pair("bert", modules_to_save=["pooler"])
    assert ours.modules_to_save == pm.modules_to_save == {"pooler", "classifier", "score"}
    assert isinstance(ours.model.bert.pooler, af.ModulesToSaveWrapper)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in pm.base_model.named_parameters() if p.requires_grad
    }
    _train_pair(ours, pm, "bert", steps=range(2))
    expect = _logits(ours, "bert")
    ours.save_pretrained(str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert {"base_model.model.bert.pooler.dense.weight", "base_model.model.classifier.weight"} <= keys
    _close(_logits(peft.PeftModel.from_pretrained(_bert(), str(tmp_path)), "bert"), expect)
    _close(_logits(af.AdaLoraModel.from_pretrained(_bert(), str(tmp_path)), "bert"), expect)


def test_user_modules_to_save_on_a_causal_lm(tmp_path):
    def make():
        return tiny_llama().eval()

    kw = dict(SCHEDULE, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", modules_to_save=["lm_head"])
    ours = af.get_peft_model(make(), af.AdaLoraConfig(**kw))
    pm = peft.get_peft_model(make(), peft.AdaLoraConfig(**kw))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in pm.base_model.named_parameters() if p.requires_grad
    }
    with torch.no_grad():
        ours.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = ours(input_ids=ids).logits
    ours.save_pretrained(str(tmp_path))
    assert "base_model.model.lm_head.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    with torch.no_grad():
        _close(peft.PeftModel.from_pretrained(make(), str(tmp_path))(input_ids=ids).logits, expect)


def test_a_module_to_save_is_never_adapted_as_in_peft():
    ours, pm = _pair("bert", target_modules=["query", "value", "classifier"])
    assert ours.targeted_module_names == pm.base_model.targeted_module_names
    assert not any("classifier" in n for n in ours.targeted_module_names)
    assert isinstance(ours.model.classifier, af.ModulesToSaveWrapper)


def test_names_that_match_nothing_warn():
    with pytest.warns(UserWarning, match="nope"):
        af.get_peft_model(_bert(), _config("ours", "bert", modules_to_save=["nope"]))
    # a SEQ_CLS config on a model with neither "classifier" nor "score": PEFT leaves the head frozen silently
    with pytest.warns(UserWarning, match="task_type='SEQ_CLS'"):
        af.get_peft_model(tiny_llama(None, num_hidden_layers=1), _config("ours", "llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "score" is absent from BERT, but "classifier" matched: no warning
        af.get_peft_model(_bert(), _config("ours", "bert"))


def test_bad_modules_to_save_raise_naming_the_field():
    with pytest.raises(ValueError, match="modules_to_save"):
        af.AdaLoraConfig(total_step=10, modules_to_save="classifier")
    with pytest.raises(ValueError, match="modules_to_save"):  # part of an adapted layer
        af.get_peft_model(_bert(), _config("ours", "bert", modules_to_save=["base_layer"]))


def test_bias_all_with_a_head_writes_peft_keys_and_loads_both_ways(tmp_path):
    ours, pm = _pair("bert", bias="all")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in pm.base_model.named_parameters() if p.requires_grad
    }
    _train_pair(ours, pm, "bert", steps=range(3))
    expect = _logits(ours, "bert")
    ours.save_pretrained(str(tmp_path / "ours"))
    pm.save_pretrained(str(tmp_path / "peft"))
    t_ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    t_peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(t_ours) == set(t_peft)
    _close(_logits(peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "ours")), "bert"), expect)
    _close(_logits(af.AdaLoraModel.from_pretrained(_bert(), str(tmp_path / "peft")), "bert"), expect)


def test_resume_from_save_pretrained_restores_the_trained_head(tmp_path):
    ours, pm = _pair("llama")
    _train_pair(ours, pm, "llama", steps=range(3))
    ours.save_pretrained(str(tmp_path), save_allocator_state=True)
    resumed = af.AdaLoraModel.from_pretrained(_llama(), str(tmp_path), is_trainable=True)
    _close(_logits(resumed, "llama"), _logits(ours, "llama"))
    head = _head(resumed, "llama").modules_to_save["default"]
    assert torch.equal(head.weight, _head(ours, "llama").modules_to_save["default"].weight)
    assert head.weight.requires_grad and not _head(resumed, "llama").original_module.weight.requires_grad
    assert resumed.rankallocator.last_step == 2


def test_disable_adapter_leaves_a_model_loaded_for_inference_frozen(tmp_path):
    ours, pm = _pair("bert")
    ours.save_pretrained(str(tmp_path))
    mine = af.AdaLoraModel.from_pretrained(_bert(), str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(_bert(), str(tmp_path))
    for m in (mine, theirs):
        assert not any(p.requires_grad for p in m.parameters())
        with m.disable_adapter():
            pass
    assert not any(p.requires_grad for p in mine.parameters())
    # PEFT re-enables gradients on every adapter tensor and the head copy when the context exits
    assert any(p.requires_grad for p in theirs.parameters())
    # and PEFT appends its task defaults again at each load; ours keeps each name once
    assert theirs.peft_config["default"].modules_to_save == ["classifier", "score"] * 2
    assert mine.peft_config["default"].modules_to_save == ["classifier", "score"]
