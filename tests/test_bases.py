"""Every base layer kind PEFT's AdaLoRA adapts, each against PEFT in the same setting.

bitsandbytes 4-bit (a model mixing 4-bit and plain linear targets) and 8-bit on the CPU, Conv2d,
a custom ``nn.Linear`` subclass (Falcon's): the same seed gives PEFT's initial adapters; forward and
every adapter gradient; a schedule through masking and the final phase (losses, rank pattern at
every step); save ours and load with PEFT, and the other way; ``merge_and_unload`` (quantized
bases: dequantize, add, quantize again, as PEFT's LoRA does it, since PEFT's AdaLoRA cannot merge
them). Also: what an adapted layer exposes (T5 reads ``wo.weight.dtype``), PEFT's target-module
defaults (the whole table, compared with PEFT's), and the clear errors for what is not adapted.
"""

from __future__ import annotations

import copy
import logging
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adalora_fast as af
from adalora_fast import bases, targets
from adalora_fast.layer import AdaLoraLinear
from tiny_models import tiny_llama
from tolerances import assert_close

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" per 8-bit call

SCHEDULE = dict(init_r=6, target_r=3, tinit=3, tfinal=5, deltaT=2, total_step=16, beta1=0.85, beta2=0.85)
# the 4-bit model keeps v_proj and lm_head in fp32 (llm_int8_skip_modules): q_proj and down_proj are
# Linear4bit, v_proj a plain nn.Linear, all three in one budget
QUANT_TARGETS = ["q_proj", "v_proj", "down_proj"]
VOCAB = 96


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # hidden 64: bitsandbytes' CPU inference repacking of 4-bit weights needs in_features >= its block (64)
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0, hidden_size=64, intermediate_size=128, vocab_size=VOCAB).save_pretrained(d)
    return d


def load_quantized(path, bits: int):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=["v_proj", "lm_head"],
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.float32)


def tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    cfg = FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        new_decoder_architecture=False,
        multi_query=True,
        bias=True,
    )
    return FalconForCausalLM(cfg)


class Out:
    """A model output with a ``loss`` (both wrappers add the orthogonal penalty to it)."""

    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


class ConvNet(nn.Module):
    """Two Conv2d (one strided, one reflect-padded) and a linear head."""

    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, (3, 2), stride=2, padding=1, padding_mode=padding_mode, bias=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x, labels=None):
        h = self.conv2(F.relu(self.conv1(x)))
        logits = self.head(h.mean((2, 3)))
        return Out(logits, None if labels is None else F.cross_entropy(logits, labels))


CONV_TARGETS = ["conv1", "conv2", "head"]


def conv_net(padding_mode="zeros"):
    torch.manual_seed(0)
    return ConvNet(padding_mode)


def conv_batch(gen):
    return dict(x=torch.randn(4, 3, 8, 7, generator=gen), labels=torch.randint(0, 5, (4,), generator=gen))


def token_batch(gen):
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    return dict(input_ids=ids, labels=ids)


def make_pair(kind, llama_dir, seed=0, **over):
    """(PEFT's PeftModel, ours) on two equal base models of ``kind``, each wrapped after
    ``torch.manual_seed(seed)`` (so the same draws give the same adapters), and the batch maker.
    Train PEFT's through ``pm.base_model(**batch)``: its tuner's forward adds the orthogonal penalty
    for any model (PeftModel's skips it without a task type)."""
    if kind in ("4bit", "8bit"):
        b1, b2 = (load_quantized(llama_dir, int(kind[0])) for _ in range(2))
        tm, batch = QUANT_TARGETS, token_batch
    elif kind == "conv2d":
        b1 = conv_net()
        b2 = copy.deepcopy(b1)
        tm, batch = CONV_TARGETS, conv_batch
    else:  # falcon: FalconLinear, an nn.Linear subclass with its own forward
        b1 = tiny_falcon()
        b2 = copy.deepcopy(b1)
        tm, batch = ["query_key_value", "dense_4h_to_h"], token_batch
    kw = dict(SCHEDULE, target_modules=tm, lora_alpha=16, orth_reg_weight=0.5, **over)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(b1, peft.AdaLoraConfig(**kw))
    torch.manual_seed(seed)
    ours = af.get_peft_model(b2, af.AdaLoraConfig(**kw))
    return pm, ours, batch


def lora_params(model):
    """{name: parameter} of every adapter tensor of a wrapped model, by the base model's names."""
    inner = model.base_model.model
    return {n: p for n, p in inner.named_parameters() if "lora_" in n}


KINDS = ["4bit", "8bit", "conv2d", "falcon"]


# ---------------------------------------------------------------------------------- which layer, which path
def test_dispatch_by_exact_kind(llama_dir):
    m4, m8 = load_quantized(llama_dir, 4), load_quantized(llama_dir, 8)
    q4, v4, q8 = (
        m4.model.layers[0].self_attn.q_proj,
        m4.model.layers[0].self_attn.v_proj,
        m8.model.layers[0].self_attn.q_proj,
    )
    assert isinstance(q4, nn.Linear) and isinstance(q8, nn.Linear)  # why isinstance must not decide
    assert (bases.base_kind(q4), bases.base_kind(v4), bases.base_kind(q8)) == ("linear4bit", "linear", "linear8bitlt")
    assert type(bases.adapter_layer(q4)) is af.AdaLoraLinear4bit
    assert type(bases.adapter_layer(q8)) is af.AdaLoraLinear8bitLt
    assert bases.base_kind(nn.Conv2d(2, 3, 3)) == "conv2d"
    assert bases.base_kind(nn.MultiheadAttention(8, 2).out_proj) == "linear"  # NonDynamicallyQuantizableLinear
    assert bases.base_kind(tiny_falcon().transformer.h[0].self_attention.dense) == "linear_custom"
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    with pytest.raises(ValueError, match="Linear4bit"):  # the fused op's class refuses what is not a plain linear
        AdaLoraLinear(q.to("cpu"))
    # "all-linear" selects what PEFT's does on a 4-bit model (bitsandbytes layers included, lm_head not)
    pm = peft.get_peft_model(
        load_quantized(llama_dir, 4), peft.AdaLoraConfig(total_step=10, target_modules="all-linear")
    )
    ours = af.get_peft_model(m4, af.AdaLoraConfig(total_step=10, target_modules="all-linear"))
    assert sorted(ours.targeted_module_names) == sorted(pm.base_model.targeted_module_names)
    assert len(ours.targeted_module_names) == 14


class QuantLinear(nn.Module):
    """Stands in for a GPTQ layer (GPTQModel's and AutoGPTQ's are called QuantLinear and hold qweight)."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 16, 8
        self.register_buffer("qweight", torch.zeros(2, 8, dtype=torch.int32))


class Int8Weights(nn.Linear):
    def __init__(self):
        super().__init__(4, 4)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize(
    "module,words",
    [
        (QuantLinear(), ["QuantLinear", "GPTQ", "pip install bitsandbytes"]),
        (nn.Conv2d(4, 4, 3, groups=2), ["Conv2d", "groups=2"]),
        (Int8Weights(), ["Int8Weights", "subclasses torch.nn.Linear", "torch.int8"]),
        (nn.Linear(4, 4).to(torch.float8_e4m3fn), ["torch.nn.modules.linear.Linear is a torch.nn.Linear", "float8"]),
        (nn.Embedding(10, 4), ["Embedding"]),
        (nn.Conv1d(2, 2, 3), ["Conv1d"]),
    ],
    ids=["gptq", "grouped-conv2d", "int8-linear-subclass", "float8-linear", "embedding", "conv1d"],
)
def test_unsupported_layers_raise_naming_their_type(module, words):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.target = module
            self.other = nn.Linear(4, 4)

    with pytest.raises(ValueError) as err:
        af.get_peft_model(Holder(), af.AdaLoraConfig(total_step=10, target_modules=["target"]))
    for w in words:
        assert w in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------- what a layer exposes
@pytest.mark.parametrize("kind", KINDS)
def test_adapted_layer_exposes_the_base_attributes(kind, llama_dir):
    _, ours, _ = make_pair(kind, llama_dir)
    for _, m in ours.adapted_layers():
        base = m.base_layer
        assert m.get_base_layer() is base and m.weight is base.weight and m.bias is base.bias
        assert m.active_adapters == ["default"]
        if isinstance(base, nn.Conv2d):
            assert (m.in_features, m.out_features) == (base.in_channels, base.out_channels)
        else:
            assert (m.in_features, m.out_features) == (base.in_features, base.out_features)
        assert m.lora_A["default"].shape == (6, m.lora_in_features)


def test_t5_defaults_adapt_wo_whose_weight_the_model_reads():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_ff=48,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            decoder_start_token_id=0,
            dropout_rate=0.0,
        )
    )
    b2 = copy.deepcopy(base)
    kw = dict(init_r=4, target_r=2, total_step=10, lora_alpha=8)  # target_modules=None: PEFT's t5 default
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(task_type="SEQ_2_SEQ_LM", **kw))
    torch.manual_seed(1)
    ours = af.get_peft_model(b2, af.AdaLoraConfig(**kw))
    assert any(n.endswith("DenseReluDense.wo") for n in ours.targeted_module_names)
    assert sorted(ours.targeted_module_names) == sorted(pm.base_model.targeted_module_names)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    lp = pm(input_ids=ids, labels=ids).loss
    lo = ours(input_ids=ids, labels=ids).loss
    assert lo.item() == pytest.approx(lp.item(), rel=1e-6)


# ---------------------------------------------------------------------------------- target-module defaults
def test_default_target_table_is_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    assert targets.PEFT_ADALORA_TARGET_MODULES == PEFT_TABLE
    assert not set(targets.EXTRA_TARGET_MODULES) & set(PEFT_TABLE)
    assert targets.DEFAULT_TARGET_MODULES == {**PEFT_TABLE, **targets.EXTRA_TARGET_MODULES}


TINY = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=48,
    vocab_size=64,
    d_model=32,
    d_ff=48,
    num_layers=1,
    num_heads=2,
    n_embd=32,
    n_layer=1,
    n_head=2,
    ffn_dim=48,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    head_dim=16,
    d_kv=16,
    max_position_embeddings=64,
    n_positions=64,
    rotary_dim=8,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# every model type of PEFT's table that builds from a generic tiny config (the others are checked by the table test)
MODEL_TYPES = [
    "t5",
    "mt5",
    "bart",
    "gpt2",
    "bloom",
    "opt",
    "gptj",
    "gpt_neox",
    "llama",
    "bert",
    "roberta",
    "deberta-v2",
    "gpt_bigcode",
    "deberta",
    "gemma",
    "gemma2",
    "gemma3_text",
    "qwen2",
    "qwen3",
]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_default_targets_are_peft_s(model_type):
    """``target_modules=None``: PEFT's default for the model type, the same modules adapted, and
    the same forward (with non-zero E)."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **TINY)
    base = AutoModel.from_config(cfg).eval()
    b2 = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(init_r=2, target_r=1, total_step=10))
    ours = af.get_peft_model(b2, af.AdaLoraConfig(init_r=2, target_r=1, total_step=10))
    assert ours.targeted_module_names and sorted(ours.targeted_module_names) == sorted(
        pm.base_model.targeted_module_names
    )
    theirs, mine = lora_params(pm), lora_params(ours)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in mine:
            theirs[n].copy_(torch.randn(theirs[n].shape, generator=g) * 0.5)
            mine[n].copy_(theirs[n])
    ids = torch.randint(1, 64, (2, 6), generator=g)
    kw = dict(input_ids=ids, decoder_input_ids=ids) if cfg.is_encoder_decoder else dict(input_ids=ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(**kw)[0], pm(**kw)[0], rtol=1e-4, atol=1e-4)  # fused vs PEFT rounding


def test_regex_default_stays_a_regex():
    class Cfg:
        model_type = "gemma4"

        def to_dict(self):
            return {"model_type": "gemma4"}

    def block():
        return nn.ModuleDict({"self_attn": nn.ModuleDict({n: nn.Linear(4, 4) for n in ("q_proj", "k_proj", "v_proj")})})

    def model():
        m = nn.Module()
        m.config = Cfg()
        m.model = nn.ModuleDict(
            {
                "language_model": nn.ModuleDict({"layers": nn.ModuleList([block()])}),
                "vision_tower": nn.ModuleList([block()]),
            }
        )
        return m

    pm = peft.get_peft_model(model(), peft.AdaLoraConfig(init_r=2, target_r=1, total_step=10))
    ours = af.get_peft_model(model(), af.AdaLoraConfig(init_r=2, target_r=1, total_step=10))
    assert (
        sorted(ours.targeted_module_names)
        == sorted(pm.base_model.targeted_module_names)
        == ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.v_proj"]
    )


# ---------------------------------------------------------------------------------- init, forward, gradients
def test_init_is_peft_s_for_linear_conv1d_and_conv2d():
    from tiny_models import tiny_gpt2

    for make, tm in [
        (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
        (tiny_gpt2, ["c_attn", "c_fc"]),
        (conv_net, CONV_TARGETS),
    ]:
        b1, b2 = make(), make()
        kw = dict(init_r=5, target_r=2, total_step=10, target_modules=tm)
        torch.manual_seed(3)
        ours = af.get_peft_model(b2, af.AdaLoraConfig(**kw))
        after_ours = torch.randn(3)
        torch.manual_seed(3)
        pm = peft.get_peft_model(b1, peft.AdaLoraConfig(**kw))
        after_peft = torch.randn(3)
        theirs, mine = pm.base_model.state_dict(), ours.state_dict()
        keys = [k for k in mine if "lora_" in k or "ranknum" in k]
        assert keys and sorted(keys) == sorted(k for k in theirs if "lora_" in k or "ranknum" in k)
        for k in keys:
            assert torch.equal(mine[k], theirs[k]), k
        assert torch.equal(after_ours, after_peft)  # the same number of draws: the generator is where PEFT leaves it


@pytest.mark.parametrize("kind", KINDS)
def test_init_forward_and_gradients_match_peft(kind, llama_dir):
    pm, ours, batch = make_pair(kind, llama_dir)
    theirs, mine = lora_params(pm), lora_params(ours)
    assert sorted(mine) == sorted(theirs) and mine
    for n in mine:  # the same seed: PEFT's initial adapters
        assert torch.equal(mine[n], theirs[n]), n
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # non-zero E, so the adapters take part
        for n in mine:
            if "lora_E" in n:
                theirs[n].copy_(torch.randn(theirs[n].shape, generator=g))
                mine[n].copy_(theirs[n])
    pm.train(), ours.train()
    b = batch(torch.Generator().manual_seed(5))
    lp, lo = pm.base_model(**b).loss, ours(**b).loss
    assert lo.item() == pytest.approx(lp.item(), rel=1e-6)
    lp.backward()
    lo.backward()
    for n in mine:
        torch.testing.assert_close(mine[n].grad, theirs[n].grad, rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------- the schedule
@pytest.fixture(scope="module")
def schedules(llama_dir):
    """The whole schedule (warm-up, masking, final phase) beside PEFT, once per kind."""
    out = {}
    for kind in ("4bit", "8bit", "conv2d"):
        pm, ours, batch = make_pair(kind, llama_dir)
        pm.train(), ours.train()
        opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
        opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3)
        gen, history = torch.Generator().manual_seed(1), []
        for step in range(SCHEDULE["total_step"]):
            b = batch(gen)
            lp = pm.base_model(**b).loss
            lp.backward()
            opt_p.step()
            pm.base_model.update_and_allocate(step)
            opt_p.zero_grad()
            lo = ours(**b).loss
            lo.backward()
            opt_o.step()
            ours.update_and_allocate(step)
            opt_o.zero_grad()
            history.append(
                (lp.item(), lo.item(), copy.deepcopy(pm.peft_config["default"].rank_pattern), ours.rank_pattern)
            )
        out[kind] = (pm, ours, batch, history)
    return out


@pytest.mark.parametrize("kind", ["4bit", "8bit", "conv2d"])
def test_schedule_matches_peft(kind, schedules):
    pm, ours, _, history = schedules[kind]
    kinds = {type(m).__name__ for _, m in ours.adapted_layers()}
    expected = {
        "4bit": {"AdaLoraLinear4bit", "AdaLoraLinear"},
        "8bit": {"AdaLoraLinear8bitLt"},
        "conv2d": {"AdaLoraConv2d", "AdaLoraLinear"},
    }[kind]
    assert kinds == expected  # 4-bit: a model mixing 4-bit and plain linear targets in one budget
    masked = 0
    for step, (lp, lo, rp_peft, rp_ours) in enumerate(history):
        assert lo == pytest.approx(lp, rel=1e-5), f"step {step}"
        assert rp_ours == rp_peft, f"step {step}: rank_pattern"
        masked += rp_peft is not None
    assert masked >= SCHEDULE["total_step"] - SCHEDULE["tinit"] - 2
    final = history[-1][3]
    assert sum(map(sum, final.values())) == SCHEDULE["target_r"] * len(final)
    assert any(0 < sum(v) < SCHEDULE["init_r"] for v in final.values()), "expected an uneven allocation"
    theirs = lora_params(pm)
    for n, p in lora_params(ours).items():
        torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------- save and load
def fresh_base(kind, llama_dir):
    return load_quantized(llama_dir, int(kind[0])) if kind in ("4bit", "8bit") else conv_net()


def outputs(model, batch, train=False):
    model.train(train)
    with torch.no_grad():
        return model(**{k: v for k, v in batch(torch.Generator().manual_seed(9)).items() if k != "labels"}).logits


@pytest.mark.parametrize("kind", ["4bit", "8bit", "conv2d"])
def test_save_and_load_both_ways(kind, schedules, llama_dir, tmp_path):
    pm, ours, batch, _ = schedules[kind]
    ours.save_pretrained(tmp_path / "ours")
    loaded_by_peft = peft.PeftModel.from_pretrained(fresh_base(kind, llama_dir), tmp_path / "ours")
    torch.testing.assert_close(outputs(loaded_by_peft, batch), outputs(ours, batch), rtol=1e-5, atol=1e-6)
    pm.save_pretrained(tmp_path / "peft")  # resized by PEFT's own rank pattern
    loaded_by_ours = af.AdaLoraModel.from_pretrained(fresh_base(kind, llama_dir), str(tmp_path / "peft"))
    torch.testing.assert_close(outputs(loaded_by_ours, batch), outputs(pm, batch), rtol=1e-5, atol=1e-6)
    assert {n: m.r["default"] for n, m in loaded_by_ours.adapted_layers()} == {
        n: sum(keep) for n, keep in _by_module(pm.peft_config["default"].rank_pattern).items()
    }


def _by_module(rank_pattern):
    return {k.rsplit(".lora_E", 1)[0]: v for k, v in rank_pattern.items()}


# ---------------------------------------------------------------------------------- merging
def _delta_as_lora(kind, llama_dir, ours):
    """A PEFT LoRA model on a fresh base whose delta is each of our layers' B diag(E) A * s, merged by PEFT."""
    base = fresh_base(kind, llama_dir)
    tm = QUANT_TARGETS if kind in ("4bit", "8bit") else CONV_TARGETS
    r = SCHEDULE["init_r"]
    lm = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=r, target_modules=tm))
    with torch.no_grad():
        for name, m in ours.adapted_layers():
            target = lm.base_model.model.get_submodule(name)
            A, E, B = m.lora_A["default"], m.lora_E["default"], m.lora_B["default"]
            s = m.scaling["default"] / (m.ranknum["default"] + 1e-5)
            a_w, b_w = target.lora_A["default"].weight, target.lora_B["default"].weight
            a_w.copy_((A * E).view(a_w.shape))
            b_w.copy_((B * s).view(b_w.shape))
    return lm.merge_and_unload()


def _weights(model, names):
    """{name: the float weight of that (possibly quantized) layer}."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        kind = bases.base_kind(m)
        w = (
            bases.dequantize_4bit(m)
            if kind == "linear4bit"
            else bases.dequantize_8bit(m)
            if kind == "linear8bitlt"
            else m.weight
        )
        out[n] = w.detach().float()
    return out


@pytest.mark.parametrize("kind", ["4bit", "8bit", "conv2d"])
def test_merge_and_unload_as_peft(kind, llama_dir):
    pm, ours, batch = make_pair(kind, llama_dir)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n, p in lora_params(ours).items():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    names = [n for n, _ in ours.adapted_layers()]
    adapted = outputs(ours, batch, train=True)  # train mode: bitsandbytes keeps its 4-bit layout (see below)
    lora_merged = _delta_as_lora(kind, llama_dir, ours)
    if kind == "conv2d":  # PEFT's AdaLoRA merges Conv2d itself
        theirs_p = lora_params(pm)
        for n, p in lora_params(ours).items():
            theirs_p[n].data.copy_(p)
        peft_merged = pm.merge_and_unload()
        theirs = _weights(peft_merged, names)
    else:
        theirs = _weights(lora_merged, names)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, af.AdaLoraLayer) for m in merged.modules())
    mine = _weights(merged, names)
    for n in names:
        torch.testing.assert_close(mine[n], theirs[n], rtol=1e-5, atol=1e-6, msg=n)
    # the merged model computes what the adapted one did (up to the quantization of the sum)
    tol = {"4bit": 0.5, "8bit": 0.1, "conv2d": 1e-5}[kind]
    assert (outputs(merged, batch, train=True) - adapted).abs().max().item() <= tol * adapted.abs().max().item()


@pytest.mark.parametrize("packed", [False, True], ids=["training-layout", "after-cpu-inference-repacking"])
def test_merge_unmerge_4bit_round_trip(llama_dir, packed):
    """E = 0: the delta is zero, and quantizing the dequantized weight again gives it back. After an
    eval forward bitsandbytes has repacked the weight for its CPU kernel (absmax rounded to bf16):
    merging reads that layout too."""
    _, ours, batch = make_pair("4bit", llama_dir)
    names = [n + ".base_layer" for n, m in ours.adapted_layers() if isinstance(m, af.AdaLoraLinear4bit)]
    before = _weights(ours.model, names)
    if packed:
        outputs(ours, batch)
        assert all(ours.model.get_submodule(n).weight.quant_state.packing_format_for_cpu for n in names)
    logits = outputs(ours, batch, train=not packed)
    ours.merge_adapter()
    ours.unmerge_adapter()
    after = _weights(ours.model, names)
    for n in names:  # bf16 absmax: 2^-8 relative
        torch.testing.assert_close(
            after[n], before[n], rtol=0, atol=0 if not packed else 4e-3 * before[n].abs().max().item()
        )
    torch.testing.assert_close(outputs(ours, batch, train=not packed), logits, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- the unfused adapter term
def test_adapter_term_with_dropout_gradcheck():
    g = torch.Generator().manual_seed(0)
    N, k, d, r = 5, 6, 4, 3
    args = [
        torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        for shape in ((N, d), (N, k), (r, k), (r, 1), (d, r))
    ]
    s = torch.tensor([0.7], dtype=torch.float64)

    def f(result, x, A, E, B):
        return bases._AdapterAdd.apply(result, x, A, E, B, s, 0.4, 1234)

    assert torch.autograd.gradcheck(f, args)
    # and it is PEFT's term with the mask the seed draws
    keep = bases._dropped(torch.ones(N, k, dtype=torch.float64), 0.4, 1234) * 0.6
    result, x, A, E, B = args
    want = result + ((x * keep / 0.6) @ (A * E).T @ B.T) * s
    torch.testing.assert_close(f(*args), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_4bit_under_autocast_matches_peft(dtype, llama_dir):
    pm, ours, batch = make_pair("4bit", llama_dir)
    g = torch.Generator().manual_seed(4)
    theirs, mine = lora_params(pm), lora_params(ours)
    with torch.no_grad():
        for n in mine:
            if "lora_E" in n:
                theirs[n].copy_(torch.randn(theirs[n].shape, generator=g))
                mine[n].copy_(theirs[n])
    b = batch(torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=dtype):
        lp, lo = pm.base_model(**b).loss, ours(**b).loss
    assert lo.item() == pytest.approx(lp.item(), rel=2e-2)
    lp.backward()
    lo.backward()
    for n in mine:  # bf16 rounding, judged against the largest gradient element (tests/tolerances.py)
        assert_close(mine[n].grad, theirs[n].grad, dtype=dtype, what=n)
