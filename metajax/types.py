"""Core types: a few-shot task and the aliases used across metajax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
Params = PyTree
Batch = PyTree
# loss_fn(params, batch) -> scalar. Pure, differentiable in params.
LossFn = Callable[[Params, Batch], jax.Array]
# metric_fn(params, batch) -> {name: scalar}. Evaluated, never differentiated.
MetricFn = Callable[[Params, Batch], dict[str, jax.Array]]


class Task(NamedTuple):
    """One few-shot task, or a batch of them.

    ``support`` is what the inner loop adapts on, ``query`` what the adapted
    parameters are scored on. Both are batches in whatever format the loss
    function takes (a tuple ``(x, y)``, a dict, ...), with the same structure.
    A batch of tasks has one extra leading axis, the task axis, on every leaf.
    Being a NamedTuple, a Task is a pytree: it can be vmapped, sharded and
    passed through ``jit`` as is.
    """

    support: Batch
    query: Batch
