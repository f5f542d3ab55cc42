"""The outer loop's pieces: the train state, one jitted (and sharded) meta-step, evaluation.

``make_train_step`` is the only place that compiles a meta-update: the mean
over tasks of ``algo.meta_grad``, then an optax step. With a mesh, the task
axis is split over mesh axis ``"tasks"`` and everything else replicated; the
mean over tasks then spans devices, and XLA inserts the all-reduce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh

from metajax import parallel as _parallel
from metajax.algorithms import MetaLearner
from metajax.types import LossFn, MetricFn, Params, PyTree, Task


class TrainState(NamedTuple):
    """Everything the outer loop carries; a pytree, so it is jitted, sharded and checkpointed whole.

    Attributes:
      meta_params: what the algorithm meta-learns (``algo.init(params)``).
      opt_state: the outer optax optimizer's state.
      step: int32 scalar, the number of meta-updates taken; passed to
        ``algo.meta_grad(..., step=step)`` (MAML++'s schedules).
      key: None, or the raw ``uint32`` data of a PRNG key (``jax.random.key_data``, so it
        checkpoints as a plain array); step ``s`` passes ``fold_in(key, s)`` to
        ``algo.meta_grad(..., key=...)`` (dropout in the loss).
    """

    meta_params: PyTree
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array | None = None


def train_state(
    algo: MetaLearner,
    params: Params,
    optimizer: optax.GradientTransformation,
    *,
    key: jax.Array | None = None,
) -> TrainState:
    """The state before the first meta-update: ``algo.init(params)`` and a fresh optimizer.

    The state holds copies of ``params``: the train step donates its input state, and
    must never delete the caller's own arrays. ``key`` (a ``jax.random.key``) makes the
    train step pass a fresh key to ``meta_grad`` at every step.
    """
    meta_params = jax.tree.map(jnp.array, algo.init(params))  # jnp.array copies
    key_data = None if key is None else jax.random.key_data(key)
    return TrainState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32), key_data)


def _update(algo, optimizer, num_shards, reduce, state: TrainState, tasks: Task):
    # Trace-time check: clearer than XLA's complaint about uneven shards.
    _parallel.check_divisible(jax.tree.leaves(tasks)[0].shape[0], num_shards)
    key = None
    if state.key is not None:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    grads, metrics = algo.meta_grad(state.meta_params, tasks, step=state.step, key=key)
    if reduce is not None:
        grads, metrics = reduce((grads, metrics))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return TrainState(meta_params, opt_state, state.step + 1, state.key), metrics


def make_train_step(
    algo: MetaLearner,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    parallel: str = "sharding",
    state_sharding: Any = None,
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
        sharded over it, ``metrics`` are replicated, and ``state`` is laid out
        as ``state_sharding`` says. A 2-D mesh ``("tasks", "model")``
        (:func:`metajax.parallel.task_model_mesh`) shards the state over
        ``"model"`` FSDP-style by default. None: one device.
        ``parallel="pmap"``: None for all local devices, or a mesh whose size
        sets the device count.
      parallel: ``"sharding"`` (one ``jit`` over the mesh) or ``"pmap"`` (the
        legacy path: per-device meta-gradients averaged with ``lax.pmean``;
        ``state`` must then be replicated with :func:`metajax.parallel.replicate`).
      state_sharding: ``parallel="sharding"`` with a mesh only: where the state
        (input and output) lives. None: replicated, or, when the mesh has an
        axis ``"model"``, every parameter and optimizer-state leaf split over it
        on its largest divisible dimension (:func:`metajax.parallel.fsdp_shardings`).
        Otherwise one ``Sharding``, a pytree of shardings like the state, or a
        function ``state -> shardings`` (see :func:`metajax.parallel.state_shardings`);
        :func:`place_state` takes the same argument.

    Returns:
      The step function. ``tasks`` is a :class:`Task` with leading axis
      ``meta_batch``, which must divide by the size of mesh axis ``"tasks"``
      (the number of devices for a 1-D mesh). ``metrics`` are scalars:
      ``algo``'s (``loss_before``, ``loss_after``, ...) and ``grad_norm``, the
      global norm of the meta-gradient. ``step.jitted_for(state)`` is the
      underlying jitted function (for ``.lower(state, tasks)``); with the
      replicated default it is also ``step.jitted``.
    """
    if parallel not in ("sharding", "pmap"):
        raise ValueError(f"parallel must be 'sharding' or 'pmap', got {parallel!r}.")
    if state_sharding is not None and (parallel == "pmap" or mesh is None):
        raise ValueError("state_sharding needs parallel='sharding' and a mesh.")
    if parallel == "pmap":
        pmean = functools.partial(jax.lax.pmean, axis_name=_parallel.PMAP_AXIS)
        # Each device sees its own share of the tasks; the pmap wrapper checks the split.
        update = functools.partial(_update, algo, optimizer, 1, pmean)
        return _parallel.make_pmap_step(update, None if mesh is None else mesh.size)
    if mesh is None:
        return jax.jit(functools.partial(_update, algo, optimizer, 1, None), donate_argnums=(0,))
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
    # An Explicit mesh (jax.make_mesh's default) puts shardings in the arrays' types, and a
    # lax.scan inner loop under vmap then fails to trace (jax 0.10); the step runs on the
    # same devices with Auto axes instead, its inputs re-labelled (no data moves).
    mesh = _parallel.auto_axes(mesh)
    num_shards = _parallel.task_axis_size(mesh)
    what = "devices" if len(mesh.axis_names) == 1 else "shards of mesh axis 'tasks'"
    update = functools.partial(_update, algo, optimizer, num_shards, None)
    rep, task_sharding = _parallel.replicated(mesh), _parallel.task_sharding(mesh)

    def jit_with(shardings):
        return jax.jit(
            update,
            in_shardings=(shardings, task_sharding),
            out_shardings=(shardings, rep),
            donate_argnums=(0,),
        )

    replicated_state = state_sharding is None and _parallel.MODEL_AXIS not in mesh.axis_names
    fixed = jit_with(rep) if replicated_state else None
    by_layout = {}

    def jitted_for(state: TrainState):
        if fixed is not None:
            return fixed
        # Per-leaf shardings need the leaves' shapes, known only from the first state.
        leaves, treedef = jax.tree.flatten(state)
        layout = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
        if layout not in by_layout:
            by_layout[layout] = jit_with(_parallel.state_shardings(state, mesh, state_sharding))
        return by_layout[layout]

    @functools.wraps(update)
    def step(state: TrainState, tasks: Task):
        # jit checks in_shardings before tracing, with a message about tiling factors.
        _parallel.check_divisible(jax.tree.leaves(tasks)[0].shape[0], num_shards, what)
        if explicit:
            tasks = jax.device_put(tasks, task_sharding)
            state = jax.device_put(state, _parallel.state_shardings(state, mesh, state_sharding))
        return jitted_for(state)(state, tasks)

    step.jitted_for = jitted_for
    if fixed is not None:
        step.jitted = fixed  # for .lower(...) in benchmarks
    return step


def place_state(state: TrainState, mesh: Mesh | None, state_sharding: Any = None) -> TrainState:
    """Puts a host or single-device state on ``mesh`` (every process must call it).

    ``state_sharding`` as in :func:`make_train_step`: by default replicated, or
    split over mesh axis ``"model"`` (FSDP-style) when the mesh has one, so
    that it matches the train step's layout.
    """
    if mesh is None:
        return state
    state = jax.device_get(state)
    shardings = _parallel.state_shardings(state, mesh, state_sharding)

    def put(x, sharding):
        return jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])

    return jax.tree.map(put, state, shardings)


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
    score_fn: Callable[[Params, Any], dict[str, float]] | None = None,
    score_steps: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """Query metrics of held-out tasks after 0, 1, ..., ``steps`` adaptation steps.

    Tasks ``0 .. num_tasks - 1`` of meta-batch 0 of ``source`` (a TaskSource
    over a held-out split) are adapted with ``algo.adapt_trace``, vmapped over
    ``chunk`` tasks at a time (``vmap_tasks=False``: one jitted task after
    another, the fast form for ConvNets on XLA:CPU, where per-task weights
    under vmap make grouped convolutions); nothing is differentiated. Runs on this
    process's default device (parameters are fetched to the host first), so it
    needs no collectives.

    Each task is adapted once: ``score_fn`` scores the parameters of the same adaptation
    that the jitted metrics come from. Scored tasks run one after another whatever
    ``vmap_tasks`` says, each scored before the next adapts: a vmapped chunk would hold
    a copy of the model per task and scored step.

    Args:
      score_fn: ``score_fn(adapted, query_batch) -> {name: float}``, run on the host, for
        scores that cannot be jitted (chrF of decoded text); None: none.
      score_steps: the step counts ``score_fn`` scores (``()``: every one); its entries
        are NaN at the others.

    Returns:
      ``{name: array (num_tasks, steps + 1)}``: the query ``loss`` and every
      ``metric_fn`` and ``score_fn`` entry of each task after each number of steps.
    """
    chunk = max(1, min(chunk, num_tasks))
    scored = () if score_fn is None else _scored_steps(score_steps, steps)
    one_task = _eval_task_fn(algo, loss_fn, metric_fn, steps, scored)
    batched = vmap_tasks and not scored
    run = jax.jit(jax.vmap(one_task, in_axes=(None, 0)) if batched else one_task)
    # Via the host (sharded parameters land on this process's device), once, not per task.
    params = jax.device_put(jax.device_get(meta_params))
    parts = []
    for first in range(0, num_tasks, chunk):
        tasks = source.sample(0, min(chunk, num_tasks - first), first)
        if batched:
            parts.append(jax.device_get(run(params, tasks)))
            continue
        tasks = jax.device_get(tasks)  # slice on the host, not one device op per leaf
        rows = []
        for i in range(jax.tree.leaves(tasks)[0].shape[0]):
            task = jax.tree.map(lambda x, i=i: x[i], tasks)
            row = run(params, task)
            if scored:
                metrics, adapted = row
                scores = _scores(score_fn, adapted, task.query, scored, steps)
                row = dict(jax.device_get(metrics), **scores)
            rows.append(row)
        names = list(rows[0])  # the scores after the metrics (device_get sorts the keys)
        rows = jax.device_get(rows)
        parts.append({k: np.stack([row[k] for row in rows]) for k in names})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _scored_steps(score_steps: Sequence[int], steps: int) -> tuple[int, ...]:
    scored = tuple(sorted(set(score_steps))) or tuple(range(steps + 1))
    if not 0 <= scored[0] <= scored[-1] <= steps:
        raise ValueError(f"score_steps={tuple(score_steps)}: each must be in 0..steps={steps}.")
    return scored


def _eval_task_fn(algo, loss_fn, metric_fn, steps, scored):
    def one_task(meta_params, task):
        def trace_fn(params):
            out = {"loss": loss_fn(params, task.query)}
            if metric_fn is not None:
                out.update(metric_fn(params, task.query))
            return (out, params) if scored else out

        trace = algo.adapt_trace(meta_params, task.support, trace_fn, steps=steps)[1]
        if not scored:
            return trace
        metrics, params = trace
        return metrics, jax.tree.map(lambda x: x[np.asarray(scored)], params)

    return one_task


def _scores(score_fn, adapted, query, scored, steps) -> dict[str, np.ndarray]:
    """``score_fn`` after each step count of ``scored`` (``adapted`` stacks the parameters
    of each), as float64 rows over 0..``steps``, NaN where not scored."""
    by_step = {
        k: score_fn(jax.tree.map(lambda x, j=j: x[j], adapted), query) for j, k in enumerate(scored)
    }
    rows = {name: np.full(steps + 1, np.nan) for name in by_step[scored[0]]}
    for k, scores in by_step.items():
        for name, value in scores.items():
            rows[name][k] = value
    return rows


def summarize(per_task: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Mean and 95% confidence half-width (``1.96 * std / sqrt(n)``, sample std) per step."""
    out = {}
    for name, values in per_task.items():
        values = np.asarray(values, np.float64)
        n = values.shape[0]
        std = values.std(axis=0, ddof=1) if n > 1 else np.zeros(values.shape[1:])
        out[name] = {
            "mean": values.mean(axis=0).tolist(),
            "ci95": (1.96 * std / np.sqrt(n)).tolist(),
        }
    return out
