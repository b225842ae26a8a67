"""End to end: a small model trained 20 steps on the triton backend (interpreter on CPU) follows
the torch backend step for step: losses and rank_pattern.

On a GPU machine (conftest's ``TRITON_DEVICE`` is CUDA) both runs train on the GPU: the triton run
on the compiled kernels, the torch run on the torch implementation there, so the two differ only in
the adapter ops (the base model's CUDA kernels, and its initialisation from the CUDA generator, are
the same in both)."""

import copy
import warnings

import pytest
import torch
from conftest import TRITON_DEVICE

import adalora_fast as af
from tiny_models import tiny_llama, train_steps
from tolerances import rtol_for


def train(backend, base, monkeypatch, steps=20, dropout=0.0, device="cpu"):
    monkeypatch.setenv("ADALORA_FAST_BACKEND", backend)
    torch.manual_seed(5)
    cfg = af.AdaLoraConfig(
        init_r=6,
        target_r=3,
        tinit=3,
        tfinal=5,
        deltaT=2,
        total_step=steps,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = af.get_peft_model(copy.deepcopy(base).to(device), cfg)
    gen = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 64, (2, 9), generator=gen).to(device) for _ in range(steps)]
    return train_steps(model, batches, lr=5e-3)


def test_triton_backend_trains_like_torch_backend(monkeypatch):
    base = tiny_llama(num_hidden_layers=1)
    dev = TRITON_DEVICE
    lt, pt = train("torch", base, monkeypatch, device=dev)
    lk, pk = train("triton", base, monkeypatch, device=dev)
    # fp32 throughout: 2e-5 of the loss over 20 steps (the CPU); on a GPU with TF32 dots allowed,
    # the fp32 tolerance of TF32 (tests/tolerances.py)
    rel = max(2e-5, rtol_for(torch.float32, dev))
    for step, (a, b) in enumerate(zip(lt, lk)):
        assert b == pytest.approx(a, rel=rel), f"step {step}: triton loss {b} vs torch {a}"
    assert pk == pt
    assert pt[-1] is not None and sum(sum(v) for v in pt[-1].values()) == 3 * 7
