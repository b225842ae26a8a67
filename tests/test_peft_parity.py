"""The whole AdaLoRA schedule against PEFT itself: same model, same adapter weights, same data.

Warm-up (steps <= tinit), cubic reduction masking every deltaT steps, and the frozen final phase:
per-step losses, the rank pattern at every step, and the final adapter tensors must match PEFT.
"""

import copy
import warnings

import peft
import pytest
import torch

import adalora_fast as af
from tiny_models import tiny_gpt2, tiny_llama

SCHEDULE = dict(init_r=6, target_r=3, tinit=4, tfinal=8, deltaT=3, total_step=30, beta1=0.85, beta2=0.85)


def llama_and_targets():
    model = tiny_llama(None, vocab_size=96, hidden_size=48, intermediate_size=80, max_position_embeddings=64)
    return model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gpt2_and_targets():
    return tiny_gpt2(None, dropout=0.0, vocab_size=96, n_embd=48), ["c_attn", "c_proj", "c_fc"]


def run_pair(make, backend, monkeypatch, steps=30):
    torch.manual_seed(0)
    base, targets = make()
    base_ours = copy.deepcopy(base)
    kw = dict(SCHEDULE, target_modules=targets, lora_alpha=16, lora_dropout=0.0, orth_reg_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))
        ours = af.get_peft_model(base_ours, af.AdaLoraConfig(**kw))
    # Same adapter weights: PEFT's AdaLoraModel and ours share state-dict keys.
    ours.load_state_dict(pm.base_model.state_dict())
    monkeypatch.setenv("ADALORA_FAST_BACKEND", backend)
    opt_p = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    history = []
    for step in range(steps):
        ids = torch.randint(0, 96, (2, 12), generator=gen)
        lp = pm(input_ids=ids, labels=ids).loss
        lp.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        lo = ours(input_ids=ids, labels=ids).loss
        lo.backward()
        opt_o.step()
        ours.update_and_allocate(step)
        opt_o.zero_grad()
        history.append(
            (step, lp.item(), lo.item(), copy.deepcopy(pm.peft_config["default"].rank_pattern), ours.rank_pattern)
        )
    return pm, ours, history


@pytest.mark.parametrize("make", [llama_and_targets, gpt2_and_targets], ids=["llama-linear", "gpt2-conv1d"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_schedule_matches_peft(make, backend, monkeypatch):
    pm, ours, history = run_pair(make, backend, monkeypatch)
    masked_steps = 0
    for step, lp, lo, rp_peft, rp_ours in history:
        assert lo == pytest.approx(lp, rel=1e-5), f"step {step}: loss {lo} vs PEFT {lp}"
        assert rp_ours == rp_peft, f"step {step}: rank_pattern differs from PEFT's"
        if rp_peft is not None:
            masked_steps += 1
    # The schedule really went through reduction and the final phase, with real pruning.
    assert masked_steps >= 20
    final = history[-1][4]
    n_kept = sum(sum(v) for v in final.values())
    n_layers = len(final)
    assert n_kept == SCHEDULE["target_r"] * n_layers
    assert any(0 < sum(v) < SCHEDULE["init_r"] for v in final.values()), "expected an uneven allocation"
    ps = pm.base_model.state_dict()
    for k, v in ours.state_dict().items():
        if "lora_" in k:
            torch.testing.assert_close(v, ps[k], rtol=1e-5, atol=1e-6, msg=f"final {k} differs")
