"""The building blocks of a meta-learning algorithm: what every algorithm of metajax is made of.

An algorithm is a :class:`MetaLearner` assembled by :func:`make_meta_learner` from
``init``, a per-task gradient, and the inner loop; the blocks below supply the rest: the
inner loop of a rule with no meta-learned parts (:func:`fixed_inner_loop`), a task
loss and its gradient (:func:`call_loss`, :func:`loss_and_grad`), the per-task PRNG keys
(:func:`split_task_key`), the metrics every algorithm reports (:func:`query_metrics`),
the mean over tasks of a per-task function (:func:`mean_over_tasks`), and, for
algorithms that meta-learn their inner rates, :func:`learned_rate_optimizer` and
:func:`full_like_rates`. First-order MAML, written with them::

    import jax
    from metajax import blocks

    def my_fomaml(loss_fn, *, inner_steps, inner_lr, metric_fn=None):
        adapt, adapt_trace = blocks.fixed_inner_loop(loss_fn, inner_steps, lr=inner_lr)

        def task_grad(params, task, *, step=None, key=None):
            inner_key, query_key = blocks.split_task_key(key)
            adapted = jax.lax.stop_gradient(adapt(params, task.support, key=inner_key))
            loss, grads = blocks.loss_and_grad(loss_fn, adapted, task.query, query_key)
            metrics = blocks.query_metrics(
                loss_fn, metric_fn, params, adapted, task.query, loss_after=loss
            )
            return grads, metrics

        return blocks.make_meta_learner(lambda p: p, task_grad, adapt, adapt_trace)

``my_fomaml(loss_fn, inner_steps=5, inner_lr=0.4).meta_grad(params, tasks)`` is then the
mean over tasks of ``task_grad``, vmapped, with the tasks checked, as
``metajax.maml(..., first_order=True)`` computes it. A second-order algorithm writes a
differentiable ``task_loss(meta_params, task, *, step, key) -> (loss, metrics)`` instead
and passes :func:`grad_of_task_loss` of it (and ``task_loss=task_loss``, which lets
``meta_grad`` run one backward pass over the whole meta-batch).
"""

from metajax.algorithms._base import (
    MetaLearner,
    call_loss,
    fixed_inner_loop,
    full_like_rates,
    grad_of_task_loss,
    learned_rate_optimizer,
    loss_and_grad,
    make_meta_learner,
    mean_over_tasks,
    query_metrics,
    split_task_key,
)

__all__ = [
    "MetaLearner",
    "call_loss",
    "fixed_inner_loop",
    "full_like_rates",
    "grad_of_task_loss",
    "learned_rate_optimizer",
    "loss_and_grad",
    "make_meta_learner",
    "mean_over_tasks",
    "query_metrics",
    "split_task_key",
]
