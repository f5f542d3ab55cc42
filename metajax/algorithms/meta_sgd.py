"""Meta-SGD (Li et al., 2017): per-parameter inner learning rates, meta-learned."""

from __future__ import annotations

from typing import Any

import optax

from metajax.algorithms._base import (
    MetaLearner,
    call_loss,
    check_inner_rule,
    check_positive_int,
    full_like_rates,
    grad_of_task_loss,
    key_kwarg,
    learned_rate_optimizer,
    make_meta_learner,
    query_metrics,
    split_task_key,
)
from metajax.inner import UNROLL, adapt_trace
from metajax.types import LossFn, MetricFn, PyTree


def meta_sgd(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool = False,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    monitor: bool = True,
) -> MetaLearner:
    """Meta-SGD: the initialisation and a learning rate per parameter, learned jointly.

    ``meta_params = {"params": params, "lr": rates}`` where ``rates`` has the
    structure and shapes of ``params``. The inner update is
    ``phi <- phi - rates * grad`` (elementwise); with ``inner_optimizer`` it is
    ``phi <- phi + rates * update`` with ``update`` that optimizer's step (it
    must already point downhill, e.g. ``optax.adam(1.0)``), so the rates act as
    learned per-parameter step sizes of any optax rule. ``meta_grad`` returns
    the gradient of the mean query loss after adaptation with respect to both
    ``params`` and ``rates``, through the whole inner loop (``first_order``
    stops the gradient through the inner gradients only; the rates still get
    their gradient ``-sum_k grad_k * dL/dphi``).

    The rates are never clipped or checked for sign: the paper lets them go
    negative (a negative rate ascends that coordinate's support loss, which
    meta-training may find useful). Clip them in your outer optimizer (e.g.
    ``optax.masked`` + a projection) if you want them kept positive.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_steps: inner updates per task, ``>= 1``.
      inner_lr: initial value of every rate (plain SGD inner loop), a scalar.
      inner_optimizer: optax inner optimizer whose updates the rates scale;
        the rates then start at 1.
      first_order: stop the gradient through the inner gradients.
      remat: rematerialise each inner step in the backward pass.
      mask: which parameter leaves adapt (see :func:`metajax.adapt`); frozen
        leaves' rates get zero gradient.
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      task_batch: tasks vmapped at once (None: all); see :func:`metajax.maml`.
      unroll_tasks: unroll the loop over task groups; see :func:`metajax.maml`.
      monitor: also report the query metrics before adaptation.

    Returns:
      A :class:`MetaLearner`. ``adapt(meta_params, support)`` uses the learned rates.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)
    initial_rate = 1.0 if inner_lr is None else inner_lr

    def init(params):
        return {"params": params, "lr": full_like_rates(params, initial_rate)}

    def _adapt_trace(meta_params, support, trace_fn=None, *, steps=None, key=None):
        return adapt_trace(
            loss_fn,
            meta_params["params"],
            support,
            steps=inner_steps if steps is None else steps,
            trace_fn=trace_fn,
            optimizer=learned_rate_optimizer(meta_params["lr"], inner_optimizer),
            first_order=first_order,
            remat=remat,
            mask=mask,
            unroll=unroll,
            **key_kwarg(key),
        )

    def _adapt(meta_params, support, *, steps=None, key=None):
        return _adapt_trace(meta_params, support, steps=steps, key=key)[0]

    def task_loss(meta_params, task, *, step=None, key=None):
        del step
        inner_key, query_key = split_task_key(key)
        adapted = _adapt(meta_params, task.support, key=inner_key)
        loss = call_loss(loss_fn, adapted, task.query, query_key)
        return loss, query_metrics(
            loss_fn,
            metric_fn,
            meta_params["params"],
            adapted,
            task.query,
            monitor=monitor,
            loss_after=loss,
        )

    return make_meta_learner(
        init,
        grad_of_task_loss(task_loss),
        _adapt,
        _adapt_trace,
        task_loss=task_loss,
        task_batch=task_batch,
        unroll_tasks=unroll_tasks,
    )
