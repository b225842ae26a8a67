"""Mixed precision against PEFT in the same setting: {fp32, bf16 base, fp16 base, autocast bf16,
autocast fp16} x {forward (loss with the penalty), backward (every adapter gradient),
update_and_allocate (rank pattern and E after masking), the penalty itself}.

Both sides get the same model, the same adapter weights and the same data; half-precision base
models get fp32 adapters on both sides (PEFT's ``autocast_adapter_dtype=True``, our default).
Tolerances are the dtype's (tests/tolerances.py); the penalty is fp32 on both sides.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import peft
import pytest
import torch

import adalora_fast as af
from tiny_models import tiny_llama
from tolerances import assert_close

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {  # name: (base dtype, autocast dtype or None, dtype the model computes in)
    "fp32": (torch.float32, None, torch.float32),
    "bf16-base": (torch.bfloat16, None, torch.bfloat16),
    "fp16-base": (torch.float16, None, torch.float16),
    "autocast-bf16": (torch.float32, torch.bfloat16, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float16, torch.float16),
}


def _pair(base_dtype):
    base = tiny_llama(max_position_embeddings=32).to(base_dtype)
    kw = dict(
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=8,
        lora_alpha=8,
        lora_dropout=0.0,
        orth_reg_weight=0.5,
        target_modules=TARGETS,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))
        ours = af.get_peft_model(base, af.AdaLoraConfig(**kw))
    ours.load_state_dict(pm.base_model.state_dict())
    with torch.no_grad():  # E = 0 at init hides the adapter term: give it a value, the same on both sides
        for (_, m), n in zip(ours.adapted_layers(), range(1000)):
            m.lora_E["default"].copy_(torch.linspace(-0.5, 0.5, 4).view(4, 1) * (n + 1) / 10)
    ours_sd = {k: v for k, v in ours.state_dict().items() if "lora_E" in k}
    pm.base_model.load_state_dict(ours_sd, strict=False)
    return pm, ours


def _lora_params(model):
    return {n[n.index("layers.") :]: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_steps_match_peft(setting, monkeypatch):
    base_dtype, ac_dtype, compute = SETTINGS[setting]
    pm, ours = _pair(base_dtype)
    ctx = (lambda: torch.autocast("cpu", dtype=ac_dtype)) if ac_dtype else contextlib.nullcontext
    data = torch.randint(0, 64, (8, 2, 10), generator=torch.Generator().manual_seed(1))
    for step in range(8):
        ids = data[step]
        with ctx():
            lp = pm(input_ids=ids, labels=ids).loss
        with ctx():
            lo = ours(input_ids=ids, labels=ids).loss
        assert torch.isfinite(lo), f"step {step}: loss {lo}"
        assert_close(lo.float(), lp.float(), compute, f"{setting} step {step} loss")
        lp.backward()
        lo.backward()
        po, pp = _lora_params(ours), _lora_params(pm)
        assert set(po) == set(pp)
        # each gradient judged against the largest of its kind (A, B or E): dE = s Σ gB ⊙ t cancels to
        # ~1e-6 in places, while the half-precision rounding scales with the summands
        kind_scale = {
            k: max(g.grad.abs().max().item() for n, g in pp.items() if k in n) for k in ("lora_A", "lora_B", "lora_E")
        }
        for n in po:
            kind = next(k for k in kind_scale if k in n)
            assert_close(po[n].grad, pp[n].grad, compute, f"{setting} step {step} grad {n}", scale=kind_scale[kind])
            with torch.no_grad():  # same weights again: differences must not compound over steps
                po[n].grad.copy_(pp[n].grad)
        pm.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        rp_peft = pm.peft_config["default"].rank_pattern
        assert ours.rank_pattern == rp_peft, f"{setting} step {step}: rank pattern differs"
        with torch.no_grad():
            for n in po:
                assert_close(po[n], pp[n], torch.float32, f"{setting} step {step} {n} after update_and_allocate")
            for n in po:
                po[n].grad = None
                pp[n].grad = None


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_penalty_matches_peft_and_its_gradient(setting, impl):
    base_dtype, ac_dtype, _ = SETTINGS[setting]
    pm, ours = _pair(base_dtype)
    ctx = torch.autocast("cpu", dtype=ac_dtype) if ac_dtype else contextlib.nullcontext()
    with ctx:
        pen = ours.orth_penalty()
        lora = [p for n, p in pm.named_parameters() if "lora_A" in n or "lora_B" in n]
        ref = sum(
            torch.norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(min(p.shape)), p="fro")
            for (n, p) in [(n, p) for n, p in pm.named_parameters() if "lora_A" in n or "lora_B" in n]
        ) / len(lora)
    assert pen.dtype == torch.float32
    assert_close(pen, ref.float(), torch.float32 if ac_dtype is None else ac_dtype, f"{setting} penalty")
    pen.backward()  # autocast off, as a training loop's backward runs
    for _, m in ours.adapted_layers():
        for kind in ("lora_A", "lora_B"):
            g = getattr(m, kind)["default"].grad
            assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
