"""What a task family builds from a config: the model, its losses and the task sources."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from metajax.types import LossFn, MetricFn, Params


class Embedding(NamedTuple):
    """A family's model without its head, for metric-based algorithms (ProtoNets).

    Attributes:
      params: the embedding's initial parameters.
      apply_fn: ``apply_fn(params, x) -> (n, d)`` features of ``n`` inputs.
      ways: classes per task (the prototypes to build).
    """

    params: Params
    apply_fn: Callable[[Params, Any], Any]
    ways: int


class Setup(NamedTuple):
    """A task family's contribution to an experiment.

    Attributes:
      params: initial model parameters (from ``config.train.seed``).
      loss_fn: ``loss_fn(params, batch) -> scalar`` on one task's batch.
      metric_fn: ``metric_fn(params, batch) -> {name: scalar}``, or None.
      train_source: meta-training tasks: ``sample(step, num_tasks, first_task=0) -> Task``.
      eval_source: held-out tasks of ``task.eval_split``.
      predict_fn: ``predict_fn(adapted, inputs) -> outputs`` (jittable): regression values,
        class logits or next-token logits.
      embedding: the model without its head (classification families), for ProtoNets.
      head: regex of the parameter paths ANIL adapts by default.
      batch_fn: ``batch_fn(x, y) -> batch``: a user's support data in the batch format
        (default: ``(asarray(x), asarray(y))``).
      inputs_fn: ``inputs_fn(x) -> inputs`` for ``predict_fn`` (default: ``asarray``).
      outputs_fn: ``outputs_fn(outputs) -> result`` for the user (default: numpy).
      plot_fn: ``plot_fn(algo, meta_params, plots_dir) -> path | None``: a family figure.
      inner_mask: a pytree of bools like ``params``: which leaves the inner loop adapts
        (e.g. only LoRA factors, :func:`metajax.lora.inner_mask`); None: all. Passed as
        ``mask=`` to every algorithm that takes one.
      wrap_optimizer: ``wrap_optimizer(tx) -> tx`` applied to the outer optimizer (e.g.
        :func:`metajax.lora.freeze_base`); None: the optimizer as configured.
      score_fn: ``score_fn(adapted, query_batch) -> {name: float}``, host side, for metrics
        that cannot be jitted (chrF of decoded strings): evaluation calls it on each held-out
        task after every number of adaptation steps and reports it beside ``metric_fn``.
    """

    params: Params
    loss_fn: LossFn
    metric_fn: MetricFn | None
    train_source: Any
    eval_source: Any
    predict_fn: Callable[..., Any]
    embedding: Embedding | None = None
    head: str | None = None
    batch_fn: Callable[..., Any] | None = None
    inputs_fn: Callable[..., Any] | None = None
    outputs_fn: Callable[..., Any] | None = None
    plot_fn: Callable[..., Any] | None = None
    inner_mask: Any = None
    wrap_optimizer: Callable[[Any], Any] | None = None
    score_fn: Callable[..., dict[str, float]] | None = None
