"""The "pretrained on all tasks, then fine-tuned" baseline of the MAML paper (section 5.1)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms.base import (
    MetaLearner,
    check_inner_rule,
    check_positive_int,
    check_tasks,
    fixed_inner_loop,
    mean_over_tasks,
    query_metrics,
)
from metajax.types import Batch, LossFn, MetricFn, PyTree


def pool_examples(support: Batch, query: Batch) -> Batch:
    """One task's support and query concatenated along the example axis (axis 0 of each leaf)."""
    return jax.tree.map(lambda s, q: jnp.concatenate([s, q], axis=0), support, query)


def pretrain(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    mask: PyTree | None = None,
    unroll: bool = True,
    metric_fn: MetricFn | None = None,
) -> MetaLearner:
    """Joint pretraining on every task, then plain fine-tuning: the baseline meta-learning beats.

    ``meta_grad`` is the ordinary gradient of the mean over tasks of
    ``loss_fn(params, support + query)`` (each task's two sets pooled into one
    batch): no adaptation happens during training, so the outer optimizer fits
    one model to the mixture of all tasks. ``adapt`` fine-tunes that model on a
    new task's support set with the same inner rule and budget a meta-learner
    gets (``inner_steps`` SGD steps at ``inner_lr``, or ``inner_optimizer``);
    comparing the two after equal adaptation isolates what meta-learning the
    initialisation buys.

    Metrics: ``loss_before`` / ``loss_after`` are the query loss before and
    after that fine-tuning (computed for monitoring, not differentiated), so the
    learning curves read like a meta-learner's.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_steps: fine-tuning steps per task, ``>= 1``.
      inner_lr: SGD fine-tuning learning rate (any form :func:`metajax.adapt` takes).
      inner_optimizer: an optax transformation as the fine-tuning optimizer.
      mask: which parameter leaves fine-tune (see :func:`metajax.adapt`).
      unroll: unrolled Python loop (True) or ``lax.scan`` (False).
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the model's parameters.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)

    _adapt, _adapt_trace = fixed_inner_loop(
        loss_fn,
        inner_steps,
        lr=inner_lr,
        optimizer=inner_optimizer,
        first_order=True,
        mask=mask,
        unroll=unroll,
    )

    def meta_grad(params, tasks):
        check_tasks(tasks)

        def mean_pooled_loss(p):
            losses = jax.vmap(lambda t: loss_fn(p, pool_examples(t.support, t.query)))(tasks)
            return jnp.mean(losses)

        grads = jax.grad(mean_pooled_loss)(params)

        def one_task(task):
            adapted = jax.lax.stop_gradient(_adapt(params, task.support))
            return query_metrics(loss_fn, metric_fn, params, adapted, task.query)

        return grads, mean_over_tasks(jax.vmap(one_task)(tasks))

    return MetaLearner(
        init=lambda params: params, meta_grad=meta_grad, adapt=_adapt, adapt_trace=_adapt_trace
    )
