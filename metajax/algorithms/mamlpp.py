"""MAML++ (Antoniou et al., 2019): learned per-layer per-step rates and the multi-step loss.

Each piece can be switched on alone: ``lslr`` (per-tensor, per-step learned
inner rates), ``multi_step_loss`` (the query loss after every inner step,
weighted, the weights annealed toward the last step over meta-training) and
``first_order_until`` (first order for the first meta-iterations, then second
order).

The annealing and the order switch depend on the outer step, which
``meta_grad(meta_params, tasks, step=...)`` receives as an argument (the train
step passes ``TrainState.step``), so any optax outer optimizer works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms._base import (
    MetaLearner,
    call_loss,
    check_inner_rule,
    check_positive_int,
    check_tasks,
    full_like_rates,
    grad_of_mean_loss,
    key_kwarg,
    learned_rate_optimizer,
    make_meta_learner,
    query_metrics,
    split_task_key,
)
from metajax.inner import UNROLL, adapt_trace
from metajax.types import LossFn, MetricFn, PyTree

WeightsFn = Callable[[jax.Array], jax.Array]


def mamlpp_weights(
    step: jax.Array, inner_steps: int, anneal_iters: int, floor: float = 0.03
) -> jax.Array:
    """The MAML++ multi-step loss weights at meta-iteration ``step``, shape ``(inner_steps,)``.

    Entry ``k`` weighs the query loss after ``k + 1`` inner steps. All start at
    ``1/N``; over ``anneal_iters`` meta-iterations the first ``N - 1`` decay
    linearly to ``floor/N`` and the last grows to ``1 - (N - 1) floor / N``
    (the schedule of the authors' code, in iterations instead of epochs). The
    weights sum to 1 at every step. ``step`` may be traced.
    """
    n = inner_steps
    t = jnp.asarray(step, jnp.float32) / anneal_iters
    rest = jnp.maximum((1.0 - t) / n, floor / n)
    last = jnp.minimum((1.0 + t * (n - 1)) / n, 1.0 - (n - 1) * floor / n)
    return jnp.concatenate([jnp.broadcast_to(rest, (n - 1,)), last[None]])


def mamlpp(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    lslr: bool = True,
    multi_step_loss: bool = True,
    anneal_iters: int = 1000,
    msl_weights: WeightsFn | None = None,
    first_order: bool = False,
    first_order_until: int = 0,
    remat: bool = False,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    monitor: bool = True,
) -> MetaLearner:
    """MAML++'s learned rates, multi-step loss and first-order warm-up, each optional.

    ``meta_params`` is a dict: ``"params"`` (the model); with ``lslr``,
    ``"lr"``, a tree like params whose leaves have shape ``(inner_steps, 1, ...,
    1)`` (one rate per tensor per step, initialised to ``inner_lr``, or to 1
    scaling ``inner_optimizer``'s updates; never clipped, they may go
    negative). Adapting for more steps than ``inner_steps`` (a longer evaluation)
    uses the last step's learned rates for the extra steps.

    ``meta_grad`` and ``task_grad`` need ``step=`` (the outer step, may be traced) when
    ``multi_step_loss`` or ``first_order_until`` is on.

    The per-task objective is ``sum_k w_k loss_fn(phi_k, query)`` over the
    parameters ``phi_k`` after ``k = 1..inner_steps`` steps (multi-step loss) or
    ``loss_fn(phi_N, query)``. ``meta_grad`` differentiates it with respect to
    ``params`` and ``lr`` through the inner loop (second order; the inner
    gradients stopped when first order). ``w`` is not differentiated.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_steps: inner updates per task, ``>= 1``.
      inner_lr: SGD inner rate (a scalar when ``lslr``: the rates' initial value).
      inner_optimizer: optax inner optimizer (its updates scaled by the
        learned rates when ``lslr``).
      lslr: learn per-layer per-step inner rates.
      multi_step_loss: use the weighted query loss after every inner step.
      anneal_iters: meta-iterations over which :func:`mamlpp_weights` anneals.
      msl_weights: ``msl_weights(step) -> (inner_steps,)`` weights, replacing
        the default annealing (e.g. ``lambda s: jnp.ones(n) / n``).
      first_order: first order throughout.
      first_order_until: first order while ``step < first_order_until``, then
        second order (``lax.cond``: both are compiled, one runs).
      remat: rematerialise each inner step in the backward pass.
      mask: which parameter leaves adapt (see :func:`metajax.adapt`).
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      task_batch: tasks vmapped at once (None: all); see :func:`metajax.maml`.
      unroll_tasks: unroll the loop over task groups; see :func:`metajax.maml`.
      monitor: also report the query metrics before adaptation.

    Returns:
      A :class:`MetaLearner`; metrics add ``msl_last_weight`` (the weight of the last
      step's loss) with the multi-step loss and ``second_order`` (1 or 0) with
      ``first_order_until``, so the annealing and the switch are visible in the logs.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)
    if msl_weights is None:
        msl_weights = partial(mamlpp_weights, inner_steps=inner_steps, anneal_iters=anneal_iters)

    needs_step = multi_step_loss or first_order_until > 0

    def init(params):
        meta_params = {"params": params}
        if lslr:
            initial = 1.0 if inner_lr is None else inner_lr
            meta_params["lr"] = full_like_rates(params, initial, steps=inner_steps)
        return meta_params

    def run(meta_params, support, trace_fn, steps, first_order, key=None):
        steps = inner_steps if steps is None else steps
        if lslr:
            rates = meta_params["lr"]
            if steps > inner_steps:  # a longer evaluation: repeat the last step's rates
                extra = steps - inner_steps
                rates = jax.tree.map(
                    lambda r: jnp.concatenate([r, jnp.repeat(r[-1:], extra, axis=0)]), rates
                )
            rule = dict(optimizer=learned_rate_optimizer(rates, inner_optimizer))
        else:
            rule = dict(lr=inner_lr, optimizer=inner_optimizer)
        return adapt_trace(
            loss_fn,
            meta_params["params"],
            support,
            steps=steps,
            trace_fn=trace_fn,
            first_order=first_order,
            remat=remat,
            mask=mask,
            unroll=unroll,
            **key_kwarg(key),
            **rule,
        )

    def _adapt_trace(meta_params, support, trace_fn=None, *, steps=None, key=None):
        return run(meta_params, support, trace_fn, steps, first_order, key)

    def _adapt(meta_params, support, *, steps=None, key=None):
        return _adapt_trace(meta_params, support, steps=steps, key=key)[0]

    def checked_step(step):
        if needs_step and step is None:
            raise ValueError(
                "mamlpp with multi_step_loss or first_order_until needs step= (the "
                "outer step) in meta_grad / task_grad; make_train_step passes it."
            )
        return jnp.zeros((), jnp.int32) if step is None else step

    def task_loss_with(order_is_first):
        def task_loss(meta_params, task, *, step=None, key=None):
            step = checked_step(step)
            inner_key, query_key = split_task_key(key)
            extra = {}
            if multi_step_loss:
                weights = jax.lax.stop_gradient(msl_weights(step))
                if jnp.shape(weights) != (inner_steps,):
                    raise ValueError(
                        f"msl_weights gave shape {jnp.shape(weights)}, expected ({inner_steps},)."
                    )
                trace_fn = lambda p: loss_fn(p, task.query)
                adapted, losses = run(
                    meta_params, task.support, trace_fn, None, order_is_first, inner_key
                )
                loss = jnp.sum(weights * losses[1:])  # losses[0] is before any step.
                extra["msl_last_weight"] = weights[-1]
            else:
                adapted = run(meta_params, task.support, None, None, order_is_first, inner_key)[0]
                loss = call_loss(loss_fn, adapted, task.query, query_key)
            if first_order_until > 0:
                extra["second_order"] = jnp.asarray(0.0 if order_is_first else 1.0)
            metrics = query_metrics(
                loss_fn, metric_fn, meta_params["params"], adapted, task.query, monitor=monitor
            )
            return loss, {**metrics, **extra}

        return task_loss

    def grads_with(order_is_first, meta_params, tasks, step, key):
        return grad_of_mean_loss(
            task_loss_with(order_is_first), meta_params, tasks, step=step, key=key
        )

    def task_grad(meta_params, task, *, step=None, key=None):
        batched = jax.tree.map(lambda x: x[None], task)
        return meta_grad_impl(meta_params, batched, step=step, key=key)

    def meta_grad_impl(meta_params, tasks, *, step=None, key=None):
        step = checked_step(step)
        if first_order_until > 0 and not first_order:
            return jax.lax.cond(
                step < first_order_until,
                lambda mp: grads_with(True, mp, tasks, step, key),
                lambda mp: grads_with(False, mp, tasks, step, key),
                meta_params,
            )
        return grads_with(first_order, meta_params, tasks, step, key)

    learner = make_meta_learner(
        init, task_grad, _adapt, _adapt_trace, task_batch=task_batch, unroll_tasks=unroll_tasks
    )
    if task_batch is not None:
        return learner

    def meta_grad(meta_params, tasks, *, step=None, key=None):
        check_tasks(tasks)  # the whole batch at once: one cond and one backward pass
        return meta_grad_impl(meta_params, tasks, step=step, key=key)

    return learner._replace(meta_grad=meta_grad)
