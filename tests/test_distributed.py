"""Data-parallel and sharded training, 2 CPU processes on gloo, against one process on the global batch.

One spawn of two ranks trains a tiny LLaMA four times, 30 steps through warm-up, masking and the
final phase: under DDP, FSDP2 (``fully_shard`` on each decoder layer and the root; resharding after
the forward or not) and FSDP1
(``use_orig_params=True``, the decoder layers wrapped), all with the orthogonal penalty. Each rank
takes half of every global batch. Checked against one process on the
whole batch: the mean of the ranks' losses at every step, ``rank_pattern`` at every step (on both
ranks), the allocator state gathered mid-run, the final full-rank adapters; and a checkpoint saved
under sharding loads in one process (ours and PEFT) with the single run's logits.

Single process: parameter replacement (``load_state_dict(assign=True)``, ``to_empty``) leaves
``update_and_allocate`` and the penalty on the live parameters.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import warnings

import peft
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import adalora_fast as af
from tiny_models import tiny_llama

SCHEDULE = dict(init_r=6, target_r=3, tinit=4, tfinal=8, deltaT=3, total_step=30, beta1=0.85, beta2=0.85)
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
STEPS, GLOBAL_BATCH, SEQ, VOCAB = 30, 4, 12, 96
NAN_STEP = 2  # a NaN gradient element, left out of the importance state and counted
MID_STEP = 12  # a checkpoint with the allocator state is saved here (the state is freed at the final mask)
MODES = ("ddp", "fsdp2", "fsdp2_keep", "fsdp1")  # fsdp2_keep: reshard_after_forward=False (the penalty sees whole A, B)


def base_model():
    return tiny_llama(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, max_position_embeddings=64)


def build():
    base = base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = af.get_peft_model(
            base,
            af.AdaLoraConfig(**SCHEDULE, target_modules=TARGETS, lora_alpha=16, lora_dropout=0.0, orth_reg_weight=0.5),
        )
    for _, m in model.adapted_layers():  # E = 0 at init: give the adapters a say from step 0
        torch.nn.init.normal_(m.lora_E["default"], std=0.1)
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _poison_first_gradient_element(model):
    """A NaN in element 0 of the first lora_A gradient, on the rank that holds it (after the optimizer
    step: the allocator must leave it out of the importance averages and count it once)."""
    alloc = model.rankallocator
    p, sh = alloc.params()[0], alloc.shards
    if sh is None:
        p.grad.view(-1)[0] = float("nan")
    elif sh.starts[0] == 0 and sh.numels[0] > 0:
        af.distributed.local_flat(p.grad)[0] = float("nan")


def train(model, forward, ids_of, params, save=None):
    """STEPS AdamW steps; ``ids_of(step)``: this process's part of the global batch. Returns the losses
    and the rank pattern after every step, and the allocator checkpoint taken at MID_STEP."""
    opt = torch.optim.AdamW(params, lr=5e-3)
    losses, patterns, mid = [], [], None
    for step in range(STEPS):
        ids = ids_of(step)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if step == NAN_STEP:
            _poison_first_gradient_element(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "update_and_allocate", RuntimeWarning)  # the NaN's, counted below
            model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
        patterns.append(copy.deepcopy(model.rank_pattern))
        if step == MID_STEP:
            mid = {
                k: v.clone() for k, v in model.allocator_checkpoint().items()
            }  # collective under FSDP; CPU tensors alias the live state
            if save is not None:
                save(step)
    return losses, patterns, mid


# ------------------------------------------------------------------------------------ the ranks
def _rank_run(rank: int, world: int, mode: str, out: str):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = build()
    if mode == "ddp":
        wrapped = DistributedDataParallel(model)
    elif mode.startswith("fsdp2"):
        keep = mode == "fsdp2_keep"
        for layer in model.model.model.layers:
            fully_shard(layer, reshard_after_forward=not keep)
        wrapped = fully_shard(model, reshard_after_forward=not keep)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frozen and trained parameters in one unit
            wrapped = FullyShardedDataParallel(
                model,
                auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                use_orig_params=True,
                device_id=torch.device("cpu"),
            )
    data = batches()
    per = GLOBAL_BATCH // world
    save_dir = os.path.join(out, mode)

    def save(step):
        model.save_pretrained(
            os.path.join(save_dir, f"step{step}"), is_main_process=rank == 0, save_allocator_state=True
        )

    params = [p for p in wrapped.parameters() if p.requires_grad]
    losses, patterns, mid = train(model, wrapped, lambda s: data[s][rank * per : (rank + 1) * per], params, save)
    final = model.allocator_checkpoint()
    model.save_pretrained(os.path.join(save_dir, "final"), is_main_process=rank == 0)
    torch.save(dict(losses=losses, patterns=patterns, mid=mid, final=final), os.path.join(out, f"{mode}.rank{rank}.pt"))


def _worker(rank: int, world: int, port: int, out: str):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        for mode in MODES:
            _rank_run(rank, world, mode, out)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' results per mode (a failing rank's traceback fails the tests), and the single-process run."""
    out = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    data = batches()
    model = build()
    params = [p for p in model.parameters() if p.requires_grad]
    single = (model, *train(model, model, lambda s: data[s], params))
    ranks = {m: [torch.load(os.path.join(out, f"{m}.rank{r}.pt"), weights_only=False) for r in range(2)] for m in MODES}
    return out, ranks, single


def _close(a, b, what, rtol=2e-4, atol=2e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_sharded_training_equals_one_process(runs, mode):
    _, ranks, single = runs
    model, losses, patterns, mid = single
    r0, r1 = ranks[mode]
    for step in range(STEPS):
        assert r0["patterns"][step] == r1["patterns"][step], f"{mode} step {step}: the ranks' rank_pattern differ"
        assert r0["patterns"][step] == patterns[step], f"{mode} step {step}: rank_pattern differs from one process"
    # the schedule really pruned, unevenly
    final = patterns[-1]
    assert sum(map(sum, final.values())) == SCHEDULE["target_r"] * len(final)
    assert any(0 < sum(v) < SCHEDULE["init_r"] for v in final.values())
    assert model.rankallocator.nonfinite_skipped == {f"{model.rankallocator.names[0]}.lora_A.default": 1}
    mean_loss = (torch.tensor(r0["losses"]) + torch.tensor(r1["losses"])) / 2
    _close(mean_loss, torch.tensor(losses), f"{mode} losses")
    for key, v in model.allocator_checkpoint().items():
        _close(r0["final"][key], v, f"{mode} final {key}")
        assert torch.equal(r0["final"][key], r1["final"][key]), f"{mode} final {key}: the ranks differ"
    for key, v in mid.items():  # the gathered importance state, mask and adapters at MID_STEP
        scale = v.float().abs().max().item() if v.dtype.is_floating_point else 0
        _close(r0["mid"][key], v, f"{mode} step {MID_STEP} {key}", atol=max(2e-6, 1e-4 * scale))
        assert torch.equal(r0["mid"][key], r1["mid"][key]), f"{mode} step {MID_STEP} {key}: the ranks differ"


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_saved_under_sharding_loads_in_one_process(runs, mode):
    out, ranks, single = runs
    model = single[0]
    ids = batches()[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        ours = af.AdaLoraModel.from_pretrained(base_model(), os.path.join(out, mode, "final"))
        _close(ours(input_ids=ids).logits, want, f"{mode}: our load of the sharded checkpoint")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(base_model(), os.path.join(out, mode, "final"))
        _close(theirs(input_ids=ids).logits, want, f"{mode}: PEFT's load of the sharded checkpoint")
    # the mid-run checkpoint resumes in one process with the gathered allocator state
    resumed = af.AdaLoraModel.from_pretrained(
        base_model(), os.path.join(out, mode, f"step{MID_STEP}"), is_trainable=True
    )
    assert resumed.rankallocator.last_step == MID_STEP
    for key, v in resumed.allocator_checkpoint().items():
        _close(v, ranks[mode][0]["mid"][key], f"{mode}: resumed {key}")


# ------------------------------------------------------------------------------------ parameter replacement
def _step(model, ids, step):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.update_and_allocate(step)
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_parameter_replacement_is_followed(how):
    """After ``load_state_dict(assign=True)`` (new parameter objects) or ``to_empty`` + load (new
    storage), the penalty's gradient and the importance update reach the live parameters: the same
    gradients, state and masks as an untouched copy, through warm-up and masking."""
    ref, model = build(), build()
    data = batches()
    _step(ref, data[0], 0)
    _step(model, data[0], 0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    old = model.rankallocator.params()
    if how == "assign":
        model.load_state_dict(sd, assign=True)
        assert all(p is not q for p, q in zip(model.rankallocator.params(), old))
    else:
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # LLaMA's rotary inv_freq is not in the state dict
        model.to_empty(device="cpu")
        model.load_state_dict(sd)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    for step in range(1, 10):  # tinit=4, deltaT=3: masks at steps 6 and 9
        lr, gr = _step(ref, data[step], step)
        lm, gm = _step(model, data[step], step)
        assert lm == pytest.approx(lr, rel=1e-6)
        for n, g in gr.items():
            _close(gm[n], g, f"step {step} grad {n}", rtol=1e-6, atol=1e-8)
        assert model.rank_pattern == ref.rank_pattern
    _close(model.rankallocator.m1, ref.rankallocator.m1, "importance state", rtol=1e-6, atol=1e-9)


def test_penalty_follows_assign_load():
    """The penalty's gradient goes to the parameters the modules hold after an ``assign=True`` load."""
    model = build()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model.orth_penalty().backward()
    live = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert live and all(p.grad is not None and p.grad.abs().sum() > 0 for p in live)


def test_deepspeed_zero3_partitions_are_named():
    """ZeRO-3 swaps each parameter's data for an empty partition and marks it with ``ds_id``: the
    allocator names ZeRO-3 instead of reporting a shape mismatch."""
    model = build()
    for p in model.rankallocator.params():
        p.ds_id = 0
        p.data = torch.empty(0)
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        model.update_and_allocate(0)
