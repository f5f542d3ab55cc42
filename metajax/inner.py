"""The inner loop: adapt parameters to one task's support set.

Everything here is differentiable end to end: ``jax.grad`` of a function of
``adapt(...)`` differentiates through every inner gradient step (exact
second-order MAML), through the learning rates (Meta-SGD, MAML++) and through
the state of an optax inner optimizer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.types import Batch, LossFn, Params, PyTree

TraceFn = Callable[[Params], PyTree]


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
    unroll: bool = True,
    support_per_step: bool = False,
) -> Params:
    """Runs ``steps`` inner updates of ``params`` on ``loss_fn(params, support)``.

    Args:
      loss_fn: pure ``loss_fn(params, batch) -> scalar``.
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
      remat: rematerialise each inner step in the backward pass, so its memory
        does not hold the activations of every step. With ``unroll=False`` the
        steps are also checkpointed in segments of ``ceil(sqrt(steps))``, so the
        adapted parameters are kept O(sqrt(steps)) times, not ``steps`` times.
      mask: pytree of Python bools with the structure of ``params`` (or a
        prefix of it). Leaves marked False are not adapted (ANIL).
      unroll: True unrolls the loop in Python (faster to run, slower to compile
        for many steps); False uses ``lax.scan``.
      support_per_step: the support leaves have a leading axis of size ``steps``
        and step ``k`` fits ``support[k]``: a mini-batched inner loop (Reptile
        trains on mini-batches of more examples than a test task has).

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
    unroll: bool = True,
    support_per_step: bool = False,
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
        loss = loss_fn(merge(active), batch)
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

    if remat:
        # Unrolled steps index rates with a Python int: keep it static.
        step = jax.checkpoint(step, static_argnums=(1,) if unroll else ())
    trace = (lambda c: trace_fn(merge(get_active(c)))) if trace_fn is not None else None

    if unroll:
        traces = [trace(carry)] if trace else []
        for k in range(steps):
            carry = step(carry, k)
            if trace:
                traces.append(trace(carry))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *traces) if trace else None
    else:

        def body(c, k):
            c = step(c, k)
            return c, (trace(c) if trace else None)

        first = trace(carry) if trace else None
        carry, rest = _scan_steps(body, carry, steps, nested=remat)
        stacked = (
            jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest) if trace else None
        )
    return merge(get_active(carry)), stacked


def _scan_steps(body: Callable, carry: Any, steps: int, *, nested: bool) -> tuple[Any, Any]:
    """``lax.scan(body, carry, arange(steps))``; ``nested`` checkpoints segments of steps too.

    With per-step checkpoints alone the backward pass still keeps every step's
    input carry (the adapted parameters), so memory grows linearly with
    ``steps``. Two levels (Griewank's sqrt checkpointing) keep one carry per
    segment of ``ceil(sqrt(steps))`` steps, plus the carries of the one segment
    being differentiated: O(sqrt(steps)) carries, for one more forward pass of
    the inner loop.
    """
    seg = math.isqrt(steps - 1) + 1 if steps > 1 else 1
    if not nested or seg >= steps:
        return jax.lax.scan(body, carry, jnp.arange(steps))
    n_seg, tail = divmod(steps, seg)
    segment = jax.checkpoint(lambda c, ks: jax.lax.scan(body, c, ks))
    carry, outs = jax.lax.scan(segment, carry, jnp.arange(n_seg * seg).reshape(n_seg, seg))
    outs = jax.tree.map(lambda x: x.reshape(n_seg * seg, *x.shape[2:]), outs)
    if tail:
        carry, more = jax.lax.scan(body, carry, jnp.arange(n_seg * seg, steps))
        outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, more)
    return carry, outs


def mask_by_path(params: Params, pattern: str | Callable[[str], bool]) -> PyTree:
    """Builds an ``adapt`` mask from parameter paths.

    Args:
      params: the parameter pytree.
      pattern: a regex searched in each leaf's path (``"head"`` matches
        ``params['head']['kernel']``, whose path reads ``head/kernel``), or a
        predicate on that path string.

    Returns:
      A pytree of Python bools, True where the leaf adapts.
    """
    match = pattern if callable(pattern) else (lambda path: re.search(pattern, path) is not None)
    return jax.tree_util.tree_map_with_path(lambda kp, _: bool(match(path_str(kp))), params)


def path_str(key_path: Sequence[Any]) -> str:
    """``('head', 'kernel')``-style key path as ``'head/kernel'``."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _check_per_step_support(support: Batch, steps: int) -> None:
    for x in jax.tree.leaves(support):
        if jnp.ndim(x) == 0 or jnp.shape(x)[0] != steps:
            raise ValueError(f"support_per_step: every support leaf needs a leading axis of size "
                             f"steps={steps}, got shape {jnp.shape(x)}.")


def _check_steps(steps: Any) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise TypeError(f"steps must be a Python int, got {type(steps).__name__}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")


def check_learning_rate(name: str, lr: Any) -> None:
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
    check_learning_rate("lr", lr)
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
    per_step = []
    for r, p in zip(rates, active):
        if jnp.ndim(r) == jnp.ndim(p) + 1:
            if jnp.shape(r)[0] != steps:
                raise ValueError(f"per-step lr leaf has {jnp.shape(r)[0]} steps, expected {steps}.")
            per_step.append(True)
            trailing = jnp.shape(r)[1:]
        else:
            per_step.append(False)
            trailing = jnp.shape(r)
        try:
            np.broadcast_shapes(trailing, jnp.shape(p))
        except ValueError:
            raise ValueError(
                f"lr leaf of shape {jnp.shape(r)} does not broadcast to its parameter's "
                f"shape {jnp.shape(p)}."
            ) from None
    return lambda k: [r[k] if s else r for r, s in zip(rates, per_step)]
