"""Loss helpers: each turns ``apply_fn(params, x)`` into ``loss_fn(params, batch) -> scalar``."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

ApplyFn = Callable[[object, jax.Array], jax.Array]


def _at_least_f32(dtype):
    # float32 accumulation for bf16/f32 models; float64 models stay float64 (exactness tests).
    return jnp.promote_types(jnp.float32, dtype)


def mse_loss(apply_fn: ApplyFn):
    """Mean squared error on ``batch = (x, y)``; float32 accumulation (float64 stays float64)."""

    def loss_fn(params, batch):
        x, y = batch
        pred = apply_fn(params, x)
        if pred.shape != y.shape:
            raise ValueError(f"prediction shape {pred.shape} != target shape {y.shape}.")
        acc = _at_least_f32(jnp.result_type(pred, y))
        return jnp.mean(jnp.square(pred.astype(acc) - y.astype(acc)))

    return loss_fn


def classification_loss(apply_fn: ApplyFn):
    """Softmax cross-entropy on ``batch = (x, labels)`` with integer labels."""

    def loss_fn(params, batch):
        x, labels = batch
        logits = apply_fn(params, x)
        logits = logits.astype(_at_least_f32(logits.dtype))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss_fn


def accuracy_metric(apply_fn: ApplyFn):
    """``metric_fn(params, (x, labels)) -> {"accuracy": fraction correct}``."""

    def metric_fn(params, batch):
        x, labels = batch
        logits = apply_fn(params, x)
        return {"accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}

    return metric_fn


def _next_token_terms(apply_fn: ApplyFn, params, batch):
    """Per-position cross-entropy (nats), weights and logits of next-token prediction."""
    tokens, mask = batch
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(
            f"next-token batch needs tokens and mask of one (batch, seq) shape, got "
            f"{tokens.shape} and {mask.shape}."
        )
    # Position t of tokens[:, :-1] predicts tokens[:, t + 1]; the last token predicts nothing,
    # so it is not fed (a sequence may be max_len + 1 tokens long).
    logits = apply_fn(params, tokens[:, :-1])
    logits = logits.astype(_at_least_f32(logits.dtype))
    targets = tokens[:, 1:]
    weights = mask[:, 1:].astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return ce, weights, logits


def _weighted_mean(values, weights):
    # max(., 1): a batch with no real target gives 0, not NaN.
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def next_token_loss(apply_fn: ApplyFn):
    """Next-token cross-entropy (nats) on ``batch = (tokens, mask)``.

    ``tokens`` is ``(batch, seq)`` int, ``mask`` ``(batch, seq)`` bool or 0/1, True on real
    tokens. ``apply_fn(params, tokens[:, :-1])`` must give ``(batch, seq - 1, vocab)`` logits
    (a causal LM). The loss is the mean, over predicted positions whose target
    ``tokens[:, t + 1]`` is a real token, of ``-log p(target)``: pads are never targets, so
    with right padding they change nothing. Accumulated in float32 (float64 under x64).
    """

    def loss_fn(params, batch):
        ce, weights, _ = _next_token_terms(apply_fn, params, batch)
        return _weighted_mean(ce, weights)

    return loss_fn


def bits_per_token(apply_fn: ApplyFn):
    """``loss_fn(params, (tokens, mask))``: :func:`next_token_loss` in bits, ``nats / ln 2``.

    Bits per predicted token, end-of-sequence tokens included. For bits per UTF-8 byte of a
    byte-level model (the end token's information over byte targets only) see
    :func:`bits_per_byte_metric`.
    """
    nats = next_token_loss(apply_fn)
    return lambda params, batch: nats(params, batch) / math.log(2.0)


def next_token_metrics(apply_fn: ApplyFn):
    """``metric_fn(params, (tokens, mask)) -> {"bits_per_token", "accuracy"}``.

    Both are means over real targets, as in :func:`next_token_loss`; ``accuracy`` is the
    fraction of real targets that are the argmax of the logits.
    """

    def metric_fn(params, batch):
        ce, weights, logits = _next_token_terms(apply_fn, params, batch)
        correct = (jnp.argmax(logits, axis=-1) == batch[0][:, 1:]).astype(weights.dtype)
        return {
            "bits_per_token": _weighted_mean(ce, weights) / math.log(2.0),
            "accuracy": _weighted_mean(correct, weights),
        }

    return metric_fn


def bits_per_byte_metric(apply_fn: ApplyFn, byte_ids: int = 256):
    """``metric_fn(params, (tokens, mask)) -> {"bits_per_byte"}`` of a byte-level LM.

    Every real target's information in bits (an end token's too: ending a word is
    information) over the number of real targets that are bytes, ids below ``byte_ids``.
    Same batch and model as :func:`next_token_loss`.
    """

    def metric_fn(params, batch):
        ce, weights, _ = _next_token_terms(apply_fn, params, batch)
        num_bytes = jnp.maximum(jnp.sum(weights * (batch[0][:, 1:] < byte_ids)), 1.0)
        return {"bits_per_byte": jnp.sum(ce * weights) / (math.log(2.0) * num_bytes)}

    return metric_fn


def next_token_byte_metrics(apply_fn: ApplyFn, byte_lengths):
    """``metric_fn(params, (tokens, mask)) -> {"bits_per_token", "accuracy", "bits_per_byte"}``
    of an LM over a subword vocabulary.

    ``bits_per_token`` and ``accuracy`` as :func:`next_token_metrics`. ``bits_per_byte`` is, as
    :func:`bits_per_byte_metric`, every real target's information in bits (an end token's
    too) over the UTF-8 bytes those targets spell: ``byte_lengths[id]`` bytes for token ``id``
    (0 for special tokens), so it compares across tokenizers and with byte-level models.

    Args:
      apply_fn: as :func:`next_token_loss`.
      byte_lengths: int ``(vocab,)``: the UTF-8 bytes each token id stands for.
    """
    byte_lengths = jnp.asarray(byte_lengths, jnp.int32)
    if byte_lengths.ndim != 1:
        raise ValueError(f"byte_lengths must be one length per token id, got {byte_lengths.shape}.")

    def metric_fn(params, batch):
        ce, weights, logits = _next_token_terms(apply_fn, params, batch)
        targets = batch[0][:, 1:]
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(weights.dtype)
        num_bytes = jnp.sum(weights * byte_lengths[targets].astype(weights.dtype))
        return {
            "bits_per_token": _weighted_mean(ce, weights) / math.log(2.0),
            "accuracy": _weighted_mean(correct, weights),
            # max(., 1) as _weighted_mean: a batch spelling no byte gives its bits, not NaN.
            "bits_per_byte": jnp.sum(ce * weights) / (math.log(2.0) * jnp.maximum(num_bytes, 1.0)),
        }

    return metric_fn
