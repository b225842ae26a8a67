"""Compile every Triton kernel configuration for real GPUs (no GPU needed) and read the cubins.

Run from the repository root (``python -m bench.compile_check [--json OUT] [--jobs J] [--table]``) in
a process WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives interpreted
functions that cannot be compiled); ``tests/test_triton_compile.py`` runs it in a subprocess and
checks the results, ``bench/cost_on_paper.py`` reads its instruction counts.

For each (kernel config, arch in sm_90/sm_80) it records: registers, local memory (spill) bytes and
static shared memory from ``cuobjdump --dump-resource-usage``, the dynamic shared memory Triton
requests (``metadata.shared``), and from ``--dump-sass`` (see :func:`sass_stats`): HGMMA / HMMA
counts, fences (MEMBAR by scope, ERRBAR, CCTL) and atomics (ATOMG / RED) in the whole kernel and
in its loops, the width of every global load (LDG / LDGSTS: 16, 32, 64 or 128 bit), and the SASS
instructions per tile (per loop iteration when the kernel loops over tiles, per program otherwise).
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

import triton
from triton.backends.compiler import GPUTarget

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CUOBJDUMP = os.path.join(BIN, "cuobjdump")
PTXAS = os.path.join(BIN, "ptxas")
ARCHS = (90, 80)
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # max shared memory per block (opt-in), bytes


def variants():
    from adalora_fast import kernels

    return kernels.compile_variants()


def specialised_ints(fn, signature) -> list:
    """Integer arguments Triton specialises on %16 at launch (not in ``do_not_specialize``): strides
    and the fixed widths K / D of a layer."""
    dns = {p.name for p in fn.params if p.do_not_specialize}
    return [n for n, ty in signature.items() if ty in ("i32", "i64") and n not in dns]


def _attrs(fn, signature, aligned=True):
    """The attributes a launch gets: pointers 16-byte aligned (torch's allocations are), and when
    ``aligned`` every specialised integer 16-divisible (the LLaMA case); otherwise only the strides
    and the split kernels' chunk widths (``k_chunk`` / ``d_chunk``: multiples of the tile width
    whatever the width; a width such as k = 4100 that is not a multiple of 16: the masked tail case)."""
    attrs = {}
    ints = specialised_ints(fn, signature)
    for name, ty in signature.items():
        always = name.startswith("stride") or name.endswith("_chunk")
        if ty.startswith("*") or (name in ints and (aligned or always)):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


_INSN = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)(.*?);")


def parse_sass(sass: str):
    """[(address, opcode with modifiers, operands)] of every instruction of a ``--dump-sass`` listing."""
    out = []
    for line in sass.splitlines():
        m = _INSN.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def _load_bits(op: str) -> int:
    """Width in bits of a global load (LDG / LDGSTS) opcode: .128 / .64 / .U16 / .U8 / 32 by default."""
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if suffix in op:
            return bits
    return 32


def _target(operands: str):
    m = re.match(r"\s*(?:!?U?P[T0-9]+,\s*)?0x([0-9a-f]+)", operands)
    return int(m.group(1), 16) if m else None


def sass_stats(sass: str) -> dict:
    """What the lint checks and COST.md's issue bound uses, read from one kernel's SASS.

    Loops are the ranges [target, branch] of backward branches (``BRA`` to a lower address; the
    ``BRA`` to itself after ``EXIT`` is padding, not a loop); ``loop_insns`` is the instruction
    count of the largest loop body (the software-pipelined tile loop: one iteration = one tile).
    MEMBAR.*.GPU / .SYS are the device-scope fences of acq_rel atomics; MEMBAR.ALL.CTA is the
    ``fence.proxy.async`` Triton puts before a wgmma reads shared memory written by plain stores
    (CTA scope, reported separately).
    """
    insns = parse_sass(sass)
    loops = [
        (_target(rest), a)
        for a, op, rest in insns
        if op.startswith("BRA") and _target(rest) is not None and _target(rest) < a
    ]

    def in_loop(addr):
        return any(t <= addr <= a for t, a in loops)

    def count(pred, where=None):
        return sum(1 for a, op, _ in insns if pred(op) and (where is None or where(a)))

    def is_dev_membar(op):
        return op.startswith("MEMBAR") and (".GPU" in op or ".SYS" in op)

    def is_cta_membar(op):
        return op.startswith("MEMBAR") and not is_dev_membar(op)

    def is_atomic(op):
        return op.startswith(("ATOMG", "RED.", "REDG", "ATOM."))

    big = max(loops, key=lambda ta: ta[1] - ta[0]) if loops else None
    body = [(a, op) for a, op, _ in insns if big and big[0] <= a <= big[1]]
    loads, loop_loads = {}, {}
    for a, op, _ in insns:
        if op.startswith(("LDG.", "LDGSTS")):
            key = f"{'LDGSTS' if op.startswith('LDGSTS') else 'LDG'}.{_load_bits(op)}"
            loads[key] = loads.get(key, 0) + 1
            if big and big[0] <= a <= big[1]:
                loop_loads[key] = loop_loads.get(key, 0) + 1
    real = [i for i in insns if not (i[1] == "NOP" or (i[1].startswith("BRA") and _target(i[2]) == i[0]))]
    return {
        "insns": len(real),
        "loop_insns": len(body),
        "n_loops": len(loops),
        "membar_gpu": count(is_dev_membar),
        "membar_gpu_loop": count(is_dev_membar, in_loop),
        "membar_cta": count(is_cta_membar),
        "membar_cta_loop": count(is_cta_membar, in_loop),
        "errbar": count(lambda op: op == "ERRBAR"),
        "cctl": count(lambda op: op.startswith("CCTL")),
        "atomics": count(is_atomic),
        "atomics_loop": count(is_atomic, in_loop),
        "atomic_ops": sorted({op for _, op, _ in insns if is_atomic(op)}),
        "loads": loads,
        "loop_loads": loop_loads,
    }


def unaligned_too(variant) -> bool:
    """Whether a config is also compiled with its widths not multiples of 16 (k = 4100, say: Triton
    builds a second binary with masked, narrower loads). It must compile, spill-free, too: checked
    at R_PAD 16 for every kernel and dtype pair, which keeps the check's time in bounds (at R_PAD 64
    the same tiles change the dot, not the loads), and at R_PAD 64 for the "bf16x3" binaries, whose
    tiles are their own (kernels/triton_ops/adapter_linear.BF16X3_R64_CONSTEXPRS)."""
    name, fn, sig = variant[:3]
    widths = [n for n in specialised_ints(fn, sig) if not n.startswith("stride")]
    return bool(widths) and ("R64" not in name or ",bf16x3," in name)


def _compile_one(job):
    idx, arch, aligned = job
    name, fn, sig, consts, opts = variants()[idx]
    opts = opts if isinstance(opts, dict) else {"num_warps": opts}  # a bare int is num_warps
    num_warps = opts["num_warps"]
    if not aligned:
        name += "[unaligned]"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig, aligned))
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", "--dump-sass", path], capture_output=True, text=True, check=True
        ).stdout
        res = sass
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump resource usage for {name} sm_{arch}:\n{res}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return {
        "name": name,
        "kernel": fn.__name__,
        "arch": arch,
        "num_warps": num_warps,
        "num_stages": opts.get("num_stages"),
        "blocks": {c: v for c, v in consts.items() if c.startswith("BLOCK_") or c == "ROW_BLOCKS"},
        "aligned": aligned,
        "registers": reg,
        "stack": stack,
        "local": local,
        "static_shared": shared,
        "dyn_shared": int(ck.metadata.shared),
        "smem_limit": SMEM_LIMIT[arch],
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "matmul": "tl.dot" in fn.src or "tl.dot(" in fn.src,
        **sass_stats(sass),
    }


def _widths(loads: dict) -> str:
    return " ".join(f"{k}×{v}" for k, v in sorted(loads.items())) or "-"


def table(results) -> str:
    lines = [
        (
            "| config | arch | regs | spill B | smem B | HGMMA | HMMA | MEMBAR.GPU (loop) | atomics | "
            "SASS insns (per tile) | global loads in the tile loop |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["name"], -r["arch"])):
        per_tile = r["loop_insns"] or r["insns"]
        lines.append(
            f"| {r['name']} | sm_{r['arch']} | {r['registers']} | {r['local'] + r['stack']} | "
            f"{r['static_shared'] + r['dyn_shared']} | {r['hgmma']} | {r['hmma']} | "
            f"{r['membar_gpu']} ({r['membar_gpu_loop']}) | {' '.join(r['atomic_ops']) or '-'} | "
            f"{r['insns']} ({per_tile}) | {_widths(r['loop_loads'] if r['loop_insns'] else r['loads'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the results here (default stdout)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="substring filter on config names")
    ap.add_argument("--table", action="store_true", help="print a markdown table instead of JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit(
            "bench.compile_check must run without TRITON_INTERPRET=1 (the interpreter's @triton.jit "
            "functions cannot be compiled)"
        )
    for tool in (CUOBJDUMP, PTXAS):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"missing {tool}: Triton's wheel must ship ptxas and cuobjdump for this check")
    vs = variants()
    jobs = [
        (i, a, al)
        for i, v in enumerate(vs)
        for a in ARCHS
        for al in (True, False)
        if (al or unaligned_too(v)) and (not args.only or args.only in v[0])
    ]
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
