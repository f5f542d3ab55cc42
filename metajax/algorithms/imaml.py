"""iMAML (Rajeswaran et al., 2019): implicit meta-gradients of a proximal inner problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from metajax.algorithms._base import (
    MetaLearner,
    call_loss,
    check_inner_rule,
    check_positive_int,
    key_kwarg,
    make_meta_learner,
    query_metrics,
    split_task_key,
)
from metajax.inner import UNROLL, adapt_trace
from metajax.types import LossFn, MetricFn


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def imaml(
    loss_fn: LossFn,
    *,
    inner_steps: int,
    reg: float = 1.0,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    cg_steps: int = 5,
    cg_tol: float = 1e-10,
    unroll: int = UNROLL,
    metric_fn: MetricFn | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
    monitor: bool = True,
) -> MetaLearner:
    """Implicit MAML: meta-gradient by the implicit function theorem, not by unrolling.

    Per task, the inner loop approximately solves the proximal problem
    ``phi = argmin loss_fn(phi, support) + reg/2 ||phi - theta||^2`` by
    ``inner_steps`` steps from ``theta`` (the meta-parameters). It is not
    differentiated: it runs under ``stop_gradient``, so ``meta_grad``'s memory
    does not grow with ``inner_steps``.
    At the solution, ``d phi / d theta = (I + H / reg)^{-1}`` with ``H`` the
    Hessian of the support loss at ``phi``, so the meta-gradient of the query
    loss is ``v = (I + H / reg)^{-1} g`` with ``g = grad loss_fn(phi, query)``.
    ``v`` is found by conjugate gradients (``jax.scipy.sparse.linalg.cg``) on
    Hessian-vector products (``jax.linearize`` of the support gradient: one
    forward-over-reverse pass per CG iteration, no Hessian is formed).

    Exact only when the inner problem is solved exactly and CG converges; CG
    also assumes ``I + H / reg`` is positive definite, i.e. ``reg`` larger than
    minus the most negative Hessian eigenvalue (the paper's strong-convexity
    condition). ``metrics["cg_residual"]`` reports the relative residual
    ``||g - (I + H/reg) v|| / ||g||`` (one more Hessian-vector product) so a
    poor solve is visible.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_steps: inner steps on the proximal objective, ``>= 1``.
      reg: the proximal strength ``lambda > 0``.
      inner_lr: SGD inner learning rate (any form :func:`metajax.adapt` takes).
      inner_optimizer: an optax inner optimizer instead (not differentiated
        here, so no ``eps_root`` needed).
      cg_steps: maximum CG iterations (the paper uses 5).
      cg_tol: CG stops early when the residual falls below ``cg_tol * ||g||``.
      unroll: the longest inner loop run unrolled; longer ones run in a ``lax.scan``
        (True: every loop unrolled, False: every loop scanned); see :func:`metajax.adapt`.
      metric_fn: optional ``metric_fn(params, batch) -> {name: scalar}``.
      task_batch: tasks vmapped at once (None: all); see :func:`metajax.maml`.
      unroll_tasks: unroll the loop over task groups; see :func:`metajax.maml`.
      monitor: also report the query metrics before adaptation.

    Returns:
      A :class:`MetaLearner`; ``meta_params`` are the model's parameters and
      ``adapt`` runs the proximal inner loop.
    """
    inner_steps = check_positive_int("inner_steps", inner_steps)
    cg_steps = check_positive_int("cg_steps", cg_steps)
    check_inner_rule(inner_lr, inner_optimizer)
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg}.")

    def _adapt_trace(params, support, trace_fn=None, *, steps=None, key=None):
        theta = jax.lax.stop_gradient(params)

        def proximal_loss(phi, batch, **kw):
            dist = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), phi, theta)
            return loss_fn(phi, batch, **kw) + 0.5 * reg * sum(jax.tree.leaves(dist))

        adapted, trace = adapt_trace(
            proximal_loss,
            theta,
            support,
            steps=inner_steps if steps is None else steps,
            trace_fn=trace_fn,
            lr=inner_lr,
            optimizer=inner_optimizer,
            first_order=True,
            unroll=unroll,
            **key_kwarg(key),
        )
        return jax.lax.stop_gradient(adapted), trace

    def _adapt(params, support, *, steps=None, key=None):
        return _adapt_trace(params, support, steps=steps, key=key)[0]

    def task_grad(params, task, *, step=None, key=None):
        del step
        inner_key, query_key = split_task_key(key)
        phi = _adapt(params, task.support, key=inner_key)
        loss, g_query = jax.value_and_grad(lambda p: call_loss(loss_fn, p, task.query, query_key))(
            phi
        )
        support_grad = jax.grad(lambda p: call_loss(loss_fn, p, task.support, inner_key))
        _, hvp = jax.linearize(support_grad, phi)

        def matvec(v):
            return jax.tree.map(lambda x, hx: x + hx / reg, v, hvp(v))

        # CG on one flat vector: under vmap the leaves' task axes may sit at different
        # positions (grouped convolutions put it inside a kernel), which cg's device_put
        # of a pytree refuses.
        flat_g, unravel = jax.flatten_util.ravel_pytree(g_query)
        flat_matvec = lambda flat: jax.flatten_util.ravel_pytree(matvec(unravel(flat)))[0]
        flat_v, _ = jax.scipy.sparse.linalg.cg(flat_matvec, flat_g, tol=cg_tol, maxiter=cg_steps)
        v = unravel(flat_v)
        residual = jax.tree.map(jnp.subtract, g_query, matvec(v))
        metrics = query_metrics(
            loss_fn, metric_fn, params, phi, task.query, monitor=monitor, loss_after=loss
        )
        g_sq = _tree_vdot(g_query, g_query)
        tiny = jnp.finfo(g_sq.dtype).tiny  # a zero query gradient is solved exactly
        metrics["cg_residual"] = jnp.sqrt(_tree_vdot(residual, residual) / jnp.maximum(g_sq, tiny))
        return v, metrics

    return make_meta_learner(
        lambda params: params,
        task_grad,
        _adapt,
        _adapt_trace,
        task_batch=task_batch,
        unroll_tasks=unroll_tasks,
    )
