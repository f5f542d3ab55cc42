"""ANIL (Raghu et al., 2020): MAML where only the head adapts in the inner loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from metajax.algorithms._base import MetaLearner
from metajax.algorithms.maml import maml
from metajax.inner import UNROLL
from metajax.paths import mask_by_path
from metajax.types import LossFn, MetricFn


def anil(
    loss_fn: LossFn,
    *,
    head: str | Callable[[str], bool],
    inner_steps: int,
    inner_lr: Any = None,
    first_order: bool = False,
    remat: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    monitor: bool = True,
) -> MetaLearner:
    """Almost No Inner Loop: the inner loop adapts the head, the outer loop learns everything.

    The inner loop updates only the parameter leaves whose path matches
    ``head``; the body (feature extractor) keeps its meta-learned values during
    adaptation. ``meta_grad`` is still with respect to all parameters: the body
    gets the gradient of the query loss through the features the head adapted
    on (second order: through the head's inner gradients too; first order: the
    head's inner-loop Jacobian taken as the identity). The inner gradients and
    their backward pass never reach the body's weights, which is why it is
    cheaper than MAML.

    The mask is built from the params passed to each call (their structure is
    known only then) with :func:`metajax.mask_by_path`; building it is plain
    Python at trace time and costs nothing under ``jit``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      head: a regex searched in each leaf's path (``"head"`` matches
        ``params['head']['kernel']``, path ``head/kernel``; ``r"^2/"`` the third
        layer of a list of layers), or a predicate on the path string. It must
        match at least one leaf.
      inner_steps: inner updates per task, ``>= 1``.
      inner_lr: SGD inner learning rate (any form :func:`metajax.adapt` takes).
      first_order: first-order ANIL.
      remat: rematerialise each inner step in the backward pass.
      inner_optimizer: an optax transformation as the inner optimizer.
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      task_batch: tasks vmapped at once (None: all); see :func:`metajax.maml`.
      unroll_tasks: unroll the loop over task groups; see :func:`metajax.maml`.
      monitor: also report the query metrics before adaptation.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the model's parameters.
    """
    # Validates the hyper-parameters now rather than at the first call.
    maml(loss_fn, inner_steps=inner_steps, inner_lr=inner_lr, inner_optimizer=inner_optimizer)

    def for_params(params) -> MetaLearner:
        return maml(
            loss_fn,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            first_order=first_order,
            remat=remat,
            inner_optimizer=inner_optimizer,
            mask=mask_by_path(params, head),
            unroll=unroll,
            metric_fn=metric_fn,
            task_batch=task_batch,
            unroll_tasks=unroll_tasks,
            monitor=monitor,
        )

    def meta_grad(params, tasks, *, step=None, key=None):
        return for_params(params).meta_grad(params, tasks, step=step, key=key)

    def task_grad(params, task, *, step=None, key=None):
        return for_params(params).task_grad(params, task, step=step, key=key)

    def _adapt(params, support, *, steps=None, key=None):
        return for_params(params).adapt(params, support, steps=steps, key=key)

    def _adapt_trace(params, support, trace_fn=None, *, steps=None, key=None):
        return for_params(params).adapt_trace(params, support, trace_fn, steps=steps, key=key)

    return MetaLearner(lambda params: params, meta_grad, _adapt, _adapt_trace, task_grad)
