"""Loss helpers: each turns ``apply_fn(params, x)`` into ``loss_fn(params, batch) -> scalar``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[object, jax.Array], jax.Array]


def mse_loss(apply_fn: ApplyFn):
    """Mean squared error on ``batch = (x, y)``; float32 accumulation."""

    def loss_fn(params, batch):
        x, y = batch
        pred = apply_fn(params, x)
        if pred.shape != y.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {y.shape}.")
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - y.astype(jnp.float32)))

    return loss_fn


def classification_loss(apply_fn: ApplyFn):
    """Softmax cross-entropy on ``batch = (x, labels)`` with integer labels."""

    def loss_fn(params, batch):
        x, labels = batch
        logits = apply_fn(params, x).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss_fn


def accuracy_metric(apply_fn: ApplyFn):
    """``metric_fn(params, (x, labels)) -> {"accuracy": fraction correct}``."""

    def metric_fn(params, batch):
        x, labels = batch
        logits = apply_fn(params, x)
        return {"accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}

    return metric_fn
