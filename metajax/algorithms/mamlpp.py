"""MAML++ (Antoniou et al., 2019): learned per-layer per-step rates and the multi-step loss.

Each piece can be switched on alone: ``lslr`` (per-tensor, per-step learned
inner rates), ``multi_step_loss`` (the query loss after every inner step,
weighted, the weights annealed toward the last step over meta-training) and
``first_order_until`` (first order for the first meta-iterations, then second
order).

How the annealing knows the meta-iteration without changing
``meta_grad(meta_params, tasks)``: ``meta_params["step"]`` is a float32 scalar
counting meta-updates. ``meta_grad`` reads it (under ``stop_gradient``: its
gradient is exactly zero) and never changes it; the outer optimizer advances
it. Wrap the outer optimizer with :func:`mamlpp_outer_optimizer`, which sends
every other leaf to your optimizer and adds exactly 1 to the counter per
update, so the usual ``tx.update`` / ``optax.apply_updates`` train step works
unchanged, checkpoints carry the counter, and weight decay or gradient
clipping never touch it. A plain optimizer leaves the counter at 0 (zero
gradient, zero update) and the weights never anneal; ``metrics["mamlpp_step"]``
shows the counter so that mistake is visible. Alternatives rejected: a
``progress`` argument breaks the shared signature; weights as a meta-parameter
leaf would need the same external update with less meaning; the optimizer's
own step count is invisible to ``meta_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metajax.algorithms.base import (
    MetaLearner,
    check_inner_rule,
    check_positive_int,
    check_tasks,
    full_like_rates,
    grad_of_mean_task_loss,
    learned_rate_optimizer,
    query_metrics,
)
from metajax.inner import adapt_trace
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


def mamlpp_outer_optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for every meta-parameter except ``"step"``, which gains exactly 1 per update."""
    count = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(jnp.ones_like, updates), state),
    )

    def labels(meta_params):
        return {k: ("count" if k == "step" else "learn") for k in meta_params}

    return optax.multi_transform({"learn": tx, "count": count}, labels)


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
    unroll: bool = True,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> MetaLearner:
    """MAML++'s learned rates, multi-step loss and first-order warm-up, each optional.

    ``meta_params`` is a dict: ``"params"`` (the model); with ``lslr``,
    ``"lr"``, a tree like params whose leaves have shape ``(inner_steps, 1, ...,
    1)`` (one rate per tensor per step, initialised to ``inner_lr``, or to 1
    scaling ``inner_optimizer``'s updates; never clipped, they may go
    negative); with ``multi_step_loss`` or ``first_order_until``, ``"step"``
    (see the module docstring: advance it with :func:`mamlpp_outer_optimizer`).

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
      unroll: unrolled Python loop (True) or ``lax.scan`` (False).
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      task_batch: tasks vmapped at once (None: all); see :func:`metajax.maml`.
      unroll_tasks: unroll the loop over task groups; see :func:`metajax.maml`.

    Returns:
      A :class:`MetaLearner`; metrics add ``mamlpp_step`` (the counter) when it exists.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    check_inner_rule(inner_lr, inner_optimizer)
    if msl_weights is None:
        msl_weights = partial(mamlpp_weights, inner_steps=inner_steps, anneal_iters=anneal_iters)
    has_step = multi_step_loss or first_order_until > 0

    def init(params):
        meta_params = {"params": params}
        if lslr:
            initial = 1.0 if inner_lr is None else inner_lr
            meta_params["lr"] = full_like_rates(params, initial, steps=inner_steps)
        if has_step:
            meta_params["step"] = jnp.zeros((), jnp.float32)
        return meta_params

    def run(meta_params, support, trace_fn, steps, first_order):
        steps = inner_steps if steps is None else steps
        if lslr:
            if steps > inner_steps:
                raise ValueError(f"LSLR learned rates for {inner_steps} steps, asked for {steps}.")
            rule = dict(optimizer=learned_rate_optimizer(meta_params["lr"], inner_optimizer))
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
            **rule,
        )

    def _adapt_trace(meta_params, support, trace_fn=None, *, steps=None):
        return run(meta_params, support, trace_fn, steps, first_order)

    def _adapt(meta_params, support, *, steps=None):
        return _adapt_trace(meta_params, support, steps=steps)[0]

    def task_loss(meta_params, task, first_order):
        if multi_step_loss:
            weights = jax.lax.stop_gradient(msl_weights(meta_params["step"]))
            if jnp.shape(weights) != (inner_steps,):
                raise ValueError(
                    f"msl_weights gave shape {jnp.shape(weights)}, expected ({inner_steps},)."
                )
            trace_fn = lambda p: loss_fn(p, task.query)
            adapted, losses = run(meta_params, task.support, trace_fn, None, first_order)
            loss = jnp.sum(weights * losses[1:])  # losses[0] is before any step.
        else:
            adapted = run(meta_params, task.support, None, None, first_order)[0]
            loss = loss_fn(adapted, task.query)
        return loss, query_metrics(loss_fn, metric_fn, meta_params["params"], adapted, task.query)

    def meta_grad(meta_params, tasks):
        check_tasks(tasks)

        def grads_with(order_is_first, mp):
            return grad_of_mean_task_loss(
                partial(task_loss, first_order=order_is_first), mp, tasks, task_batch, unroll_tasks
            )

        if first_order_until > 0 and not first_order:
            warm = meta_params["step"] < first_order_until
            g, metrics = jax.lax.cond(
                warm, partial(grads_with, True), partial(grads_with, False), meta_params
            )
        else:
            g, metrics = grads_with(first_order, meta_params)
        if has_step:
            metrics = {**metrics, "mamlpp_step": meta_params["step"]}
        return g, metrics

    return MetaLearner(init=init, meta_grad=meta_grad, adapt=_adapt, adapt_trace=_adapt_trace)
