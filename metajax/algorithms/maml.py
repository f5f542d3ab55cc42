"""MAML: exact second-order (grad through grad) and first-order (FOMAML)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from metajax.algorithms.base import (
    MetaLearner,
    check_inner_rule,
    check_positive_int,
    check_tasks,
    fixed_inner_loop,
    grad_of_mean_task_loss,
    mean_over_task_batches,
    query_metrics,
)
from metajax.types import LossFn, MetricFn, PyTree


def maml(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: Any = None,
    first_order: bool = False,
    remat: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    mask: PyTree | None = None,
    unroll: bool = True,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> MetaLearner:
    """Model-Agnostic Meta-Learning (Finn et al., 2017).

    Second order (default): ``meta_grad`` is the exact gradient, with respect to
    the initial parameters, of the mean over tasks of
    ``loss_fn(adapt(params, support), query)``; ``jax.grad`` differentiates
    through every inner step, Hessian-vector products included.

    First order: the same adaptation; the meta-gradient is the mean over tasks
    of the query-loss gradient at the adapted parameters (the Jacobian of the
    inner loop is taken as the identity), computed without any backward pass
    through the inner loop.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_steps: inner updates per task, ``>= 1``.
      inner_lr: SGD inner learning rate (any form :func:`metajax.adapt` takes).
      first_order: FOMAML.
      remat: rematerialise each inner step in the backward pass.
      inner_optimizer: an optax transformation used as the inner optimizer.
      mask: which parameter leaves adapt (see :func:`metajax.adapt`).
      unroll: unrolled Python loop (True) or ``lax.scan`` (False).
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``,
        reported before and after adaptation (e.g. accuracy).
      task_batch: tasks vmapped at once; None vmaps the whole meta-batch, a
        divisor of it loops over groups with ``lax.scan`` (less memory, a
        little more time). The result is the same mean over tasks.
      unroll_tasks: with ``task_batch``, unroll the loop over task groups
        instead of a ``lax.scan`` (the fast form for ConvNets on a CPU; see
        :func:`metajax.algorithms.base.mean_over_task_batches`).

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
        first_order=first_order,
        remat=remat,
        mask=mask,
        unroll=unroll,
    )

    def task_loss(params, task):
        adapted = _adapt(params, task.support)
        return loss_fn(adapted, task.query), query_metrics(
            loss_fn, metric_fn, params, adapted, task.query
        )

    def second_order_grad(params, tasks):
        return grad_of_mean_task_loss(task_loss, params, tasks, task_batch, unroll_tasks)

    def first_order_grad(params, tasks):
        def one_task(task):
            adapted = jax.lax.stop_gradient(_adapt(params, task.support))
            grads = jax.grad(loss_fn)(adapted, task.query)
            return grads, query_metrics(loss_fn, metric_fn, params, adapted, task.query)

        return mean_over_task_batches(one_task, tasks, task_batch, unroll_tasks)

    def meta_grad(params, tasks):
        check_tasks(tasks)
        return (first_order_grad if first_order else second_order_grad)(params, tasks)

    return MetaLearner(
        init=lambda params: params, meta_grad=meta_grad, adapt=_adapt, adapt_trace=_adapt_trace
    )
