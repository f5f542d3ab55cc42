"""What every meta-learning algorithm shares: its shape, input checks, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax.inner import adapt_trace, check_learning_rate
from metajax.types import Batch, LossFn, MetricFn, Params, PyTree, Task

MetaParams = PyTree
Metrics = dict[str, jax.Array]


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as pure functions, like an optax GradientTransformation.

    Attributes:
      init: ``init(params) -> meta_params``: the model's parameters plus whatever
        the algorithm meta-learns (learned inner rates, ...).
      meta_grad: ``meta_grad(meta_params, tasks) -> (grads, metrics)``. ``tasks``
        is a :class:`Task` with a leading task axis; ``grads`` has the structure
        of ``meta_params`` and is averaged over tasks, ready for an optax outer
        step; ``metrics`` maps names to scalars (at least ``loss_before`` and
        ``loss_after``, the mean query loss before and after adaptation).
      adapt: ``adapt(meta_params, support, *, steps=None) -> params`` for one
        task (no task axis); ``steps`` overrides the number of inner steps.
      adapt_trace: ``adapt_trace(meta_params, support, trace_fn, *, steps=None)
        -> (params, trace)``; ``trace`` stacks ``trace_fn`` of the parameters
        after 0, 1, ..., steps inner steps (leading axis ``steps + 1``).
    """

    init: Callable[[Params], MetaParams]
    meta_grad: Callable[[MetaParams, Task], tuple[MetaParams, Metrics]]
    adapt: Callable[..., Params]
    adapt_trace: Callable[..., tuple[Params, PyTree]]


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
        check_learning_rate("inner_lr", inner_lr)


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
    loss_fn: LossFn, metric_fn: MetricFn | None, before: Params, after: Params, query: Batch
) -> Metrics:
    """Query loss (and ``metric_fn``) before and after adaptation, not differentiated."""
    before, after = jax.lax.stop_gradient((before, after))
    out = {"loss_before": loss_fn(before, query), "loss_after": loss_fn(after, query)}
    if metric_fn is not None:
        for name, value in metric_fn(before, query).items():
            out[f"{name}_before"] = value
        for name, value in metric_fn(after, query).items():
            out[f"{name}_after"] = value
    return out


def mean_over_tasks(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def check_unroll_tasks(task_batch: int | None, unroll_tasks: bool) -> None:
    if unroll_tasks and task_batch is None:
        raise ValueError("unroll_tasks=True unrolls the loop over task groups: it needs a "
                         "task_batch (e.g. task_batch=1).")


def grad_of_mean_task_loss(
    task_loss: Callable[[MetaParams, Task], tuple[jax.Array, Metrics]],
    meta_params: MetaParams,
    tasks: Task,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> tuple[MetaParams, Metrics]:
    """Gradient of the mean over tasks of ``task_loss``, and the mean metrics.

    ``task_loss(meta_params, task) -> (scalar, metrics)`` sees one task; it is
    vmapped over the leading task axis of ``tasks``. ``jax.grad`` with respect
    to ``meta_params`` differentiates through everything ``task_loss`` does,
    inner loop included (second-order MAML, Meta-SGD, MAML++, ProtoNets).
    With ``task_batch``, see :func:`mean_over_task_batches`.
    """
    check_unroll_tasks(task_batch, unroll_tasks)
    if task_batch is not None:
        per_task = lambda task: jax.grad(task_loss, has_aux=True)(meta_params, task)
        return mean_over_task_batches(per_task, tasks, task_batch, unroll_tasks)

    def mean_loss(mp):
        losses, metrics = jax.vmap(task_loss, in_axes=(None, 0))(mp, tasks)
        return jnp.mean(losses), mean_over_tasks(metrics)

    return jax.grad(mean_loss, has_aux=True)(meta_params)


def mean_over_task_batches(
    per_task: Callable[[Task], PyTree],
    tasks: Task,
    task_batch: int | None = None,
    unroll_tasks: bool = False,
) -> PyTree:
    """Mean over the task axis of ``per_task(task)``, ``task_batch`` tasks vmapped at a time.

    ``task_batch=None`` vmaps every task at once. A smaller ``task_batch`` runs
    a ``lax.scan`` over groups of that many tasks, so memory holds the
    activations of ``task_batch`` tasks, not of the whole meta-batch (gradient
    accumulation): on the standard Transformer case, second-order MAML with
    ``task_batch=1`` needs 7.7x less temporary memory at 1.18x the step time
    (benchmarks/README.md).

    ``unroll_tasks=True`` unrolls that loop (a larger program, compiled more
    slowly). XLA:CPU runs a convolution inside a while loop without its fast
    Eigen path (jax-ml/jax#12868, 17x slower per convolution gradient), and
    vmapped per-task weights turn convolutions into slow grouped ones: for
    ConvNets on a CPU, ``task_batch=1, unroll_tasks=True`` makes the second-order
    Omniglot 5-way step 3.2x faster than the scan and 7.2x faster than vmap
    (benchmarks/README.md).
    """
    check_unroll_tasks(task_batch, unroll_tasks)
    if task_batch is None:
        return mean_over_tasks(jax.vmap(per_task)(tasks))
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    task_batch = check_positive_int("task_batch", task_batch)
    if num_tasks % task_batch:
        raise ValueError(f"task_batch {task_batch} does not divide the {num_tasks} tasks.")
    groups = num_tasks // task_batch
    # Group g holds tasks g, g + groups, ...: with the task axis sharded over devices in
    # contiguous blocks, every scan step takes its tasks from all devices alike.
    chunked = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(task_batch, groups, *x.shape[1:]), 0, 1), tasks
    )
    group_mean = lambda group: mean_over_tasks(jax.vmap(per_task)(group))
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
            r = r[count] if jnp.ndim(r) == jnp.ndim(u) + 1 else r
            return (r * u).astype(u.dtype)

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

    def _adapt_trace(params, support, trace_fn=None, *, steps=None):
        steps = inner_steps if steps is None else steps
        return adapt_trace(loss_fn, params, support, steps=steps, trace_fn=trace_fn, **adapt_kwargs)

    def _adapt(params, support, *, steps=None):
        return _adapt_trace(params, support, steps=steps)[0]

    return _adapt, _adapt_trace
