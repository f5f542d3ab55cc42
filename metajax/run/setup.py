"""The task family contract: what a family declares, what it builds for meta-training, and
its evaluator.

A family module ``metajax/run/families/<name>.py`` defines ``FAMILY``, a :class:`Family`:
its config type, its ``build``, and what the runner checks before building (the packages it
needs, the task settings evaluation may change). ``build(config)`` returns a :class:`Setup`,
the model, losses and task sources meta-training uses, with an :class:`Evaluator`, what the
trained model is used for afterwards: held-out evaluation with its host-side scores,
predictions on a user's data, the family's figure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from metajax.run.config import Config
from metajax.train import evaluate
from metajax.types import LossFn, MetricFn, Params

if TYPE_CHECKING:
    from metajax.run.build import Experiment


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


class Evaluator(NamedTuple):
    """What a meta-trained model is used for: held-out evaluation, predictions, a figure.

    Attributes:
      predict_fn: ``predict_fn(adapted, inputs) -> outputs`` (jittable): regression values,
        class logits, next-token logits or generated tokens.
      batch_fn: ``batch_fn(x, y) -> batch``: a user's support data in the batch format
        (None: ``(asarray(x), asarray(y))``).
      inputs_fn: ``inputs_fn(x) -> inputs`` for ``predict_fn`` (None: ``asarray``).
      outputs_fn: ``outputs_fn(outputs) -> result`` for the user (None: numpy).
      input_shape: the shape of one input as ``batch_fn`` and ``inputs_fn`` give it, which
        ``adapt_and_predict`` checks a user's inputs against; None: the shape of the
        evaluation source's inputs (sampled once when first needed).
      score_fn: ``score_fn(adapted, query_batch) -> {name: float}``, run on the host, for
        scores that cannot be jitted (chrF of decoded strings); None: none.
      plot_fn: ``plot_fn(algo, meta_params, plots_dir) -> path | None``: the family's
        figure, drawn after evaluation; None: none.
    """

    predict_fn: Callable[..., Any]
    batch_fn: Callable[..., Any] | None = None
    inputs_fn: Callable[..., Any] | None = None
    outputs_fn: Callable[..., Any] | None = None
    input_shape: tuple[int, ...] | None = None
    score_fn: Callable[..., dict[str, float]] | None = None
    plot_fn: Callable[..., Any] | None = None

    def run(self, exp: Experiment, meta_params) -> dict[str, np.ndarray]:
        """The query metrics of ``eval.num_tasks`` tasks of ``exp.setup.eval_source`` after
        0..``eval.inner_steps`` adaptation steps, with :attr:`score_fn`'s scores at
        ``eval.score_steps`` when ``eval.scores`` is set; each task is adapted once
        (:func:`metajax.train.evaluate`).

        Returns:
          ``{name: array (num_tasks, inner_steps + 1)}``.
        """
        cfg = exp.config.eval
        return evaluate(
            exp.algo,
            meta_params,
            exp.setup.eval_source,
            exp.loss_fn,
            exp.metric_fn,
            num_tasks=cfg.num_tasks,
            steps=cfg.inner_steps,
            chunk=cfg.chunk,
            vmap_tasks=cfg.vmap_tasks,
            score_fn=self.score_fn if cfg.scores else None,
            score_steps=cfg.score_steps,
        )


class Setup(NamedTuple):
    """What a task family builds from a config: what meta-training needs, and its evaluator.

    Attributes:
      params: initial model parameters (from ``config.train.seed``).
      loss_fn: ``loss_fn(params, batch) -> scalar`` on one task's batch.
      metric_fn: ``metric_fn(params, batch) -> {name: scalar}``, or None.
      train_source: meta-training tasks: ``sample(step, num_tasks, first_task=0) -> Task``.
      eval_source: held-out tasks of ``task.eval_split``.
      evaluator: the :class:`Evaluator` of the trained model.
      embedding: the model without its head (classification families), for ProtoNets.
      head: regex of the parameter paths ANIL adapts by default.
      inner_mask: a pytree of bools like ``params``: which leaves the inner loop adapts
        (e.g. only LoRA factors, :func:`metajax.lora.inner_mask`); None: all. Passed as
        ``mask=`` to every algorithm that takes one.
      wrap_optimizer: ``wrap_optimizer(tx) -> tx`` applied to the outer optimizer (e.g.
        :func:`metajax.lora.freeze_base`); None: the optimizer as configured.
    """

    params: Params
    loss_fn: LossFn
    metric_fn: MetricFn | None
    train_source: Any
    eval_source: Any
    evaluator: Evaluator
    embedding: Embedding | None = None
    head: str | None = None
    inner_mask: Any = None
    wrap_optimizer: Callable[[Any], Any] | None = None


class Family(NamedTuple):
    """A task family as its module declares it (``FAMILY``); the runner finds it by name.

    Attributes:
      task_config: the type of the config's ``task``, a frozen dataclass (its fields
        appear in ``metajax show``).
      build: ``build(config) -> Setup``; a value the family refuses raises ``ValueError``
        or :class:`~metajax.run.config.ConfigError`.
      eval_keys: the task settings ``metajax eval --set`` may change on a trained workdir:
        what is evaluated (the split, the test data, the decoding length), never what was
        trained.
      requires: the optional modules the family imports (``("wordfreq",)``), checked when
        it is loaded, before anything is built.
    """

    task_config: type
    build: Callable[[Config], Setup]
    eval_keys: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
