"""The README's code runs as pasted.

Every fenced block of ``README.md`` opened with ```` ```python ```` runs, each on its own in a fresh
interpreter, as a reader would paste it: the working directory an empty temporary folder (so
nothing of the checkout shadows the installed package), ``HF_HUB_OFFLINE=1`` (nothing is
downloaded), and none of the test suite's backend switches (``ADALORA_FAST_BACKEND``,
``TRITON_INTERPRET``) in the environment. A block that is deliberately not runnable must be
fenced otherwise (```` ```text ````, ```` ```bash ````) or indented; every fence names its language,
so that a Python block cannot skip this test by having no tag.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
# a fence line: three or more backticks at the start of a line, then the info string
_FENCE = re.compile(r"^(`{3,})(.*)$")


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number of the opening fence, language, code) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, lang, start = m.group(1), m.group(2).strip(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(ticks):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"README.md:{start + 1}: fenced block never closed")
        blocks.append((start + 1, lang, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))
PYTHON = [(line, code) for line, lang, code in BLOCKS if lang.split()[0:1] == ["python"]]


def test_every_fence_names_its_language():
    untagged = [line for line, lang, _ in BLOCKS if not lang]
    assert not untagged, f"README.md: fenced blocks without a language at lines {untagged}"


def test_readme_has_python_blocks():
    assert PYTHON, "README.md has no ```python block (the quickstart)"


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_block_runs_as_pasted(line, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ADALORA_FAST_BACKEND", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    script = tmp_path / f"readme_block_{line}.py"
    script.write_text(code, encoding="utf-8")
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    # the first run of a fresh machine also compiles the C++ kernels (cached afterwards)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=run_dir, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"the ```python block at README.md:{line} failed (exit {proc.returncode}):\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    leftovers = sorted(p.name for p in run_dir.iterdir())
    assert not leftovers, f"the block at README.md:{line} left files in its working directory: {leftovers}"
