"""The inner loop: adapt parameters to one task's support set.

Everything here is differentiable end to end: ``jax.grad`` of a function of
``adapt(...)`` differentiates through every inner gradient step (exact
second-order MAML), through the learning rates (Meta-SGD, MAML++) and through
the state of an optax inner optimizer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

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
    unroll: bool = False,
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
        points: the scan checkpoints nested segments up to four levels deep
        (9 states at 50 steps, 11 at 100), the unrolled loop
        segments of about ``sqrt(steps)``, each where it saves memory, at the
        price of one more forward pass of the inner loop per level. With
        ``unroll=True`` each checkpoint is a
        ``jax.custom_vjp`` (see :func:`_tied_checkpoint`), which supports reverse
        mode (``jax.grad``, ``jax.vjp``, grad of grad) but not ``jax.jvp``; use
        ``unroll=False`` for forward mode.
      mask: pytree of Python bools with the structure of ``params`` (or a
        prefix of it). Leaves marked False are not adapted (ANIL).
      unroll: False (default) runs the steps in a ``lax.scan``: the program,
        and so trace and compile time, does not grow with ``steps``. True
        unrolls them in Python: one copy of the step per inner step, compiled
        more slowly, sometimes faster to run (XLA:CPU runs convolutions inside
        loops on a slow path).
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
    unroll: bool = False,
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
    if not isinstance(unroll, (bool, np.bool_)):
        raise TypeError(f"unroll must be a bool, got {type(unroll).__name__}.")
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
    run = _run_unrolled if unroll else _run_scanned
    carry, traces = run(step, carry, steps, remat=remat, trace=trace)
    return merge(get_active(carry)), traces


def _run_scanned(step: Callable, carry: Any, steps: int, *, remat: bool, trace) -> tuple:
    """``steps`` calls of ``step(carry, k)`` in a ``lax.scan``; returns (carry, stacked trace).

    With ``remat`` each step is a ``jax.checkpoint`` and, where :func:`_schedule` says it
    pays, runs of steps are checkpointed too, up to ``SCAN_LEVELS`` levels deep
    (Griewank's nested checkpointing): an outer scan over segments keeps one state per
    segment, and the backward pass of a segment recomputes the states of its sub-segments,
    and so on down to single steps. The recomputation lives inside the backward loop's
    body, so XLA cannot schedule it early.
    """
    first = trace(carry) if trace else None
    one_step = jax.checkpoint(step) if remat else step

    def body(c, k):
        c = one_step(c, k)
        return c, (trace(c) if trace else None)

    def run(c, ks, levels):
        n = ks.shape[0]
        seg = _schedule(n, levels)[1] if remat else n
        if seg >= n:
            return jax.lax.scan(body, c, ks)
        n_seg, tail = divmod(n, seg)
        segment = jax.checkpoint(lambda c, seg_ks: run(c, seg_ks, levels - 1))
        c, out = jax.lax.scan(segment, c, ks[: n_seg * seg].reshape(n_seg, seg))
        out = jax.tree.map(lambda x: x.reshape(n_seg * seg, *x.shape[2:]), out)
        if tail:
            c, more = run(c, ks[n_seg * seg :], levels - 1)
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, more)
        return c, out

    carry, rest = run(carry, jnp.arange(steps), SCAN_LEVELS)
    if not trace:
        return carry, None
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def _run_unrolled(step: Callable, carry: Any, steps: int, *, remat: bool, trace) -> tuple:
    """``steps`` calls of ``step(carry, k)`` unrolled in Python, ``k`` a Python int.

    With ``remat``, the schedule of :func:`_schedule` two levels deep (segments, then
    steps), each checkpoint a :func:`_tied_checkpoint`.
    """
    traces = [trace(carry)] if trace else []

    def run(c, ks):
        outs = []
        for k in ks:
            one_step = functools.partial(step, k=k)
            c = _tied_checkpoint(one_step)(c) if remat else one_step(c)
            if trace:
                outs.append(trace(c))
        return c, outs

    seg = _schedule(steps, UNROLLED_LEVELS)[1] if remat else max(steps, 1)
    n_seg = steps // seg if seg < steps else 0
    for s in range(n_seg):
        segment = functools.partial(run, ks=range(s * seg, (s + 1) * seg))
        carry, outs = _tied_checkpoint(segment)(carry)
        traces += outs
    carry, outs = run(carry, range(n_seg * seg, steps))
    traces += outs
    return carry, (jax.tree.map(lambda *xs: jnp.stack(xs), *traces) if trace else None)


# Checkpoint levels: the scan nests up to four (each level costs one more forward pass of
# the inner loop and keeps about steps ** (1 / levels) states per level); the unrolled form
# two, since its program grows with every level.
SCAN_LEVELS, UNROLLED_LEVELS = 4, 2


@functools.cache
def _schedule(steps: int, levels: int) -> tuple[int, int]:
    """``(states kept, segment length)``: the segmentation of ``steps`` checkpointed steps,
    at most ``levels`` deep, that keeps the fewest inner-loop states in the backward pass.

    A schedule of segments of ``seg`` steps keeps one state per segment while it
    differentiates one segment or the left-over tail, each scheduled one level shallower:
    ``steps // seg + max(kept(seg), kept(tail))``; one level keeps every step's state. The
    segment length is ``steps`` (no segments) when splitting saves nothing; of equal
    schedules the one with the shortest segments wins. Schedules that would leave a loop
    of one iteration (one segment, or one left-over step) are skipped: XLA inlines such a
    loop, and the recomputation inside it could then be scheduled early.
    """
    best = (steps, steps)
    if levels <= 1:
        return best
    for seg in range(2, steps):
        n_seg, tail = divmod(steps, seg)
        if n_seg < 2 or tail == 1:
            continue
        inner = _schedule(seg, levels - 1)[0]
        kept = n_seg + max(inner, _schedule(tail, levels - 1)[0] if tail else 0)
        if kept < best[0]:
            best = (kept, seg)
    return best


def _tied_checkpoint(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``fn`` (pytree to pytree) checkpointed: only its input is saved, and the backward pass
    recomputes ``fn`` once the cotangent of its output exists.

    ``jax.checkpoint`` alone saves no memory in an unrolled loop on XLA:CPU.
    It keeps the recomputation after the cotangent only by an optimization
    barrier, which XLA:CPU removes before scheduling; its scheduler then runs
    every step's recomputation as soon as the step's saved input exists,
    during the forward pass, and all steps' activations are live at once.
    Here the recomputation's inputs depend on the cotangent through data (an
    exact zero computed from it is added to them), which no scheduler can
    reorder. Arrays ``fn`` closes over (the support batch, frozen leaves,
    traced learning rates) become explicit inputs, so their cotangents flow.
    """

    def checkpointed(x):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(x)
        jaxpr = closed.jaxpr

        def run(flat_x, consts):
            return jaxpr_as_fun(ClosedJaxpr(jaxpr, consts))(*flat_x)

        out = _tied_call(run, jax.tree.leaves(x), list(closed.consts))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return checkpointed


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tied_call(run: Callable, flat_x: list, consts: list) -> list:
    return run(flat_x, consts)


def _tied_call_fwd(run: Callable, flat_x: list, consts: list) -> tuple[list, tuple]:
    return run(flat_x, consts), (flat_x, consts)


def _tied_call_bwd(run: Callable, saved: tuple, cts: list) -> tuple[list, list]:
    flat_x, consts = saved
    # One element of one cotangent is enough to order the recomputation after the backward
    # pass of the next step; XLA copies this scalar into every fusion that reads it.
    first = next((c.ravel()[0] for c in cts if _is_float(c) and c.size), None)
    if first is not None:
        # Exactly zero, also for a non-finite cotangent; XLA does not fold x * 0 for floats.
        zero = jax.lax.select(jnp.isfinite(first), first * 0, jnp.zeros_like(first))
        flat_x = [x + zero.astype(x.dtype) if _is_float(x) else x for x in flat_x]
    _, vjp = jax.vjp(run, flat_x, consts)
    return vjp(cts)


_tied_call.defvjp(_tied_call_fwd, _tied_call_bwd)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


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
            raise ValueError(
                f"support_per_step: every support leaf needs a leading axis of size "
                f"steps={steps}, got shape {jnp.shape(x)}."
            )


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
    for r, p in zip(rates, active):
        if jnp.ndim(r) == jnp.ndim(p) + 1:  # per step: see rate_at
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
    return lambda k: [rate_at(r, p, k) for r, p in zip(rates, active)]


def rate_at(rate: Any, param: Any, k: Any) -> jax.Array:
    """One leaf's learning rate at inner step ``k``: a rate with one more axis than its
    parameter is per step (indexed by ``k``); any other rate broadcasts to the parameter."""
    rate = jnp.asarray(rate)  # host (numpy) rates cannot be indexed by a traced k
    return rate[k] if rate.ndim == jnp.ndim(param) + 1 else rate
