"""Benchmark cases: a model, its loss, and a fixed meta-batch of tasks.

The standard case: a decoder Transformer with 2 layers, width 128, 4 heads,
MLP 512, sequence length 32 and vocabulary 64; 8 tasks of 5 support and 15 query
sequences; 5 inner SGD steps at 0.1; outer Adam. Plus the Omniglot ConvNet 5-way and
20-way 1-shot cases on images of the Omniglot episode shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models import (
    ConvNet,
    ConvNetConfig,
    TransformerConfig,
    TransformerLM,
    classification_loss,
    next_token_loss,
)
from metajax.types import Task


@dataclasses.dataclass
class Case:
    name: str
    params: Any
    loss_fn: Callable
    tasks: Task
    inner_lr: float
    inner_steps: int


def transformer_case(
    *,
    width=128,
    depth=2,
    heads=4,
    mlp_width=512,
    seq=32,
    vocab=64,
    tasks=8,
    support=5,
    query=15,
    inner_steps=5,
    inner_lr=0.1,
    dtype=jnp.float32,
    seed=0,
    name="transformer",
) -> Case:
    """Random token sequences of ``seq + 1`` tokens (the model sees ``seq`` positions)."""
    cfg = TransformerConfig(
        vocab_size=vocab,
        width=width,
        depth=depth,
        heads=heads,
        mlp_width=mlp_width,
        max_len=seq,
        dtype=dtype,
    )
    model = TransformerLM(cfg)
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq), jnp.int32))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(tasks, support + query, seq + 1), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    batch = Task(
        support=(tokens[:, :support], mask[:, :support]),
        query=(tokens[:, support:], mask[:, support:]),
    )
    return Case(
        name, params, next_token_loss(model.apply), jax.device_put(batch), inner_lr, inner_steps
    )


def convnet_case(
    *,
    ways=5,
    shots=1,
    queries=15,
    tasks=32,
    inner_steps=1,
    inner_lr=0.4,
    filters=64,
    seed=0,
    name=None,
) -> Case:
    """The MAML paper's Omniglot ConvNet on random 28x28 images of the episode shape."""
    model = ConvNet(ConvNetConfig(ways=ways, filters=filters))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1), jnp.float32))
    rng = np.random.default_rng(seed)

    def split(per_class):
        x = rng.random((tasks, ways * per_class, 28, 28, 1), dtype=np.float32)
        y = np.tile(np.repeat(np.arange(ways, dtype=np.int32), per_class), (tasks, 1))
        return x, y

    batch = Task(support=split(shots), query=split(queries))
    return Case(
        name or f"convnet_{ways}w{shots}s",
        params,
        classification_loss(model.apply),
        jax.device_put(batch),
        inner_lr,
        inner_steps,
    )
