"""The "pretrained on all tasks, then fine-tuned" baseline of the MAML paper (section 5.1)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms._base import (
    MetaLearner,
    call_loss,
    check_inner_rule,
    check_positive_int,
    fixed_inner_loop,
    grad_of_task_loss,
    make_meta_learner,
    query_metrics,
    split_task_key,
)
from metajax.inner import UNROLL
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
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    monitor: bool = True,
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
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      monitor: also report the query metrics before fine-tuning.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the model's parameters.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)

    rule = dict(lr=inner_lr, optimizer=inner_optimizer, first_order=True, mask=mask, unroll=unroll)
    _adapt, _adapt_trace = fixed_inner_loop(loss_fn, inner_steps, **rule)

    def task_loss(params, task, *, step=None, key=None):
        del step
        inner_key, pooled_key = split_task_key(key)
        loss = call_loss(loss_fn, params, pool_examples(task.support, task.query), pooled_key)
        # Fine-tuning is monitored only: it shows the curve a meta-learner would be judged on.
        adapted = jax.lax.stop_gradient(_adapt(params, task.support, key=inner_key))
        return loss, query_metrics(loss_fn, metric_fn, params, adapted, task.query, monitor=monitor)

    return make_meta_learner(
        lambda params: params,
        grad_of_task_loss(task_loss),
        _adapt,
        _adapt_trace,
        task_loss=task_loss,
    )
