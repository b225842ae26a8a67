"""``torch.compile`` and ``meta`` tensors: the registered ops keep a graph whole.

* one adapted layer under ``torch.compile(fullgraph=True)`` equals eager (forward and every
  gradient; dropout 0 and 0.1; train and eval), with the seed drawn inside the op from torch's
  generator, so ``torch.manual_seed`` gives compiled and eager runs the same dropout masks;
* a tiny LLaMA, compiled with inductor, trains through warm-up, masking and the final phase with
  the losses and ``rank_pattern`` of eager training, no graph break inside adalora_fast and no
  recompile after the first compile;
* a forward on ``meta`` tensors gives the right shapes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import adalora_fast as af
from tiny_models import tiny_llama, train_steps
from tolerances import assert_close

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layer(p, bias=True):
    torch.manual_seed(0)
    lin = af.AdaLoraLinear(torch.nn.Linear(24, 16, bias=bias), r=6, lora_alpha=8, lora_dropout=p)
    torch.nn.init.normal_(lin.lora_E["default"])  # E = 0 at init would hide the adapter term
    return lin


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("training", [True, False])
def test_compiled_layer_equals_eager(p, training):
    torch._dynamo.reset()
    eager = _layer(p).train(training)
    comp = _layer(p).train(training)
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(comp, backend=cnt, fullgraph=True)
    for step in range(3):
        x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(step), requires_grad=True)
        xc = x.detach().clone().requires_grad_()
        torch.manual_seed(100 + step)
        out = eager(x)
        torch.manual_seed(100 + step)
        outc = compiled(xc)
        assert_close(outc, out, what=f"forward, step {step}")
        g = torch.randn_like(out)
        out.backward(g)
        outc.backward(g)
        assert_close(xc.grad, x.grad, what="dx")
        for name in ("lora_A", "lora_E", "lora_B"):
            assert_close(getattr(comp, name)["default"].grad, getattr(eager, name)["default"].grad, what=name)
    assert cnt.frame_count == 1, f"{cnt.frame_count} compiles for 3 calls of the same shapes"


def _tiny_llama():
    base = tiny_llama(max_position_embeddings=32)
    cfg = af.AdaLoraConfig(
        init_r=4,
        target_r=2,
        tinit=3,
        tfinal=4,
        deltaT=2,
        total_step=16,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=TARGETS,
    )
    model = af.get_peft_model(base, cfg)
    for _, m in model.adapted_layers():  # E = 0 at init: give the adapters a say from step 0
        torch.nn.init.normal_(m.lora_E["default"], std=0.1)
    return model


def _train(model, forward, steps=16):
    data = torch.randint(0, 64, (steps, 2, 12), generator=torch.Generator().manual_seed(1))
    return train_steps(model, data, lr=1e-2, forward=forward, seed=1000)  # seed: the dropout seeds the ops draw


def test_compiled_llama_trains_like_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _tiny_llama()
    comp = _tiny_llama()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(comp, backend=cnt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses_e, pats_e = _train(eager, eager)
        losses_c, pats_c = _train(comp, compiled)
    breaks = {str(k): v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    ours = {k: v for k, v in breaks.items() if "adalora_fast" in k}
    assert not ours, f"graph breaks inside adalora_fast: {ours}"
    # every step has the same shapes: one compile of the forward (the backward comes with it)
    assert cnt.frame_count == 1, f"{cnt.frame_count} graphs compiled (graph breaks: {breaks})"
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=2e-4, atol=2e-5)
    assert pats_c == pats_e
    assert pats_e[-1] is not None and sum(sum(v) for v in pats_e[-1].values()) == 2 * len(pats_e[-1])


def test_meta_forward_shapes():
    with torch.device("meta"):
        base = tiny_llama(None)
    model = af.get_peft_model(
        base, af.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_dropout=0.1, target_modules=TARGETS)
    ).to("meta")
    ids = torch.zeros(3, 7, dtype=torch.long, device="meta")
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 7, 64) and out.logits.device.type == "meta"
    assert out.loss.shape == () and out.loss.device.type == "meta"
    lin = next(m for _, m in model.adapted_layers())
    y = lin(torch.empty(5, 32, device="meta"))
    assert y.shape == (5, lin.out_features) and y.device.type == "meta"
