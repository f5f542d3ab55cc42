"""Prototypical Networks (Snell et al., 2017): a metric-based baseline, no inner gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax.algorithms._base import (
    MetaLearner,
    check_positive_int,
    grad_of_task_loss,
    make_meta_learner,
)
from metajax.types import Batch, Params

# embed_fn(params, x) -> (n, d) embeddings of n examples.
EmbedFn = Callable[[Params, jax.Array], jax.Array]
# distance_fn(queries (n, d), prototypes (ways, d)) -> (n, ways) distances.
DistanceFn = Callable[[jax.Array, jax.Array], jax.Array]


class Prototypes(NamedTuple):
    """What ProtoNets' ``adapt`` returns: the embedding parameters and one
    prototype per class, shape ``(ways, d)``. A pytree; classify queries with
    :func:`protonet_logits`."""

    params: Params
    prototypes: jax.Array


def squared_euclidean(queries: jax.Array, prototypes: jax.Array) -> jax.Array:
    """``(n, d), (ways, d) -> (n, ways)`` squared Euclidean distances, the paper's choice."""
    return jnp.sum((queries[:, None, :] - prototypes[None, :, :]) ** 2, axis=-1)


def centered_cosine(scale: float = 10.0) -> DistanceFn:
    """``(n, d), (ways, d) -> (n, ways)`` distances ``-scale * cos(q - c, p - c)``, with ``c``
    the task's mean prototype (the mean support embedding when classes are balanced).

    A language model's states share a large common direction that dominates both Euclidean
    distances and plain cosines; subtracting the task's mean leaves what tells its classes
    apart. ``scale`` (> 0) stretches the cosines' [-1, 1] into logits a softmax can train on.
    """
    if not scale > 0:
        raise ValueError(f"cosine scale must be > 0, got {scale}.")

    def distance(queries: jax.Array, prototypes: jax.Array) -> jax.Array:
        center = jnp.mean(prototypes, axis=0)
        return -scale * (unit(queries - center) @ unit(prototypes - center).T)

    return distance


DISTANCES = ("squared_euclidean", "centered_cosine")


def distance_by_name(distance: str | DistanceFn, cosine_scale: float = 10.0) -> DistanceFn:
    """The distance function ``distance`` names (one of :data:`DISTANCES`); a callable is
    returned as is."""
    if callable(distance):
        return distance
    if distance == "squared_euclidean":
        return squared_euclidean
    if distance == "centered_cosine":
        return centered_cosine(cosine_scale)
    raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}.")


def unit(x: jax.Array) -> jax.Array:
    """``x`` scaled to unit norm along its last axis (a zero vector stays zero)."""
    # rsqrt of (norm^2 + tiny) keeps the gradient finite at a zero vector (one prototype
    # equal to the center, e.g. 1-shot tasks with two identical sentences).
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def class_means(embeddings: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    """Mean embedding per class, ``(n, d), (n,) -> (ways, d)``; a class absent from
    the support set gets the zero vector (its count is clamped to 1)."""
    one_hot = jax.nn.one_hot(labels, ways, dtype=embeddings.dtype)
    counts = jnp.maximum(jnp.sum(one_hot, axis=0), 1.0)
    return (one_hot.T @ embeddings) / counts[:, None]


def protonet_logits(
    embed_fn: EmbedFn, adapted: Prototypes, x: jax.Array, distance_fn: DistanceFn | None = None
) -> jax.Array:
    """Class logits ``-distance(embed(x), prototypes)``, shape ``(n, ways)``."""
    distance_fn = squared_euclidean if distance_fn is None else distance_fn
    return -distance_fn(embed_fn(adapted.params, x), adapted.prototypes)


def protonets(
    embed_fn: EmbedFn,
    *,
    ways: int,
    distance: str | DistanceFn = "squared_euclidean",
    cosine_scale: float = 10.0,
    metric_fn: Callable[[Prototypes, Batch], dict[str, jax.Array]] | None = None,
) -> MetaLearner:
    """Prototypical Networks on the shared task interface.

    Support and query batches are ``(x, labels)`` with integer ``labels`` in
    ``0 .. ways - 1`` (traced, so ``ways`` must be given statically). For one
    task, prototypes are the class means of the support embeddings; query
    logits are ``-squared Euclidean distance`` to each prototype (or
    ``-distance_fn``); the loss is the softmax cross-entropy on the query
    labels. ``meta_grad`` is the gradient of its mean over tasks with respect to
    the embedding parameters, through the prototypes.

    ``adapt(params, support)`` returns :class:`Prototypes` (params plus class
    prototypes; "adaptation" is computing them, there are no inner steps);
    predict with ``protonet_logits(embed_fn, adapted, x)``. ``steps`` must be
    None or 0; ``adapt_trace`` returns a trace of length 1 (``steps + 1`` with
    ``steps = 0``): ``trace_fn`` of that :class:`Prototypes`.

    Metrics: ``loss_after`` / ``accuracy_after`` on the query. Without
    prototypes there is no classifier, so ``loss_before`` / ``accuracy_before``
    are those of the uniform (chance) prediction, ``log(ways)`` and ``1/ways``:
    the "before" a nearest-prototype classifier improves upon.

    Args:
      embed_fn: ``embed_fn(params, x) -> (n, d)`` embeddings.
      ways: number of classes per task, ``>= 2``.
      distance: ``"squared_euclidean"`` (the paper's), ``"centered_cosine"`` (see
        :func:`centered_cosine`) or a function ``(queries (n, d), prototypes (ways, d)) ->
        (n, ways)``.
      cosine_scale: the logit scale of ``"centered_cosine"``.
      metric_fn: optional ``metric_fn(adapted, query) -> {name: scalar}``,
        reported as ``{name}_after``.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the embedding parameters.
    """
    ways = check_positive_int("ways", ways)
    distance_fn = distance_by_name(distance, cosine_scale)
    if ways < 2:
        raise ValueError(f"ways must be >= 2, got {ways}.")

    def _adapt(params, support, *, steps=None, key=None):
        del key  # no inner loop
        if steps not in (None, 0):
            raise ValueError(f"ProtoNets has no inner steps; steps must be None or 0, got {steps}.")
        x, labels = support
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(f"labels must be integers, got {jnp.result_type(labels)}.")
        return Prototypes(params, class_means(embed_fn(params, x), labels, ways))

    def _adapt_trace(params, support, trace_fn=None, *, steps=None, key=None):
        adapted = _adapt(params, support, steps=steps)
        trace = None if trace_fn is None else jax.tree.map(lambda t: t[None], trace_fn(adapted))
        return adapted, trace

    def task_loss(params, task, *, step=None, key=None):
        del step, key
        adapted = _adapt(params, task.support)
        x, labels = task.query
        logits = protonet_logits(embed_fn, adapted, x, distance_fn)
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)
        loss = jnp.mean(losses)
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
        metrics = {
            "loss_before": jnp.asarray(math.log(ways), loss.dtype),
            "loss_after": jax.lax.stop_gradient(loss),
            "accuracy_before": jnp.asarray(1.0 / ways, loss.dtype),
            "accuracy_after": accuracy,
        }
        if metric_fn is not None:
            extra = metric_fn(jax.lax.stop_gradient(adapted), task.query)
            metrics.update({f"{k}_after": v for k, v in extra.items()})
        return loss, metrics

    return make_meta_learner(
        lambda params: params,
        grad_of_task_loss(task_loss),
        _adapt,
        _adapt_trace,
        task_loss=task_loss,
    )
