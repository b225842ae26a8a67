"""The tiny models and adapter tensors the tests share, built in one place.

``tiny_llama`` / ``tiny_gpt2``: Hugging Face models small enough to train for a whole AdaLoRA
schedule in a test, seeded with ``torch.manual_seed(seed)`` just before they are built (``seed=None``
leaves the RNG to the caller), so two calls with the same arguments give the same weights. Keyword
arguments override or add config fields.

``train_steps``: the training loop of the schedule tests (AdamW, ``update_and_allocate`` every step).

``TokenRows``: the HF Trainer's training set in the Trainer tests (rows of random token ids).

``adapter_params``: random A, B, E of every layer of a list of (r, k, d), in the ops' tensor order
(``ops/layout.tensor_index``), and ``LAYOUT_SHAPES``, a list that exercises the flat layout.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# 2 decoder layers, hidden 32 (4 heads, 2 KV heads: grouped-query attention, k_proj/v_proj narrower
# than q_proj), vocabulary 64
LLAMA_SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
GPT2_SIZES = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)

# Several (r, k, d): repeated shapes (one group of 3 layers), r = 0 and r = 1 layers, k != d.
LAYOUT_SHAPES = [(4, 8, 6), (1, 5, 7), (4, 8, 6), (0, 8, 6), (3, 6, 9), (4, 8, 6), (0, 3, 2), (2, 7, 7)]


def tiny_llama(seed: int | None = 0, cls=LlamaForCausalLM, **config):
    """A ``cls`` (default ``LlamaForCausalLM``) of :data:`LLAMA_SIZES`, ``config`` overriding."""
    if seed is not None:
        torch.manual_seed(seed)
    return cls(LlamaConfig(**{**LLAMA_SIZES, **config}))


def tiny_gpt2(seed: int | None = 0, dropout: float | None = None, **config) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` of :data:`GPT2_SIZES` (Conv1D layers), ``config`` overriding; ``dropout``
    sets the residual, embedding and attention dropout (GPT-2's default otherwise)."""
    if seed is not None:
        torch.manual_seed(seed)
    if dropout is not None:
        config = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout, **config}
    return GPT2LMHeadModel(GPT2Config(**{**GPT2_SIZES, **config}))


def train_steps(model, batches, lr: float, forward=None, seed: int | None = None) -> tuple[list, list]:
    """One AdamW step over ``model``'s trainable parameters and one ``update_and_allocate`` per batch of
    token ids (labels = inputs), the forward through ``forward`` (default: ``model``; a compiled
    model, say). ``seed``: ``torch.manual_seed(seed + step)`` before each forward (the dropout seeds
    the ops draw). Returns (losses, rank patterns), one per step."""
    forward = model if forward is None else forward
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, patterns = [], []
    for step, ids in enumerate(batches):
        if seed is not None:
            torch.manual_seed(seed + step)
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
        patterns.append(model.rank_pattern)
    return losses, patterns


class TokenRows(torch.utils.data.Dataset):
    """``n`` rows of ``length`` token ids in [``low``, ``vocab``), drawn from a generator seeded with 0
    (the same rows at every call); item i is ``{"input_ids": row i, "labels": row i}``."""

    def __init__(self, n: int = 24, length: int = 10, low: int = 1, vocab: int = 64):
        self.ids = torch.randint(low, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def adapter_params(shapes, gen: torch.Generator, dtype=torch.float32) -> list:
    """A [r, k], B [d, r], E [r, 1] of every (r, k, d) in ``shapes``, drawn from ``gen``, in ``dtype``."""
    ps = []
    for r, k, d in shapes:
        ps += [torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), torch.randn(r, 1, generator=gen)]
    return [p.to(dtype) for p in ps]
