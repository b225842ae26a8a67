"""The repository's layout does not shadow installed packages, and the package finds its kernels.

``python -m pytest`` and ``python -m bench`` put the repository root first on ``sys.path``. A regular
package named ``kernels`` there (a ``kernels/__init__.py``) would shadow Hugging Face's ``kernels``,
which transformers imports from ``transformers.activations``; so ``kernels/`` holds no ``__init__.py``
and the Triton modules live in ``kernels/triton_ops/``, installed as ``adalora_fast.kernels``.
The built wheel is checked in a clean venv by ``.ci/check_wheel.py``.
"""

from __future__ import annotations

import importlib.metadata
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run from the repository root with its directory first on sys.path, as `python -m ...` does.
_PROBE = r"""
import importlib.util, json, sys
sys.path.insert(0, "")
import transformers.activations  # imports Hugging Face's `kernels` where it is installed
spec = importlib.util.find_spec("kernels")
print(json.dumps(None if spec is None else
                 {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}))
"""


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_no_top_level_module_named_kernels_in_the_checkout():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the checkout's kernels/ a regular package that shadows Hugging "
        "Face's `kernels` whenever the repository root is on sys.path"
    )
    assert not (ROOT / "kernels.py").exists()
    stray = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert not stray, f"Python modules directly in kernels/ ({stray}) belong in kernels/triton_ops/"


def test_transformers_imports_from_the_repository_root():
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads(proc.stdout.strip().splitlines()[-1])
    if _hf_kernels_installed():
        # the installed distribution's own file (a venv may live inside the checkout, so compare
        # with where the distribution is, not with the checkout's path)
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
        assert spec is not None and spec["origin"] is not None, spec
        assert Path(spec["origin"]).resolve() == Path(installed).resolve(), f"`kernels` is not Hugging Face's: {spec}"
    else:
        # without Hugging Face's package, at most a namespace portion is found: no code of ours runs
        assert spec is None or spec["origin"] in (None, "namespace"), spec
    locations = [Path(p).resolve() for p in (spec or {}).get("locations") or []]
    assert (ROOT / "kernels").resolve() not in locations or not _hf_kernels_installed(), spec


def test_every_kernel_module_imports_as_adalora_fast_kernels():
    import adalora_fast.kernels as k

    sources = sorted(p.stem for p in (ROOT / "kernels" / "triton_ops").glob("*.py") if p.stem != "__init__")
    found = sorted(m.name for m in pkgutil.iter_modules(k.__path__))
    assert found == sources
    for name in found:
        mod = __import__(f"adalora_fast.kernels.{name}", fromlist=["_"])
        assert Path(mod.__file__).name == f"{name}.py"
