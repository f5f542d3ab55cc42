"""How the inner loop runs its steps: scanned or unrolled, with or without remat.

Private to :mod:`metajax.inner`. Both runners call ``step(carry, k)`` for ``k = 0 ..
steps - 1`` and return ``(carry, stacked trace)``. With remat they checkpoint nested
segments of steps (Griewank's scheme): the backward pass keeps one inner-loop state per
segment of each level, recomputing a segment's states when it differentiates it, and
recomputes each step's activations, at the price of one more forward pass of the inner
loop per level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

# Checkpoint levels at most. Each level costs one more forward pass of the inner loop and
# keeps about steps ** (1 / levels) states. The scan stops at three: every level adds copies
# of the second-order step to the program, and compile time follows program size (a fourth
# level saves one state of twelve at 50 steps). Unrolled, the program grows with every
# level and every step, so two.
SCAN_LEVELS, UNROLLED_LEVELS = 3, 2


@functools.cache
def schedule(steps: int, levels: int) -> tuple[int, ...]:
    """Segment counts per level, outermost first, for ``steps`` checkpointed steps.

    ``(a, b, c)`` means ``a`` segments of ``b`` sub-segments of ``c`` steps: the backward
    pass keeps ``a + b + c`` inner-loop states. Of at most ``levels`` factors, each ``>= 2``,
    whose product is at least ``steps``, the schedule keeps the fewest states; of equal ones
    the fewest levels (each costs a forward pass), then the least padding (``a * b * c -
    steps`` steps that do nothing). Every factor is at least 2: XLA inlines a loop of one
    iteration, and could then schedule the recomputation inside it early.
    """
    best = (steps,)
    for m in range(2, levels + 1):
        sizes = _balanced(steps, m)
        if (sum(sizes), math.prod(sizes)) < (sum(best), math.prod(best)):
            best = sizes
    return best


@functools.cache
def _balanced(n: int, m: int) -> tuple[int, ...]:
    """``m`` factors ``>= 2`` with product ``>= n``: the smallest sum, then product."""
    if m == 1:
        return (max(n, 2),)
    best = None
    for f in range(2, math.ceil(n ** (1 / m)) + 2):
        sizes = (f,) + _balanced(-(-n // f), m - 1)
        if best is None or (sum(sizes), math.prod(sizes)) < (sum(best), math.prod(best)):
            best = sizes
    return best


def run_scanned(step: Callable, carry: Any, steps: int, *, remat: bool, trace) -> tuple:
    """``steps`` calls of ``step(carry, k)`` in ``lax.scan``; returns (carry, stacked trace).

    With ``remat`` each step is a ``jax.checkpoint``, and so is each segment of every level
    of :func:`schedule`: nested scans over equal segments, one loop body per level whatever
    ``steps`` is (so compile time barely grows with it). Steps past ``steps``, which pad the
    last segments, are a ``lax.cond`` that skips the step: its predicate is the step index,
    never batched, so the skip stays a branch under ``vmap``. The recomputation lives
    inside the backward loop's body, so XLA cannot schedule it early.
    """
    first = trace(carry) if trace else None
    sizes = schedule(steps, SCAN_LEVELS) if remat and steps > 1 else (steps,)
    total = math.prod(sizes)
    one_step = jax.checkpoint(step) if remat else step
    if total > steps:
        checked = one_step

        def one_step(c, k):
            return jax.lax.cond(k < steps, checked, lambda c, k: c, c, k)

    def body(c, k):
        c = one_step(c, k)
        return c, (trace(c) if trace else None)

    def run(c, ks):
        if ks.ndim == 1:
            return jax.lax.scan(body, c, ks)
        c, out = jax.lax.scan(jax.checkpoint(run), c, ks)
        return c, jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)

    carry, rest = run(carry, jnp.arange(total).reshape(sizes))
    if not trace:
        return carry, None
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b[:steps]]), first, rest)


def run_unrolled(step: Callable, carry: Any, steps: int, *, remat: bool, trace) -> tuple:
    """``steps`` calls of ``step(carry, k)`` unrolled in Python, ``k`` a Python int.

    With ``remat``, the segments of :func:`schedule` (at most ``UNROLLED_LEVELS`` deep; the
    last segment of a level may be shorter, nothing is padded), each checkpoint a
    :func:`tied_checkpoint`.
    """
    sizes = schedule(steps, UNROLLED_LEVELS) if remat and steps > 1 else (steps,)

    def run(c, ks: range, level: int):
        outs = []
        if level == len(sizes) - 1:
            for k in ks:
                one_step = functools.partial(step, k=k)
                c = tied_checkpoint(one_step)(c) if remat else one_step(c)
                if trace:
                    outs.append(trace(c))
            return c, outs
        seg = math.prod(sizes[level + 1 :])
        for start in range(ks.start, ks.stop, seg):
            segment = range(start, min(start + seg, ks.stop))
            c, more = tied_checkpoint(functools.partial(run, ks=segment, level=level + 1))(c)
            outs += more
        return c, outs

    first = [trace(carry)] if trace else []
    carry, outs = run(carry, range(steps), 0)
    if not trace:
        return carry, None
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *first, *outs)


def tied_checkpoint(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
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
    Reverse mode only (a ``jax.custom_vjp``): ``jax.jvp`` through it fails.
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
