"""Every Triton kernel, at every configuration its launcher can pick, compiles for sm_90 and sm_80.

Runs ``tests/compile_check.py`` once per session in a subprocess without TRITON_INTERPRET (no GPU
needed: Triton's bundled ptxas builds the cubins, its bundled cuobjdump reads them), then checks:
no local-memory spills, shared memory under the chip's limit, and the matrix kernels using HGMMA
(warpgroup MMA) on sm_90 and HMMA on sm_80, read from the cubin's SASS. A missing ptxas/cuobjdump
is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MATMUL_KERNELS = {"_shrink_kernel", "_expand_add_kernel", "_grad_rank_kernel", "_dA_dx_kernel",
                  "_orth_fwd_kernel", "_orth_bwd_kernel"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "results.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_check.py"), "--json", str(out), "--jobs", str(os.cpu_count() or 1)],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, f"compile_check.py failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(out) as f:
        return json.load(f)


def test_every_kernel_and_config_compiled_for_both_archs(compiled):
    names = {(r["name"], r["arch"]) for r in compiled}
    configs = {r["name"] for r in compiled}
    assert names == {(n, a) for n in configs for a in (90, 80)}
    kernels = {r["kernel"] for r in compiled}
    assert MATMUL_KERNELS | {"_keep_mask_kernel", "_importance_kernel", "_apply_mask_kernel"} == kernels
    # 5 dtype pairs x 2 rank pads x 4 adapter kernels + keep_mask + 3 importance + 3 mask + 2 x 2 orth
    assert len(configs) == 51


def test_no_spills(compiled):
    bad = [(r["name"], r["arch"], r["local"], r["stack"]) for r in compiled if r["local"] or r["stack"]]
    assert not bad, f"local-memory spills: {bad}"


def test_shared_memory_under_limit(compiled):
    bad = [(r["name"], r["arch"], r["static_shared"] + r["dyn_shared"]) for r in compiled
           if r["static_shared"] + r["dyn_shared"] > r["smem_limit"]]
    assert not bad, f"shared memory over the chip's limit: {bad}"


def test_tensor_cores(compiled):
    for r in compiled:
        if r["kernel"] in MATMUL_KERNELS:
            if r["arch"] == 90:
                assert r["hgmma"] > 0, f"{r['name']}: no HGMMA in sm_90 SASS"
            else:
                assert r["hmma"] > 0, f"{r['name']}: no HMMA in sm_80 SASS"

