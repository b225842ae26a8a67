"""Compile every Triton kernel configuration for real GPUs (no GPU needed) and read the cubins.

Run as a script (``python tests/compile_check.py [--json OUT] [--jobs J]``) in a process WITHOUT
``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives interpreted functions that cannot
be compiled); ``tests/test_triton_compile.py`` runs it in a subprocess and checks the results.

For each (kernel config, arch in sm_90/sm_80) it records: registers, local memory (spill) bytes and
static shared memory from ``cuobjdump --dump-resource-usage``, the dynamic shared memory Triton
requests (``metadata.shared``), and the count of HGMMA / HMMA instructions in ``--dump-sass``.
The ptxas and cuobjdump are the ones that ship in Triton's wheel
(``triton/backends/nvidia/bin``); if they are missing this script fails loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("compile_check.py must run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(BIN, "cuobjdump")
PTXAS = os.path.join(BIN, "ptxas")
ARCHS = (90, 80)
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # max shared memory per block (opt-in), bytes


def variants():
    from adalora_fast.kernels import adapter, importance, orth

    out = []
    for mod in (adapter, importance, orth):
        out.extend(mod.compile_variants())
    return out


def _attrs(fn, signature):
    attrs = {}
    for name, ty in signature.items():
        if ty.startswith("*") or (name.startswith("stride") and ty != "constexpr"):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def _compile_one(job):
    idx, arch = job
    name, fn, sig, consts, num_warps = variants()[idx]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig))
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        res = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump resource usage for {name} sm_{arch}:\n{res}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return {
        "name": name, "kernel": fn.__name__, "arch": arch, "num_warps": num_warps,
        "registers": reg, "stack": stack, "local": local, "static_shared": shared,
        "dyn_shared": int(ck.metadata.shared), "smem_limit": SMEM_LIMIT[arch],
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)), "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "matmul": "tl.dot" in fn.src or "tl.dot(" in fn.src,
    }


def table(results) -> str:
    lines = ["| config | arch | regs | spill (local) B | smem B | HGMMA | HMMA |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["name"], -r["arch"])):
        lines.append(f"| {r['name']} | sm_{r['arch']} | {r['registers']} | {r['local']} | "
                     f"{r['static_shared'] + r['dyn_shared']} | {r['hgmma']} | {r['hmma']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the results here (default stdout)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="substring filter on config names")
    ap.add_argument("--table", action="store_true", help="print a markdown table instead of JSON")
    args = ap.parse_args(argv)
    for tool in (CUOBJDUMP, PTXAS):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"missing {tool}: Triton's wheel must ship ptxas and cuobjdump for this check")
    vs = variants()
    jobs = [(i, a) for i, v in enumerate(vs) for a in ARCHS if not args.only or args.only in v[0]]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            results = list(ex.map(_compile_one, jobs))
    else:
        results = [_compile_one(j) for j in jobs]
    text = table(results) if args.table else json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
