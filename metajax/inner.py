"""The inner loop: adapt parameters to one task's support set.

Everything here is differentiable end to end: ``jax.grad`` of a function of
``adapt(...)`` differentiates through every inner gradient step (exact
second-order MAML), through the learning rates (Meta-SGD, MAML++) and through
the state of an optax inner optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax import _remat
from metajax.types import Batch, LossFn, Params, PyTree

TraceFn = Callable[[Params], PyTree]

# The longest inner loop unrolled by default (``unroll``); longer ones are scanned. On the
# standard benchmark the unrolled 5-step second-order step runs about 1.3x faster than the
# scanned one, and it compiles in time that grows with the steps, the scan in time that
# does not (benchmarks/README.md, "inner_loop_default").
UNROLL = 8


def adapt(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    *,
    steps: int,
    lr: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool = False,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    support_per_step: bool = False,
    key: jax.Array | None = None,
) -> Params:
    """Runs ``steps`` inner updates of ``params`` on ``loss_fn(params, support)``.

    Args:
      loss_fn: pure ``loss_fn(params, batch) -> scalar``; with ``key``,
        ``loss_fn(params, batch, key=k) -> scalar``.
      params: the initial parameters (any pytree of float arrays).
      support: one task's support batch (no task axis).
      steps: number of inner updates, ``>= 0``.
      lr: plain SGD learning rate. One of: a scalar; an array of shape
        ``(steps,)`` (one rate per step); or a pytree with the structure of
        ``params`` whose leaves either broadcast to the parameter's shape (per
        tensor or per parameter, Meta-SGD) or have one extra leading axis of
        size ``steps`` (per step and per tensor, MAML++). Differentiable.
      optimizer: any optax ``GradientTransformation`` used as the inner
        optimizer instead of ``lr``; its update is differentiated through.
        Adam's ``sqrt`` has an infinite derivative at zero, so use
        ``optax.adam(..., eps_root=1e-8)`` (or larger) for finite meta-gradients.
      first_order: stop the gradient through the inner gradients (FOMAML):
        ``d adapted / d params`` becomes the identity.
      remat: recompute each inner step in the backward pass instead of storing
        its activations; the backward pass then holds one step's activations
        plus the inner-loop state (parameters, optimizer state) at a few
        points: nested segments of steps, up to three levels scanned (12 states
        at 50 steps, 14 at 100) and two unrolled, each level where it saves
        memory, at the price of one more forward pass of the inner loop per
        level. Unrolled, each checkpoint is a ``jax.custom_vjp``, which supports
        reverse mode (``jax.grad``, ``jax.vjp``, grad of grad) but not
        ``jax.jvp``; pass ``unroll=False`` for forward mode.
      mask: pytree of Python bools with the structure of ``params`` (or a
        prefix of it). Leaves marked False are not adapted (ANIL).
      unroll: the longest inner loop run unrolled: a loop of ``steps <= unroll``
        steps is unrolled in Python (one copy of the step per inner step: the
        fastest program, with a compile time that grows with ``steps``), a
        longer one runs in a ``lax.scan`` (a program, and so a compile time, that
        does not grow with ``steps``; XLA:CPU runs convolutions in loops on a
        slow path, jax-ml/jax#12868). Decided at trace time from ``steps``.
        ``True`` unrolls every loop, ``False`` (like ``0``) scans every loop.
      support_per_step: the support leaves have a leading axis of size ``steps``
        and step ``k`` fits ``support[k]``: a mini-batched inner loop (Reptile
        trains on mini-batches of more examples than a test task has).
      key: optional PRNG key (``jax.random.key`` or a legacy ``uint32[2]``
        key). Inner step ``k`` (from 0) calls ``loss_fn(params, batch,
        key=jax.random.fold_in(key, k))``, so a loss can use dropout; the same
        key gives the same result in every form (scan, unrolled, remat, jit).

    Returns:
      The adapted parameters, same structure and dtypes as ``params``.
    """
    adapted, _ = adapt_trace(
        loss_fn,
        params,
        support,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        first_order=first_order,
        remat=remat,
        mask=mask,
        unroll=unroll,
        trace_fn=None,
        support_per_step=support_per_step,
        key=key,
    )
    return adapted


def adapt_trace(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    *,
    steps: int,
    trace_fn: TraceFn | None,
    lr: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool = False,
    mask: PyTree | None = None,
    unroll: int = UNROLL,
    support_per_step: bool = False,
    key: jax.Array | None = None,
) -> tuple[Params, PyTree]:
    """Like :func:`adapt`, also returning ``trace_fn`` of the parameters after each step.

    The trace has a leading axis of size ``steps + 1``: entry ``k`` is
    ``trace_fn(params after k steps)`` (entry 0 is the initial parameters).
    Used for the MAML++ multi-step loss and for evaluation curves. With
    ``trace_fn=None`` the trace is None.
    """
    _check_steps(steps)
    if support_per_step:
        _check_per_step_support(support, steps)
    if (lr is None) == (optimizer is None):
        raise ValueError("adapt needs exactly one of `lr` (plain SGD) or `optimizer` (optax).")
    unrolled = _unrolls(unroll, steps)
    if key is not None:
        _check_key(key)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(x) for x in leaves]
    flags = _mask_flags(mask, params)
    if not any(flags):
        raise ValueError("mask freezes every parameter: nothing would adapt.")
    lr_at = None if lr is None else _lr_schedule(lr, params, steps, flags)

    def merge(active: list) -> Params:
        it = iter(active)
        return jax.tree.unflatten(treedef, [next(it) if f else x for f, x in zip(flags, leaves)])

    def active_of(full: list) -> list:
        return [x for f, x in zip(flags, full) if f]

    def inner_loss(active: list, k) -> jax.Array:
        batch = jax.tree.map(lambda x: x[k], support) if support_per_step else support
        if key is None:
            loss = loss_fn(merge(active), batch)
        else:
            loss = loss_fn(merge(active), batch, key=jax.random.fold_in(key, k))
        if jnp.ndim(loss) != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(loss)}.")
        return loss

    def inner_grad(active: list, k) -> list:
        grads = jax.grad(inner_loss)(active, k)
        return jax.lax.stop_gradient(grads) if first_order else grads

    if optimizer is None:

        def step(carry, k):
            active = carry
            grads = inner_grad(active, k)
            rates = lr_at(k)
            return [(p - r * g).astype(p.dtype) for p, r, g in zip(active, rates, grads)]

        carry = active_of(leaves)
        get_active = lambda c: c
    else:
        # The optimizer sees the full parameter structure (so optax.masked and
        # multi_transform work); frozen leaves get zero gradients and keep their values.
        def step(carry, k):
            active, opt_state = carry
            full = jax.tree.leaves(merge(active))
            active_grads = iter(inner_grad(active, k))
            grads = [next(active_grads) if f else jnp.zeros_like(x) for f, x in zip(flags, full)]
            grads = jax.tree.unflatten(treedef, grads)
            updates, opt_state = optimizer.update(grads, opt_state, merge(active))
            new_full = jax.tree.leaves(optax.apply_updates(merge(active), updates))
            new_active = [u.astype(p.dtype) for p, u in zip(active, active_of(new_full))]
            return new_active, opt_state

        carry = (active_of(leaves), optimizer.init(params))
        get_active = lambda c: c[0]

    trace = (lambda c: trace_fn(merge(get_active(c)))) if trace_fn is not None else None
    run = _remat.run_unrolled if unrolled else _remat.run_scanned
    carry, traces = run(step, carry, steps, remat=remat, trace=trace)
    return merge(get_active(carry)), traces


def _unrolls(unroll: Any, steps: int) -> bool:
    """Whether a loop of ``steps`` steps runs unrolled under the ``unroll`` option."""
    if isinstance(unroll, (bool, np.bool_)):
        return bool(unroll)
    if not isinstance(unroll, (int, np.integer)):
        raise TypeError(f"unroll must be an int or a bool, got {type(unroll).__name__}.")
    if unroll < 0:
        raise ValueError(f"unroll must be >= 0 (the longest loop unrolled), got {unroll}.")
    return steps <= unroll


def _check_key(key: Any) -> None:
    dtype, shape = getattr(key, "dtype", None), jnp.shape(key)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"key must be a single PRNG key, got a key array of shape {shape}.")
    elif not (dtype == jnp.uint32 and shape == (2,)):
        raise TypeError(
            f"key must be a PRNG key (jax.random.key(seed)), got {type(key).__name__} "
            f"with dtype {dtype} and shape {shape}."
        )


def _check_per_step_support(support: Batch, steps: int) -> None:
    for x in jax.tree.leaves(support):
        if jnp.ndim(x) == 0 or jnp.shape(x)[0] != steps:
            raise ValueError(
                f"support_per_step: every support leaf needs a leading axis of size "
                f"steps={steps}, got shape {jnp.shape(x)}."
            )


def _check_steps(steps: Any) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise TypeError(f"steps must be a Python int, got {type(steps).__name__}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")


def _check_learning_rate(name: str, lr: Any) -> None:
    """Raises if a concrete learning rate is negative or not finite (traced ones pass)."""
    for leaf in jax.tree.leaves(lr):
        if isinstance(leaf, jax.core.Tracer):
            continue
        value = np.asarray(leaf)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} must be finite, got {value}.")
        if np.any(value < 0):
            raise ValueError(f"{name} must be non-negative, got {value}.")


def _mask_flags(mask: PyTree | None, params: Params) -> list[bool]:
    n = len(jax.tree.leaves(params))
    if mask is None:
        return [True] * n

    def expand(m, sub):
        if isinstance(m, jax.core.Tracer) or not isinstance(m, (bool, np.bool_)):
            raise TypeError(f"mask leaves must be Python bools, got {type(m).__name__}.")
        return jax.tree.map(lambda _: bool(m), sub)

    try:
        full = jax.tree.map(expand, mask, params)
    except ValueError as e:
        raise ValueError(f"mask structure does not match params (or a prefix of it): {e}") from e
    return jax.tree.leaves(full)


def _lr_schedule(lr: Any, params: Params, steps: int, flags: list[bool]):
    """Returns ``lr_at(k) -> [rate per adapted leaf]``, ``k`` a Python or traced int."""
    _check_learning_rate("lr", lr)
    leaves = jax.tree.leaves(params)
    active = [x for f, x in zip(flags, leaves) if f]
    lr_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(lr))
    params_is_leaf = jax.tree_util.treedef_is_leaf(jax.tree.structure(params))

    if lr_is_leaf and jnp.ndim(lr) == 0:
        return lambda k: [lr] * len(active)
    if lr_is_leaf and not params_is_leaf:
        if jnp.shape(lr) != (steps,):
            raise ValueError(
                f"a single-array lr must be a scalar or have shape (steps,) = ({steps},), "
                f"got {jnp.shape(lr)}; per-parameter rates take a pytree like params."
            )
        return lambda k: [lr[k]] * len(active)
    if jax.tree.structure(lr) != jax.tree.structure(params):
        raise ValueError(
            "lr pytree must have the structure of params: "
            f"{jax.tree.structure(lr)} vs {jax.tree.structure(params)}."
        )
    rates = [r for f, r in zip(flags, jax.tree.leaves(lr)) if f]
    for r, p in zip(rates, active):
        if jnp.ndim(r) == jnp.ndim(p) + 1:  # per step: see _rate_at
            if jnp.shape(r)[0] != steps:
                raise ValueError(f"per-step lr leaf has {jnp.shape(r)[0]} steps, expected {steps}.")
            trailing = jnp.shape(r)[1:]
        else:
            trailing = jnp.shape(r)
        try:
            np.broadcast_shapes(trailing, jnp.shape(p))
        except ValueError:
            raise ValueError(
                f"lr leaf of shape {jnp.shape(r)} does not broadcast to its parameter's "
                f"shape {jnp.shape(p)}."
            ) from None
    return lambda k: [_rate_at(r, p, k) for r, p in zip(rates, active)]


def _rate_at(rate: Any, param: Any, k: Any) -> jax.Array:
    """One leaf's learning rate at inner step ``k``: a rate with one more axis than its
    parameter is per step (indexed by ``k``); any other rate broadcasts to the parameter."""
    rate = jnp.asarray(rate)  # host (numpy) rates cannot be indexed by a traced k
    return rate[k] if rate.ndim == jnp.ndim(param) + 1 else rate
