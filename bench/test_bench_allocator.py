"""update_and_allocate (masking and non-masking step) and the orthogonal penalty forward+backward,
adalora_fast vs PEFT AdaLoRA, on a random LLaMA-style model with all seven projections adapted."""

import math

import pytest
import torch

from .cases import _peft_orth_penalty
from .common import MASK_STEP, NOMASK_STEP, PROJECTIONS, LlamaShape, adapter_params, llama, make_contender, repeatable

COUNTS = [56, 224]
KINDS = ["ours", "peft_adalora"]
_cache = {}


def _model(kind, n, device):
    key = (kind, n, str(device))
    if key not in _cache:
        _cache.clear()  # one model alive at a time
        shape = LlamaShape(hidden=128, layers=math.ceil(n / 7), intermediate=344, heads=2, vocab=256)
        m, upd = make_contender(kind, llama(shape, device), 12, 0.0, PROJECTIONS)
        upd = repeatable(kind, m, upd)
        torch.manual_seed(2)
        for q in adapter_params(m):
            q.grad = torch.randn_like(q) * 1e-2
        _cache[key] = (m, upd)
    return _cache[key]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step", [NOMASK_STEP, MASK_STEP], ids=["nonmasking", "masking"])
@pytest.mark.parametrize("n", COUNTS, ids=[f"{n}layers" for n in COUNTS])
def test_update_and_allocate(benchmark, device, kind, n, step):
    m, upd = _model(kind, n, device)
    benchmark.group = f"update_and_allocate {n} layers (hidden 128) {'masking' if step == MASK_STEP else 'non-masking'}"
    benchmark.extra_info["contender"] = kind
    benchmark(upd, step)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", COUNTS, ids=[f"{n}layers" for n in COUNTS])
def test_orth_penalty_forward_backward(benchmark, device, kind, n):
    m, _ = _model(kind, n, device)
    pen = m.orth_penalty if kind == "ours" else (lambda: _peft_orth_penalty(m))
    benchmark.group = f"orth penalty forward+backward {n} layers (hidden 128)"
    benchmark.extra_info["contender"] = kind
    benchmark(lambda: pen().backward())
