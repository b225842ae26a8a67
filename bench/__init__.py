"""adalora_fast's benchmark against PEFT: ``python -m bench`` (``--quick``, ``--json``).

Side by side, in one process, alternating the contenders: adalora_fast, PEFT AdaLoRA and PEFT LoRA
at the same rank on the same model and data. See ``bench/__main__.py`` for the options and
``bench/cases.py`` for what is measured.
"""
