"""``python -m bench.finetune``, the same as ``python -m bench finetune``."""

import sys

from .cli import main

sys.exit(main())
