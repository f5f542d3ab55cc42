"""What every meta-learning algorithm shares: its shape, input checks, metrics.

Private: the pieces a new algorithm is written with are exported, documented, as
:mod:`metajax.blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.inner import _check_learning_rate, _rate_at, adapt_trace
from metajax.types import Batch, LossFn, MetricFn, Params, PyTree, Task

MetaParams = PyTree
Metrics = dict[str, jax.Array]


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions, like an optax GradientTransformation.

    What an algorithm needs from the outer loop comes in as keyword arguments, never hidden
    in ``meta_params``: ``step`` (the outer step, an int scalar that may be traced: MAML++
    anneals and switches order on it) and ``key`` (a PRNG key: when given, it is split per
    task and per inner step and reaches ``loss_fn`` as ``loss_fn(params, batch, key=k)``,
    so a loss can use dropout; without it ``loss_fn(params, batch)`` is called).

    Attributes:
      init: ``init(params) -> meta_params``: the model's parameters plus whatever
        the algorithm meta-learns (learned inner rates, ...).
      meta_grad: ``meta_grad(meta_params, tasks, *, step=None, key=None) -> (grads,
        metrics)``. ``tasks`` is a :class:`Task` with a leading task axis; ``grads`` has
        the structure of ``meta_params`` and is averaged over tasks, ready for an optax
        outer step; ``metrics`` maps names to scalars (at least ``loss_after``, the mean
        query loss after adaptation, and ``loss_before`` unless ``monitor=False``).
      adapt: ``adapt(meta_params, support, *, steps=None) -> params`` for one
        task (no task axis); ``steps`` overrides the number of inner steps.
      adapt_trace: ``adapt_trace(meta_params, support, trace_fn, *, steps=None)
        -> (params, trace)``; ``trace`` stacks ``trace_fn`` of the parameters
        after 0, 1, ..., steps inner steps (leading axis ``steps + 1``).
      task_grad: ``task_grad(meta_params, task, *, step=None, key=None) -> (grads,
        metrics)`` for ONE task (no task axis): ``meta_grad`` is its mean over tasks
        (:func:`mean_over_tasks`). Bring your own ``vmap`` or ``shard_map`` with it.
    """

    init: Callable[[Params], MetaParams]
    meta_grad: Callable[..., tuple[MetaParams, Metrics]]
    adapt: Callable[..., Params]
    adapt_trace: Callable[..., tuple[Params, PyTree]]
    task_grad: Callable[..., tuple[MetaParams, Metrics]]


def call_loss(loss_fn: LossFn, params: Params, batch: Batch, key: jax.Array | None) -> jax.Array:
    """``loss_fn(params, batch)``, or ``loss_fn(params, batch, key=key)`` when a key is given."""
    return loss_fn(params, batch) if key is None else loss_fn(params, batch, key=key)


def loss_and_grad(loss_fn: LossFn, params: Params, batch: Batch, key=None):
    """``(loss, grad)`` of ``loss_fn`` at ``params`` on ``batch`` (``key=`` passed when given)."""
    return jax.value_and_grad(lambda p: call_loss(loss_fn, p, batch, key))(params)


def key_kwarg(key: jax.Array | None) -> dict:
    """``{"key": key}`` for :func:`metajax.adapt` when a key is given, else nothing."""
    return {} if key is None else {"key": key}


def split_task_key(key: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """``(inner, query)`` keys of one task: the inner loop's and the query loss's."""
    if key is None:
        return None, None
    inner, query = jax.random.split(key)
    return inner, query


def make_meta_learner(
    init: Callable[[Params], MetaParams],
    task_grad: Callable[..., tuple[MetaParams, Metrics]],
    adapt: Callable[..., Params],
    adapt_trace: Callable[..., tuple[Params, PyTree]],
    *,
    task_loss: Callable[..., tuple[jax.Array, Metrics]] | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> MetaLearner:
    """Assembles a :class:`MetaLearner`; ``meta_grad`` is written here once for all algorithms.

    ``meta_grad`` checks the tasks, then averages ``task_grad`` over them with
    :func:`mean_over_tasks`. Where the algorithm's meta-gradient is the gradient of a
    per-task loss (second-order MAML, Meta-SGD, ProtoNets), ``task_loss(meta_params, task,
    *, step, key) -> (loss, metrics)`` may be given: with the whole meta-batch vmapped at
    once, ``meta_grad`` then differentiates the mean loss (one backward pass over the
    batch) instead of averaging per-task gradients; the value is the same.
    """
    check_unroll_tasks(task_batch, unroll_tasks)

    def meta_grad(meta_params, tasks, *, step=None, key=None):
        check_tasks(tasks)
        if task_loss is not None and task_batch is None:
            grads, metrics = grad_of_mean_loss(task_loss, meta_params, tasks, step=step, key=key)
        else:
            per_task = lambda task, k: task_grad(meta_params, task, step=step, key=k)
            grads, metrics = mean_over_tasks(
                per_task, tasks, key=key, task_batch=task_batch, unroll_tasks=unroll_tasks
            )
        # Trace time, free under jit: an outer optax step needs grads shaped like meta_params.
        chex.assert_trees_all_equal_shapes(grads, jax.tree.map(jnp.asarray, meta_params))
        return grads, metrics

    return MetaLearner(init, meta_grad, adapt, adapt_trace, task_grad)


def grad_of_task_loss(task_loss: Callable[..., tuple[jax.Array, Metrics]]):
    """``task_grad`` of a differentiable ``task_loss``: its gradient and metrics, one task."""

    def task_grad(meta_params, task, *, step=None, key=None):
        return jax.grad(lambda mp: task_loss(mp, task, step=step, key=key), has_aux=True)(
            meta_params
        )

    return task_grad


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def check_inner_rule(inner_lr: Any, inner_optimizer: Any) -> None:
    """Exactly one of a learning rate (plain SGD) or an optax inner optimizer."""
    if (inner_lr is None) == (inner_optimizer is None):
        raise ValueError("give exactly one of inner_lr (plain SGD) or inner_optimizer (optax).")
    if inner_lr is not None:
        _check_learning_rate("inner_lr", inner_lr)


def check_tasks(tasks: Any) -> int:
    """Checks a batch of tasks at trace time and returns the number of tasks.

    Support and query must have the same structure, every leaf a leading task
    axis of one common size, and matching trailing shapes and dtypes.
    """
    if not isinstance(tasks, Task):
        raise TypeError(
            f"tasks must be a metajax Task(support, query), got {type(tasks).__name__}."
        )
    s_leaves, s_def = jax.tree_util.tree_flatten_with_path(tasks.support)
    q_leaves, q_def = jax.tree_util.tree_flatten_with_path(tasks.query)
    if s_def != q_def:
        raise ValueError(f"support and query have different structures: {s_def} vs {q_def}.")
    if not s_leaves:
        raise ValueError("tasks hold no arrays.")
    sizes = set()
    for (path, s), (_, q) in zip(s_leaves, q_leaves):
        name = jax.tree_util.keystr(path) or "<root>"
        if jnp.ndim(s) < 2 or jnp.ndim(q) < 2:
            raise ValueError(
                f"leaf {name} has shape support {jnp.shape(s)} / query {jnp.shape(q)}: a batch "
                "of tasks needs a task axis and an example axis (did you pass a single task? "
                "use adapt)."
            )
        if jnp.shape(s)[2:] != jnp.shape(q)[2:]:
            raise ValueError(
                f"leaf {name}: support example shape {jnp.shape(s)[2:]} != "
                f"query {jnp.shape(q)[2:]}."
            )
        if jnp.result_type(s) != jnp.result_type(q):
            raise ValueError(f"leaf {name}: support dtype {s.dtype} != query dtype {q.dtype}.")
        sizes.add(jnp.shape(s)[0])
        sizes.add(jnp.shape(q)[0])
    if len(sizes) != 1:
        raise ValueError(
            f"leading axes differ across support/query leaves ({sorted(sizes)}): every leaf needs "
            "the same leading task axis (a single task passed without one?)."
        )
    return sizes.pop()


def query_metrics(
    loss_fn: LossFn,
    metric_fn: MetricFn | None,
    before: Params,
    after: Params,
    query: Batch,
    *,
    monitor: bool = True,
    loss_after: jax.Array | None = None,
) -> Metrics:
    """Query loss (and ``metric_fn``) before and after adaptation, not differentiated.

    ``monitor=False`` skips everything about ``before`` (one forward pass fewer per task);
    ``loss_after`` reuses a query loss the caller already has.
    """
    before, after = jax.lax.stop_gradient((before, after))
    if loss_after is None:
        loss_after = loss_fn(after, query)
    out = {"loss_after": jax.lax.stop_gradient(loss_after)}
    if monitor:
        out["loss_before"] = loss_fn(before, query)
    if metric_fn is not None:
        if monitor:
            for name, value in metric_fn(before, query).items():
                out[f"{name}_before"] = value
        for name, value in metric_fn(after, query).items():
            out[f"{name}_after"] = value
    return out


def _mean_axis0(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def check_unroll_tasks(task_batch: int | None, unroll_tasks: bool) -> None:
    if unroll_tasks and task_batch is None:
        raise ValueError(
            "unroll_tasks=True unrolls the loop over task groups: it needs a "
            "task_batch (e.g. task_batch=1)."
        )


def grad_of_mean_loss(task_loss, meta_params, tasks, *, step=None, key=None):
    """Gradient of the mean over tasks of ``task_loss`` (all tasks vmapped), and mean metrics."""
    keys = _task_keys(key, tasks)

    def mean_loss(mp):
        fn = lambda task, k: task_loss(mp, task, step=step, key=k)
        losses, metrics = jax.vmap(fn)(tasks, keys)
        return jnp.mean(losses), _mean_axis0(metrics)

    return jax.grad(mean_loss, has_aux=True)(meta_params)


def _task_keys(key: jax.Array | None, tasks: Task) -> jax.Array | None:
    if key is None:
        return None
    return jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])


def mean_over_tasks(
    per_task: Callable[[Task, jax.Array | None], PyTree],
    tasks: Task,
    *,
    key: jax.Array | None = None,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> PyTree:
    """Mean over the leading task axis of ``per_task(task, key_i)``, ``task_batch`` at a time.

    ``key`` (optional) is split into one key per task; without it every call gets None.
    ``task_batch=None`` vmaps every task at once. A smaller ``task_batch`` runs a
    ``lax.scan`` over groups of that many tasks, so memory holds the activations of
    ``task_batch`` tasks, not of the whole meta-batch (gradient accumulation; the result
    is the same mean).

    ``unroll_tasks=True`` unrolls that loop (a larger program, compiled more slowly).
    XLA:CPU runs a convolution inside a while loop without its fast path
    (jax-ml/jax#12868), and vmapped per-task weights turn convolutions into grouped
    ones: for ConvNets on a CPU, ``task_batch=1, unroll_tasks=True`` is the fast form
    (benchmarks/README.md has the measurements).
    """
    check_unroll_tasks(task_batch, unroll_tasks)
    keys = _task_keys(key, tasks)
    pairs = (tasks, keys)
    one = lambda pair: per_task(*pair)
    if task_batch is None:
        return _mean_axis0(jax.vmap(one)(pairs))
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    task_batch = check_positive_int("task_batch", task_batch)
    if num_tasks % task_batch:
        raise ValueError(f"task_batch {task_batch} does not divide the {num_tasks} tasks.")
    groups = num_tasks // task_batch
    # Group g holds tasks g, g + groups, ...: with the task axis sharded over devices in
    # contiguous blocks, every scan step takes its tasks from all devices alike.
    chunked = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(task_batch, groups, *x.shape[1:]), 0, 1), pairs
    )
    group_mean = lambda group: _mean_axis0(jax.vmap(one)(group))
    first = jax.tree.map(lambda x: x[0], chunked)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(group_mean, first))

    def body(total, group):
        return jax.tree.map(jnp.add, total, group_mean(group)), None

    total, _ = jax.lax.scan(body, zeros, chunked, unroll=bool(unroll_tasks))
    return jax.tree.map(lambda x: x / groups, total)


def learned_rate_optimizer(
    rates: PyTree, inner_optimizer: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
    """An inner optimizer whose step sizes are meta-learned arrays (Meta-SGD, MAML++ LSLR).

    The update of each parameter leaf is ``rate * direction``, where
    ``direction`` is ``-grad`` (plain SGD) or, given ``inner_optimizer``, that
    optimizer's update (already pointing downhill, e.g. ``optax.adam(1.0)``).
    Each leaf of ``rates`` (structure of params) either broadcasts to its
    parameter's shape (per tensor or per parameter) or has one extra leading
    axis indexed by the inner step (per step). Rates are used as given: no
    sign check and no clipping, since learned rates may legitimately turn
    negative (Li et al. 2017). Differentiable in ``rates``; meant for
    :func:`metajax.adapt`'s ``optimizer=`` argument, built inside the traced
    function so that ``rates`` can be traced.
    """
    direction = optax.scale(-1.0) if inner_optimizer is None else inner_optimizer

    def init(params):
        del params
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        del params

        def scale(r, u):
            return (_rate_at(r, u, count) * u).astype(u.dtype)

        return jax.tree.map(scale, rates, updates), count + 1

    return optax.chain(direction, optax.GradientTransformation(init, update))


def full_like_rates(params: Params, value: Any, steps: int | None = None) -> PyTree:
    """Learned-rate tree initialised to ``value``: per parameter (``steps=None``,
    each leaf the parameter's shape) or per step and tensor (each leaf
    ``(steps, 1, ..., 1)``). Dtype follows the parameter."""

    def leaf(p):
        p = jnp.asarray(p)
        shape = p.shape if steps is None else (steps,) + (1,) * p.ndim
        return jnp.full(shape, value, p.dtype)

    return jax.tree.map(leaf, params)


def fixed_inner_loop(loss_fn: LossFn, inner_steps: int, **adapt_kwargs):
    """``(adapt, adapt_trace)`` of the MetaLearner shape for an inner rule with no meta-learned
    parts: ``adapt_kwargs`` go to :func:`metajax.adapt_trace` as they are, and ``steps``
    overrides ``inner_steps``."""

    def _adapt_trace(params, support, trace_fn=None, *, steps=None, key=None):
        steps = inner_steps if steps is None else steps
        return adapt_trace(
            loss_fn,
            params,
            support,
            steps=steps,
            trace_fn=trace_fn,
            **key_kwarg(key),
            **adapt_kwargs,
        )

    def _adapt(params, support, *, steps=None, key=None):
        return _adapt_trace(params, support, steps=steps, key=key)[0]

    return _adapt, _adapt_trace
