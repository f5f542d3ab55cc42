"""MAML: exact second-order (grad through grad) and first-order (FOMAML)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from metajax.algorithms._base import (
    MetaLearner,
    call_loss,
    check_inner_rule,
    check_positive_int,
    fixed_inner_loop,
    grad_of_task_loss,
    loss_and_grad,
    make_meta_learner,
    query_metrics,
    split_task_key,
)
from metajax.inner import UNROLL
from metajax.types import Batch, LossFn, MetricFn, PyTree

# task_init(meta_params, support) -> the parameters a task's inner loop starts from.
TaskInit = Callable[[PyTree, Batch], PyTree]


def maml(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: Any = None,
    first_order: bool = False,
    remat: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    monitor: bool = True,
    task_init: TaskInit | None = None,
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
      loss_fn: ``loss_fn(params, batch) -> scalar`` (``key=`` too if you pass keys).
      inner_steps: inner updates per task, ``>= 1``.
      inner_lr: SGD inner learning rate (any form :func:`metajax.adapt` takes).
      first_order: FOMAML.
      remat: rematerialise each inner step in the backward pass.
      inner_optimizer: an optax transformation used as the inner optimizer.
      mask: which parameter leaves adapt (see :func:`metajax.adapt`).
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``,
        reported before and after adaptation (e.g. accuracy).
      task_batch: tasks vmapped at once; None vmaps the whole meta-batch, a
        divisor of it loops over groups with ``lax.scan`` (less memory, a
        little more time). The result is the same mean over tasks.
      unroll_tasks: with ``task_batch``, unroll the loop over task groups
        instead of a ``lax.scan`` (the fast form for ConvNets on a CPU; see
        :func:`metajax.mean_over_tasks`).
      monitor: also report the query loss and metrics before adaptation (one more
        forward pass per task).
      task_init: optional ``task_init(meta_params, support) -> params``, the point each
        task's inner loop starts from (Proto-MAML, :func:`metajax.proto_maml`, sets a head
        from the support's class prototypes); ``loss_fn``, ``mask`` and ``metric_fn`` see
        its output. Both orders differentiate through it: second order exactly, first
        order through ``task_init`` alone (the inner loop's Jacobian taken as the
        identity). None: the inner loop starts at ``meta_params``.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the model's parameters.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)
    rule = dict(
        lr=inner_lr,
        optimizer=inner_optimizer,
        first_order=first_order,
        remat=remat,
        mask=mask,
        unroll=unroll,
    )
    _adapt_from, _adapt_trace_from = fixed_inner_loop(loss_fn, inner_steps, **rule)
    start = (lambda params, support: params) if task_init is None else task_init

    def _adapt(params, support, *, steps=None, key=None):
        return _adapt_from(start(params, support), support, steps=steps, key=key)

    def _adapt_trace(params, support, trace_fn=None, *, steps=None, key=None):
        return _adapt_trace_from(start(params, support), support, trace_fn, steps=steps, key=key)

    def task_loss(params, task, *, step=None, key=None):
        del step
        inner_key, query_key = split_task_key(key)
        initial = start(params, task.support)
        adapted = _adapt_from(initial, task.support, key=inner_key)
        loss = call_loss(loss_fn, adapted, task.query, query_key)
        return loss, query_metrics(
            loss_fn, metric_fn, initial, adapted, task.query, monitor=monitor, loss_after=loss
        )

    def first_order_task_grad(params, task, *, step=None, key=None):
        del step
        inner_key, query_key = split_task_key(key)
        if task_init is None:
            initial, pull_back = params, lambda g: g
        else:
            initial, vjp = jax.vjp(lambda p: task_init(p, task.support), params)
            pull_back = lambda g: vjp(g)[0]
        adapted = jax.lax.stop_gradient(_adapt_from(initial, task.support, key=inner_key))
        loss, grads = loss_and_grad(loss_fn, adapted, task.query, query_key)
        return pull_back(grads), query_metrics(
            loss_fn, metric_fn, initial, adapted, task.query, monitor=monitor, loss_after=loss
        )

    if first_order:
        return make_meta_learner(
            lambda p: p,
            first_order_task_grad,
            _adapt,
            _adapt_trace,
            task_batch=task_batch,
            unroll_tasks=unroll_tasks,
        )
    return make_meta_learner(
        lambda p: p,
        grad_of_task_loss(task_loss),
        _adapt,
        _adapt_trace,
        task_loss=task_loss,
        task_batch=task_batch,
        unroll_tasks=unroll_tasks,
    )
