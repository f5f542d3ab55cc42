"""Reptile (Nichol et al., 2018): move the initialisation toward adapted weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.algorithms._base import (
    MetaLearner,
    check_inner_rule,
    check_positive_int,
    fixed_inner_loop,
    make_meta_learner,
    query_metrics,
)
from metajax.inner import UNROLL
from metajax.types import LossFn, MetricFn, PyTree


def reptile(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    inner_batch: int | None = None,
    monitor: bool = True,
) -> MetaLearner:
    """Reptile, with its update expressed as a pseudo-gradient.

    ``meta_grad`` returns ``params - mean over tasks of adapt(params, support)``.
    Any optax optimizer then makes the outer step: ``optax.sgd(eps)`` gives the
    paper's batched update ``params + eps * (mean(adapted) - params)``. Nothing
    is differentiated through the inner loop.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_steps: inner updates per task, ``>= 1``.
      inner_lr: SGD inner learning rate (any form :func:`metajax.adapt` takes).
      inner_optimizer: an optax transformation as the inner optimizer (the
        paper used Adam).
      mask: which parameter leaves adapt.
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      task_batch: tasks vmapped at once (None: all); see :func:`metajax.maml`.
      unroll_tasks: unroll the loop over task groups; see :func:`metajax.maml`.
      monitor: also report the query metrics before adaptation.
      inner_batch: in meta-training, each inner step fits the next ``inner_batch``
        support examples instead of the whole support (the paper's mini-batches,
        cycling through the support in epochs); see :func:`support_minibatches`.
        Test-time adaptation (``adapt``) still fits the whole support each step.

    Returns:
      A :class:`MetaLearner`; metrics hold the query loss before and after adaptation.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)

    if inner_batch is not None:
        inner_batch = check_positive_int("inner_batch", inner_batch)
    rule = dict(lr=inner_lr, optimizer=inner_optimizer, first_order=True, mask=mask, unroll=unroll)
    _adapt, _adapt_trace = fixed_inner_loop(loss_fn, inner_steps, **rule)
    _train_adapt, _ = fixed_inner_loop(
        loss_fn, inner_steps, support_per_step=inner_batch is not None, **rule
    )

    def task_grad(params, task, *, step=None, key=None):
        del step
        support = task.support
        if inner_batch is not None:
            support = support_minibatches(support, inner_batch, inner_steps)
        adapted = jax.lax.stop_gradient(_train_adapt(params, support, key=key))
        pseudo_grad = jax.tree.map(lambda p, a: jax.lax.stop_gradient(p) - a, params, adapted)
        return pseudo_grad, query_metrics(
            loss_fn, metric_fn, params, adapted, task.query, monitor=monitor
        )

    return make_meta_learner(
        lambda params: params,
        task_grad,
        _adapt,
        _adapt_trace,
        task_batch=task_batch,
        unroll_tasks=unroll_tasks,
    )


def support_minibatches(support, batch_size: int, steps: int):
    """``steps`` mini-batches of ``batch_size`` support examples, as leaves ``(steps, batch, ...)``.

    Batch ``b`` takes every ``n / batch_size``-th example from ``b`` on, so a class-major
    support (the samplers' layout: all shots of class 0, then class 1, ...) gives batches
    that mix classes; step ``k`` uses batch ``k mod (n / batch_size)``, so more steps than
    batches start another epoch over the same examples.
    """
    sizes = {jnp.shape(x)[0] for x in jax.tree.leaves(support)}
    if len(sizes) != 1:
        raise ValueError(f"support leaves disagree on the number of examples: {sorted(sizes)}.")
    (n,) = sizes
    if n % batch_size:
        raise ValueError(
            f"inner_batch={batch_size} does not divide the {n} support examples "
            "of a meta-training task."
        )
    num_batches = n // batch_size
    order = np.arange(steps) % num_batches

    def split(x):
        batches = jnp.swapaxes(x.reshape(batch_size, num_batches, *x.shape[1:]), 0, 1)
        return batches[order]

    return jax.tree.map(split, support)
