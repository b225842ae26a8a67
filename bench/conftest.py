"""pytest-benchmark suite set-up: ``pytest bench --benchmark-only``.

Each test times one contender on one case; tests of the same case share a benchmark group, so
pytest-benchmark's table puts adalora_fast, PEFT AdaLoRA and PEFT LoRA side by side. For the
alternating, median-and-ratio comparison use ``python -m bench``.
"""

import warnings

import pytest

from .common import pick_device, setup_threads

warnings.filterwarnings("ignore")
setup_threads()


@pytest.fixture(scope="session")
def device():
    return pick_device()
