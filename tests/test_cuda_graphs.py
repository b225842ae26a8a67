"""CUDA graphs (skipped without a CUDA GPU): a layer's forward and backward capture and replay to
the eager results, with dropout too: the dropout seed is a [1] int64 tensor drawn on the device from
torch's CUDA generator inside the captured region (torch's graph-safe Philox state gives every
replay a fresh seed, and ``torch.manual_seed`` repeats them) and the scale is formed inside the
kernels from ranknum in device memory, so nothing of a step is a host value baked into the graph.
A whole training step (forward, backward, a capturable AdamW step) captures under
``torch.cuda.graph`` and under ``torch.compile(mode="reduce-overhead")``; a pointer-table upload
under capture still raises (a copy from freed host memory).
"""

from __future__ import annotations

import math

import pytest
import torch

from adalora_fast import ops
from adalora_fast.kernels import _launch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA graph capture (no GPU on this machine)"
)

N, K, D, R = 256, 192, 160, 12


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(D, K, generator=g) / math.sqrt(K)).to("cuda", dtype)
    A, E, B = (
        torch.randn(*s, generator=g).mul(0.5).to("cuda", dtype).requires_grad_() for s in ((R, K), (R, 1), (D, R))
    )
    return W, A, E, B


def _step(x, W, A, E, B, go, rank):
    out = ops.adapter_linear(x, W, None, A, E, B, 8.0, rank, 0.0, True)
    out.backward(go)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_without_dropout_replays_like_eager(dtype):
    W, A, E, B = _weights(dtype)
    rank = torch.tensor([12.0], device="cuda")
    x = torch.randn(N, K, device="cuda", dtype=dtype, requires_grad=True)
    go = torch.randn(N, D, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, fills the caches
        for _ in range(2):
            _step(x, W, A, E, B, go, rank)
    torch.cuda.current_stream().wait_stream(side)
    for t in (x, A, E, B):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(x, W, A, E, B, go, rank)
    for i in range(3):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            go.copy_(torch.randn_like(go))
            E.mul_(0.5 + i)  # the adapter weights change between replays, as after optimizer steps
        graph.replay()
        torch.cuda.synchronize()
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, E, B)]
        want = _step(leaves[0], W, *leaves[1:], go, rank)
        assert torch.equal(out, want), f"replay {i}: forward differs from eager"
        for name, t, w in zip(("dx", "dA", "dE", "dB"), (x, A, E, B), leaves):
            # dA / dB / dE sum with fp32 atomics (order varies): equal up to rounding
            torch.testing.assert_close(
                t.grad,
                w.grad,
                rtol=1e-5 if dtype == torch.float32 else 1e-2,
                atol=1e-6 if dtype == torch.float32 else 1e-3,
                msg=f"replay {i}: {name}",
            )


def _capture(fn):
    """Warm ``fn`` up on a side stream (compiles the kernels), then capture it; (graph, its result)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = fn()
    return graph, res


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_replays_draw_new_masks_and_match_eager_for_their_seed(dtype):
    """With dropout in the captured layer: two replays draw two masks; each replay equals the eager
    layer run with the seed that replay drew (read back from the seed tensor saved for backward),
    forward and every gradient; torch.manual_seed before a replay repeats it."""
    W, A, E, B = _weights(dtype)
    rank = torch.tensor([12.0], device="cuda")
    x = torch.randn(N, K, device="cuda", dtype=dtype, requires_grad=True)
    go = torch.randn(N, D, device="cuda", dtype=dtype)
    seeds = []

    def step():
        for t in (x, A, E, B):
            t.grad = None
        seeds.clear()

        def pack(t):
            if t.dtype == torch.int64 and t.numel() == 1:
                seeds.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ops.adapter_linear(x, W, None, A, E, B, 8.0, rank, 0.1, True)
        out.backward(go)
        return out

    graph, out = _capture(step)
    assert len(seeds) == 1, "one seed tensor saved per layer call"
    seed = seeds[0]
    results = []
    for i in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((out.clone(), x.grad.clone(), seed.item()))
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, E, B)]
        want = ops.adapter_linear(leaves[0], W, None, *leaves[1:], 8.0, rank, 0.1, True, seed=seed.item())
        want.backward(go)
        assert torch.equal(out, want), f"replay {i}: forward differs from eager with the replay's seed"
        for name, t, w in zip(("dx", "dA", "dE", "dB"), (x, A, E, B), leaves):
            torch.testing.assert_close(
                t.grad,
                w.grad,
                rtol=1e-5 if dtype == torch.float32 else 1e-2,
                atol=1e-6 if dtype == torch.float32 else 1e-3,
                msg=f"replay {i}: {name}",
            )
    assert results[0][2] != results[1][2], "two replays drew one seed"
    assert not torch.equal(results[0][0], results[1][0]), "two replays drew one mask"
    torch.manual_seed(123)
    graph.replay()
    first = out.clone()
    torch.manual_seed(123)
    graph.replay()
    assert torch.equal(out, first), "torch.manual_seed does not repeat a replay"


def _model(p=0.1):
    import adalora_fast as af
    from tiny_models import tiny_llama

    base = tiny_llama(max_position_embeddings=32).to("cuda")
    cfg = af.AdaLoraConfig(
        init_r=4,
        target_r=2,
        total_step=100,
        lora_alpha=8,
        lora_dropout=p,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = af.get_peft_model(base, cfg)
    for _, m in model.adapted_layers():  # E = 0 at init would hide the adapters
        torch.nn.init.normal_(m.lora_E["default"], std=0.1)
    return model


def test_whole_training_step_captures_with_dropout():
    """Forward (orthogonal penalty in the loss), backward and a capturable AdamW step in one CUDA
    graph, dropout 0.1: replays train (the loss moves), draw new masks (the same weights give another
    loss), and ``torch.manual_seed`` repeats a replay."""
    torch.manual_seed(0)
    model = _model()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, capturable=True)
    ids = torch.randint(0, 64, (2, 12), device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    for q in params:  # grads exist before capture (zero_grad keeps them, in place)
        q.grad = torch.zeros_like(q)
    graph, loss = _capture(step)
    losses = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert len(set(losses)) == 3, f"replays repeat one step: {losses}"
    state = {n: q.detach().clone() for n, q in model.named_parameters()}
    opt_state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in opt.state.items()}
    torch.manual_seed(5)
    graph.replay()
    a = loss.item()
    with torch.no_grad():  # back to the same weights and optimizer state
        for n, q in model.named_parameters():
            q.copy_(state[n])
        for k, s in opt.state.items():
            for n, v in s.items():
                if torch.is_tensor(v):
                    v.copy_(opt_state[k][n])
    torch.manual_seed(5)
    graph.replay()
    assert loss.item() == a, "torch.manual_seed does not repeat a captured step"


def test_compiled_reduce_overhead_step_with_dropout():
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs under inductor) of the model with
    dropout: it runs the registered op (its seed drawn on the device inside the graph), successive
    calls draw new masks, and under one torch.manual_seed it equals eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _model()
    compiled = torch.compile(model, mode="reduce-overhead")
    ids = torch.randint(0, 64, (2, 12), device="cuda")
    losses = []
    for i in range(4):
        torch.manual_seed(100 + i)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        for q in model.parameters():
            q.grad = None
    assert all(math.isfinite(v) for v in losses)
    assert len(set(losses[1:])) == 3, f"compiled steps repeat one mask: {losses}"
    torch.manual_seed(103)
    eager = model(input_ids=ids, labels=ids).loss.item()
    assert abs(eager - losses[3]) <= 1e-3 * max(1.0, abs(eager)), (eager, losses[3])


def test_table_upload_under_capture_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        _launch.to_device_table([1, 2, 3], "cuda")
    assert _launch.to_device_table([1, 2, 3], "cpu").tolist() == [1, 2, 3]  # CPU tables never check
