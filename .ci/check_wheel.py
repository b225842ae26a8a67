"""Build the wheel, install it into a clean venv and import every kernel module from it.

``python .ci/check_wheel.py`` (from anywhere; CI runs it). The editable install the tests use maps
``adalora_fast.kernels`` onto ``kernels/triton_ops/`` through setuptools' editable finder; a built
wheel copies the files instead, so a packaging mistake (a module left out, a top-level ``kernels``
package shipped beside ours) shows only here. Steps:

1. ``pip wheel --no-deps`` of the checkout;
2. the wheel's file list: every ``kernels/triton_ops/*.py`` as ``adalora_fast/kernels/*.py``, every
   ``csrc/*.cpp`` as ``adalora_fast/csrc/*.cpp``, and no top-level ``kernels`` or ``csrc``;
3. a new venv, ``pip install torch==2.13.0 <wheel>`` (torch pinned to take the CPU build from local
   disk), then, from a folder outside the checkout, import every ``adalora_fast.kernels`` module and
   ``transformers.activations`` (which imports Hugging Face's ``kernels``), and run one eager layer
   call, whose C++ autograd node must build from the C++ sources the wheel ships.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = r"""
import importlib, pkgutil, sys
import adalora_fast, adalora_fast.kernels as k
import transformers.activations
expected = set(sys.argv[1].split(","))
found = {m.name for m in pkgutil.iter_modules(k.__path__)}
assert found == expected, (found, expected)
for name in sorted(found):
    mod = importlib.import_module(f"adalora_fast.kernels.{name}")
    assert "site-packages" in mod.__file__, mod.__file__
import importlib.util
spec = importlib.util.find_spec("kernels")
assert spec is None or "adalora_fast" not in (spec.origin or ""), spec
print("wheel: imported", len(found), "kernel modules from", k.__path__[0])
# the layer's C++ autograd node builds from the sources the wheel ships (adalora_fast/csrc/)
import torch
from adalora_fast import ops
from adalora_fast.ops import autograd_node
x, W, A, E, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(2, 1), torch.randn(6, 2)
A.requires_grad_()
out = ops.adapter_linear(x, W, None, A, E, B, 2.0, torch.tensor([2.0]), 0.1, True)
assert out.grad_fn.name() == "AdapterLinearBackward", (out.grad_fn, autograd_node._state)
assert "site-packages" in str(autograd_node.cpu_ext.source_dir(autograd_node._SOURCES))
out.sum().backward()
print("wheel: the C++ autograd node built from", autograd_node.cpu_ext.source_dir(autograd_node._SOURCES))
"""


def run(cmd, **kw):
    print("+", " ".join(str(c) if len(str(c)) < 200 else "<probe>" for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> None:
    kernels = sorted(p.stem for p in (ROOT / "kernels" / "triton_ops").glob("*.py") if p.stem != "__init__")
    sources = sorted(p.name for p in (ROOT / "csrc").glob("*.cpp"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", ROOT])
        (wheel,) = (tmp / "dist").glob("adalora_fast-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        missing = [f"adalora_fast/kernels/{m}.py" for m in ["__init__", *kernels]]
        missing += [f"adalora_fast/csrc/{s}" for s in sources]
        missing = [n for n in missing if n not in names]
        stray = sorted(n for n in names if n.split("/")[0] in ("kernels", "csrc"))
        if missing or stray:
            sys.exit(f"{wheel.name}: missing {missing}, top-level files {stray}")
        print(f"{wheel.name}: {len(kernels)} kernel modules and {len(sources)} C++ sources, nothing top-level")
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", venv])
        py = venv / "bin" / "python"
        run([py, "-m", "pip", "install", "-q", "torch==2.13.0", wheel])
        run([py, "-c", _PROBE, ",".join(kernels)], cwd=tmp)


if __name__ == "__main__":
    main()
