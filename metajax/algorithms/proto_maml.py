"""Proto-MAML (Triantafillou et al., 2020): MAML whose linear head starts at the prototypes.

MAML's head starts every task at the same meta-learned (or zero) weights, which know
nothing of the task's classes; ProtoNets classifies at once from the support's class means
but cannot adapt. Proto-MAML writes the nearest-prototype classifier as a linear head on
the embedding, starts each task's inner loop there and adapts head and embedding by
gradient steps: before any step it predicts exactly as ProtoNets does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms._base import MetaLearner, check_positive_int
from metajax.algorithms.maml import maml
from metajax.algorithms.protonets import EmbedFn, class_means, unit
from metajax.inner import UNROLL
from metajax.types import Batch, Params, PyTree

HEAD_DISTANCES = ("squared_euclidean", "centered_cosine")


def prototype_head(
    features: jax.Array,
    labels: jax.Array,
    ways: int,
    distance: str = "squared_euclidean",
    cosine_scale: float = 10.0,
) -> dict[str, jax.Array]:
    """The linear head whose logits (:func:`head_logits`) are ProtoNets' on ``features``.

    ``squared_euclidean``: ``-|f - c_k|^2 = 2 f.c_k - |c_k|^2 - |f|^2``, and the last term is
    the same for every class, so ``kernel = 2 C^T`` and ``bias = -|c_k|^2`` give the same
    softmax (Triantafillou et al.'s initialisation). ``centered_cosine``: ``center`` is the
    mean prototype, ``kernel`` the unit centered prototypes times ``cosine_scale``, ``bias``
    zero: the logits of :func:`metajax.centered_cosine` exactly.

    Args:
      features: ``(n, d)`` support embeddings.
      labels: ``(n,)`` integer classes in ``0 .. ways - 1``.
      ways: classes per task.
      distance: one of :data:`HEAD_DISTANCES`.
      cosine_scale: the logit scale of ``centered_cosine`` (> 0).

    Returns:
      ``{"kernel": (d, ways), "bias": (ways,)}``, plus ``"center": (d,)`` for the cosine.
    """
    _check_distance(distance, cosine_scale)
    prototypes = class_means(features, labels, ways)
    if distance == "squared_euclidean":
        return {"kernel": 2.0 * prototypes.T, "bias": -jnp.sum(prototypes**2, axis=-1)}
    center = jnp.mean(prototypes, axis=0)
    return {
        "center": center,
        "kernel": cosine_scale * unit(prototypes - center).T,
        "bias": jnp.zeros((ways,), features.dtype),
    }


def head_logits(head: dict[str, jax.Array], features: jax.Array) -> jax.Array:
    """``(n, d) -> (n, ways)`` logits of a :func:`prototype_head`-shaped head: ``features @
    kernel + bias``, the features first centered and scaled to unit norm when the head has a
    ``center``."""
    if "center" in head:
        features = unit(features - head["center"])
    return features @ head["kernel"] + head["bias"]


def proto_maml_logits(embed_fn: EmbedFn, adapted: Params, x: Any) -> jax.Array:
    """Class logits of Proto-MAML's adapted parameters ``{"embedding", "head"}``."""
    return head_logits(adapted["head"], embed_fn(adapted["embedding"], x))


def proto_maml(
    embed_fn: EmbedFn,
    *,
    ways: int,
    inner_steps: int,
    inner_lr: Any = None,
    first_order: bool = False,
    distance: str = "squared_euclidean",
    cosine_scale: float = 10.0,
    remat: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    metric_fn: Callable[[Params, Batch], dict[str, jax.Array]] | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    monitor: bool = True,
) -> MetaLearner:
    """Proto-MAML: :func:`metajax.maml` on an embedding and a head set, for every task, from
    the support's class prototypes (:func:`prototype_head`).

    Support and query batches are ``(x, labels)`` with integer ``labels`` in ``0 .. ways -
    1``; the loss is the softmax cross-entropy of :func:`proto_maml_logits`. ``meta_params``
    are the embedding's parameters; each task starts from ``{"embedding": meta_params,
    "head": prototype_head(embed_fn(meta_params, support x), ...)}`` and ``inner_steps``
    gradient steps adapt both. The meta-gradient flows through the prototypes too: exactly
    in second order; in first order (fo-Proto-MAML) through the head's initialisation
    alone, the inner loop's Jacobian taken as the identity.

    ``adapt(meta_params, support)`` returns ``{"embedding", "head"}``; predict with
    ``proto_maml_logits(embed_fn, adapted, x)``. After 0 steps it predicts as ProtoNets
    with the same ``distance``, so ``accuracy_before`` is the nearest-prototype accuracy.

    Args:
      embed_fn: ``embed_fn(params, x) -> (n, d)`` embeddings.
      ways: classes per task, ``>= 2``.
      inner_steps, inner_lr, first_order, remat, inner_optimizer, unroll, task_batch,
        unroll_tasks, monitor: as :func:`metajax.maml`.
      distance: the prototypes' readout the head starts as: ``"squared_euclidean"`` or
        ``"centered_cosine"``.
      cosine_scale: the logit scale of ``"centered_cosine"``.
      mask: which leaves of the embedding's parameters adapt (a prefix tree of bools); the
        head always adapts. None: all.
      metric_fn: optional ``metric_fn(adapted, query) -> {name: scalar}`` besides accuracy.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the embedding's parameters.
    """
    ways = check_positive_int("ways", ways)
    if ways < 2:
        raise ValueError(f"ways must be >= 2, got {ways}.")
    _check_distance(distance, cosine_scale)

    def loss_fn(params, batch):
        x, labels = batch
        logits = proto_maml_logits(embed_fn, params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def metrics(params, batch):
        x, labels = batch
        logits = proto_maml_logits(embed_fn, params, x)
        correct = jnp.argmax(logits, axis=-1) == labels
        out = {"accuracy": jnp.mean(correct.astype(logits.dtype))}
        if metric_fn is not None:
            out.update(metric_fn(params, batch))
        return out

    def task_init(meta_params, support):
        x, labels = support
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(f"labels must be integers, got {jnp.result_type(labels)}.")
        features = embed_fn(meta_params, x)
        head = prototype_head(features, labels, ways, distance, cosine_scale)
        return {"embedding": meta_params, "head": head}

    return maml(
        loss_fn,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        first_order=first_order,
        remat=remat,
        inner_optimizer=inner_optimizer,
        mask=None if mask is None else {"embedding": mask, "head": True},
        unroll=unroll,
        metric_fn=metrics,
        task_batch=task_batch,
        unroll_tasks=unroll_tasks,
        monitor=monitor,
        task_init=task_init,
    )


def _check_distance(distance: str, cosine_scale: float) -> None:
    if distance not in HEAD_DISTANCES:
        raise ValueError(
            f"unknown distance {distance!r} for a prototype head; choose one of "
            f"{', '.join(HEAD_DISTANCES)}."
        )
    if not (cosine_scale > 0 and math.isfinite(cosine_scale)):
        raise ValueError(f"cosine scale must be a finite number > 0, got {cosine_scale}.")
