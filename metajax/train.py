"""The outer loop's pieces: the train state, one jitted (and sharded) meta-step, evaluation.

``make_train_step`` is the only place that compiles a meta-update: the mean
over tasks of ``algo.meta_grad``, then an optax step. With a mesh, the task
axis is split over mesh axis ``"tasks"`` and everything else replicated; the
mean over tasks then spans devices, and XLA inserts the all-reduce.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from metajax import parallel as _parallel
from metajax.algorithms.base import MetaLearner
from metajax.types import LossFn, MetricFn, Params, PyTree, Task


class TrainState(NamedTuple):
    """Everything the outer loop carries; a pytree, so it is jitted, sharded and checkpointed whole.

    Attributes:
      meta_params: what the algorithm meta-learns (``algo.init(params)``).
      opt_state: the outer optax optimizer's state.
      step: int32 scalar, the number of meta-updates taken.
    """

    meta_params: PyTree
    opt_state: optax.OptState
    step: jax.Array


def train_state(
    algo: MetaLearner, params: Params, optimizer: optax.GradientTransformation
) -> TrainState:
    """The state before the first meta-update: ``algo.init(params)`` and a fresh optimizer."""
    meta_params = algo.init(params)
    return TrainState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32))


def _update(algo, optimizer, num_shards, reduce, state: TrainState, tasks: Task):
    # Trace-time check: clearer than XLA's complaint about uneven shards.
    _parallel.check_divisible(jax.tree.leaves(tasks)[0].shape[0], num_shards)
    grads, metrics = algo.meta_grad(state.meta_params, tasks)
    if reduce is not None:
        grads, metrics = reduce((grads, metrics))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(meta_params, opt_state, state.step + 1), metrics


def make_train_step(
    algo: MetaLearner,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    parallel: str = "sharding",
):
    """One compiled meta-update: ``step(state, tasks) -> (state, metrics)``.

    The gradient is ``algo.meta_grad`` (the mean over all tasks of the
    meta-batch), the update the optax ``optimizer``'s. The input state is
    donated: do not use it after the call.

    Args:
      algo: any :class:`MetaLearner`.
      optimizer: the outer optax optimizer.
      mesh: ``parallel="sharding"``: a mesh with an axis ``"tasks"`` (e.g.
        :func:`metajax.parallel.task_mesh`). The task axis of ``tasks`` is
        sharded over it, ``state`` and ``metrics`` are replicated. None: one
        device. ``parallel="pmap"``: None for all local devices, or a mesh
        whose size sets the device count.
      parallel: ``"sharding"`` (one ``jit`` over the mesh) or ``"pmap"`` (the
        legacy path: per-device meta-gradients averaged with ``lax.pmean``;
        ``state`` must then be replicated with :func:`metajax.parallel.replicate`).

    Returns:
      The step function. ``tasks`` is a :class:`Task` with leading axis
      ``meta_batch``, which must divide by the number of devices. ``metrics``
      are scalars: ``algo``'s (``loss_before``, ``loss_after``, ...) and
      ``grad_norm``, the global norm of the meta-gradient.
    """
    if parallel == "pmap":
        pmean = functools.partial(jax.lax.pmean, axis_name=_parallel.PMAP_AXIS)
        # Each device sees its own share of the tasks; the pmap wrapper checks the split.
        update = functools.partial(_update, algo, optimizer, 1, pmean)
        return _parallel.make_pmap_step(update, None if mesh is None else mesh.size)
    if parallel != "sharding":
        raise ValueError(f"parallel must be 'sharding' or 'pmap', got {parallel!r}.")
    update = functools.partial(_update, algo, optimizer, 1 if mesh is None else mesh.size, None)
    if mesh is None:
        return jax.jit(update, donate_argnums=(0,))
    if "tasks" not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named 'tasks', got {mesh.axis_names}.")
    rep, tasks = _parallel.replicated(mesh), _parallel.task_sharding(mesh)
    jitted = jax.jit(update, in_shardings=(rep, tasks), out_shardings=(rep, rep),
                     donate_argnums=(0,))

    @functools.wraps(update)
    def step(state: TrainState, tasks: Task):
        # jit checks in_shardings before tracing, with a message about tiling factors.
        _parallel.check_divisible(jax.tree.leaves(tasks)[0].shape[0], mesh.size)
        return jitted(state, tasks)

    step.jitted = jitted  # for .lower(...) in benchmarks
    return step


def place_state(state: TrainState, mesh: Mesh | None) -> TrainState:
    """Puts a host or single-device state replicated on ``mesh`` (every process must call it)."""
    if mesh is None:
        return state
    sharding = _parallel.replicated(mesh)
    def put(x):
        return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])

    return jax.tree.map(put, jax.device_get(state))


def all_finite(tree: PyTree) -> bool:
    """Whether every float leaf of ``tree`` is finite (one device round-trip)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return bool(_all_finite(leaves)) if leaves else True


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


# --- evaluation ----------------------------------------------------------------------------


def evaluate(
    algo: MetaLearner,
    meta_params: PyTree,
    source: Any,
    loss_fn: LossFn,
    metric_fn: MetricFn | None = None,
    *,
    num_tasks: int = 600,
    steps: int = 10,
    chunk: int = 100,
    vmap_tasks: bool = True,
) -> dict[str, np.ndarray]:
    """Query metrics of held-out tasks after 0, 1, ..., ``steps`` adaptation steps.

    Tasks ``0 .. num_tasks - 1`` of meta-batch 0 of ``source`` (a TaskSource
    over a held-out split) are adapted with ``algo.adapt_trace``, vmapped over
    ``chunk`` tasks at a time (``vmap_tasks=False``: one jitted task after
    another, the fast form for ConvNets on XLA:CPU, where per-task weights
    under vmap make grouped convolutions); nothing is differentiated. Runs on this
    process's default device (parameters are fetched to the host first), so it
    needs no collectives.

    Returns:
      ``{name: array (num_tasks, steps + 1)}``: the query ``loss`` and every
      ``metric_fn`` entry of each task after each number of steps.
    """
    chunk = max(1, min(chunk, num_tasks))
    one_task = _eval_task_fn(algo, loss_fn, metric_fn, steps)
    run = jax.jit(jax.vmap(one_task, in_axes=(None, 0)) if vmap_tasks else one_task)
    # Via the host (sharded parameters land on this process's device), once, not per task.
    params = jax.device_put(jax.device_get(meta_params))
    parts = []
    for first in range(0, num_tasks, chunk):
        tasks = source.sample(0, min(chunk, num_tasks - first), first)
        if vmap_tasks:
            parts.append(jax.device_get(run(params, tasks)))
            continue
        tasks = jax.device_get(tasks)  # slice on the host, not one device op per leaf
        per_task = jax.device_get([run(params, jax.tree.map(lambda x, i=i: x[i], tasks))
                                   for i in range(jax.tree.leaves(tasks)[0].shape[0])])
        parts.append(jax.tree.map(lambda *xs: np.stack(xs), *per_task))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _eval_task_fn(algo, loss_fn, metric_fn, steps):
    def one_task(meta_params, task):
        def trace_fn(params):
            out = {"loss": loss_fn(params, task.query)}
            if metric_fn is not None:
                out.update(metric_fn(params, task.query))
            return out

        return algo.adapt_trace(meta_params, task.support, trace_fn, steps=steps)[1]

    return one_task


def summarize(per_task: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Mean and 95% confidence half-width (``1.96 * std / sqrt(n)``, sample std) per step."""
    out = {}
    for name, values in per_task.items():
        values = np.asarray(values, np.float64)
        n = values.shape[0]
        std = values.std(axis=0, ddof=1) if n > 1 else np.zeros(values.shape[1:])
        out[name] = {"mean": values.mean(axis=0).tolist(),
                     "ci95": (1.96 * std / np.sqrt(n)).tolist()}
    return out
