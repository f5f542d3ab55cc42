"""Use a trained workdir on one's own few-shot task: ``load(workdir).adapt_and_predict(...)``.

    from metajax.run import predict

    model = predict.load("runs/omniglot_5w1s_maml")
    logits = model.adapt_and_predict(support_images, support_labels, query_images)
    classes = logits.argmax(-1)

The workdir's ``config.json`` says which model and algorithm were trained and its latest
checkpoint holds the meta-learned parameters; nothing else is needed (no training data).
How a user's data becomes a batch is the task family's evaluator's
(:class:`~metajax.run.setup.Evaluator`: ``batch_fn``, ``inputs_fn``, ``outputs_fn``).

A user's data is checked before it reaches the model, each fault a :class:`PredictInputError`
naming the argument: empty inputs; for classification families (those with an embedding)
labels outside ``0..ways-1`` or classes not each present equally often; inputs of another
shape than the model was trained on. That shape is the evaluator's ``input_shape`` where the
family declares one (the shape of one input example, as ``batch_fn`` and ``inputs_fn`` give
it), else the support batch of one task of the evaluation source.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax.run.build import Experiment, build
from metajax.run.checkpoint import restore_checkpoint
from metajax.run.config import Config, ConfigError
from metajax.run.config_files import load_config
from metajax.run.workdir import read_config


class PredictInputError(ValueError):
    """A support or query set that the trained model cannot take; the message names it."""


class FewShotModel:
    """A meta-trained model ready to adapt to new tasks (see :func:`load`).

    Attributes:
      config: the run's config.
      meta_params: the meta-learned parameters (host arrays).
      step: the checkpoint's meta-training step.
    """

    def __init__(self, exp: Experiment, meta_params: Any, step: int):
        self.config, self.meta_params, self.step = exp.config, meta_params, step
        self._exp = exp
        self._reference = None  # the trained support batch's shapes, found when first needed

    def support_batch(self, x: Any, y: Any = None) -> Any:
        """The family's batch format for a support set (``Evaluator.batch_fn``)."""
        fn = self._exp.evaluator.batch_fn
        if fn is not None:
            return fn(x, y)
        return jnp.asarray(x), jnp.asarray(y)

    def adapt(self, support_x: Any, support_y: Any = None, *, steps: int | None = None):
        """Adapts the meta-learned parameters to one support set (no task axis).

        Args:
          support_x: inputs in the family's format: sinusoid ``(n,)`` or ``(n, 1)`` floats;
            Omniglot ``(n, 28, 28, 1)`` images (uint8 0..255 or float in [0, 1], ink bright);
            words: ``(n, L)`` tokens or a list of strings.
          support_y: targets: sinusoid values; classification labels ``(n,)`` int in
            ``0..ways-1``; ignored for language models (the targets are the next bytes).
          steps: inner steps; default the algorithm's meta-training number (ProtoNets: none).

        Returns:
          What ``algo.adapt`` returns: adapted parameters (or ProtoNets' ``Prototypes``).
        """
        support = self._checked_support(support_x, support_y)
        return _adapt(self._exp.algo, steps)(self.meta_params, support)

    def adapt_and_predict(
        self, support_x: Any, support_y: Any, query_x: Any, *, steps: int | None = None
    ) -> Any:
        """Adapts on ``(support_x, support_y)``, then predicts ``query_x``.

        Returns:
          The family's outputs for the queries: sinusoid ``(m, 1)`` values; classification
          ``(m, ways)`` logits (``argmax(-1)`` is the class); language models
          ``(m, L, vocab)`` next-token logits (``[:, t]`` predicts token ``t + 1``).
        """
        evaluator = self._exp.evaluator
        _check_nonempty(query_x, "query_x")
        adapted = self.adapt(support_x, support_y, steps=steps)
        inputs = (evaluator.inputs_fn or jnp.asarray)(query_x)
        self._check_inputs(inputs, "query_x")
        outputs = jax.jit(evaluator.predict_fn)(adapted, inputs)
        if evaluator.outputs_fn is not None:
            return evaluator.outputs_fn(outputs)
        return np.asarray(outputs)

    def _checked_support(self, x: Any, y: Any) -> Any:
        n = _check_nonempty(x, "support_x")
        embedding = self._exp.setup.embedding
        if embedding is not None:  # a classification family
            _check_labels(y, n, embedding.ways)
        batch = self.support_batch(x, y)
        reference = self._reference_support()
        if reference is not None:
            got = [tuple(np.shape(leaf)[1:]) for leaf in jax.tree.leaves(batch)]
            want = [tuple(s.shape[1:]) for s in jax.tree.leaves(reference)]
            if jax.tree.structure(batch) == jax.tree.structure(reference) and got != want:
                i = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
                leaf = jax.tree.leaves(batch)[i]
                raise PredictInputError(
                    f"support_x gives a batch whose part {i} has shape {np.shape(leaf)}; the "
                    f"model was trained on {_shape_text(want[i])}."
                )
        self._check_inputs(batch[0] if isinstance(batch, tuple) else batch, "support_x")
        return batch

    def _check_inputs(self, inputs: Any, name: str) -> None:
        """Model inputs (``batch_fn``'s first part or ``inputs_fn``'s) against the trained
        example shape, where one is known for a single input array."""
        want = self._input_shape()
        if want is None or len(jax.tree.leaves(inputs)) != 1:
            return
        shape = np.shape(jax.tree.leaves(inputs)[0])
        if tuple(shape[1:]) != want:
            raise PredictInputError(
                f"{name} has shape {shape}; the model was trained on {_shape_text(want)}."
            )

    def _input_shape(self) -> tuple[int, ...] | None:
        declared = self._exp.evaluator.input_shape
        if declared is not None:
            return tuple(declared)
        reference = self._reference_support()
        if reference is None or not isinstance(reference, tuple):
            return None
        leaves = jax.tree.leaves(reference[0])
        return tuple(leaves[0].shape[1:]) if len(leaves) == 1 else None

    def _reference_support(self) -> Any:
        """Shapes of one support set as the model was trained on it, without the task axis
        (from the evaluation source, sampled once); None where the family declares
        ``input_shape`` instead (its source may need data files that prediction does not)."""
        if self._exp.evaluator.input_shape is not None:
            return None
        if self._reference is None:
            # Sampled once, outside any trace: sources are host code (and may fill caches).
            support = self._exp.setup.eval_source.sample(0, 1).support
            self._reference = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(np.shape(s)[1:], s.dtype), support
            )
        return self._reference


def _shape_text(example: tuple[int, ...]) -> str:
    """``(n, 28, 28, 1)``: a batch of ``n`` examples of shape ``example``."""
    return "inputs of shape (" + ", ".join(["n", *map(str, example)]) + ")"


def _check_nonempty(x: Any, name: str) -> int:
    """The number of examples in ``x`` (a list or an array); raises when there are none."""
    if x is None:
        raise PredictInputError(f"{name} is None: give at least one example.")
    n = len(x) if isinstance(x, (list, tuple)) else (np.shape(x)[0] if np.ndim(x) else 0)
    if n == 0:
        raise PredictInputError(f"{name} is empty: give at least one example.")
    return n


def _check_labels(y: Any, n: int, ways: int) -> None:
    """Class labels of a support set: ``n`` integers in ``0..ways-1``, every class present
    equally often, as in the N-way K-shot tasks the model was meta-trained on (ProtoNets
    averages each class; a missing class has no prototype)."""
    if y is None:
        raise PredictInputError(f"support_y is None: give the {n} labels, each in 0..{ways - 1}.")
    labels = np.asarray(y)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise PredictInputError(
            f"support_y must be {n} integer labels (one per support example), got "
            f"{labels.dtype} of shape {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= ways:
        raise PredictInputError(
            f"support_y must lie in 0..{ways - 1} (zero-based class indices of this {ways}-way "
            f"model), got {labels.min()}..{labels.max()}."
        )
    counts = np.bincount(labels, minlength=ways)
    if counts.min() == 0 or counts.min() != counts.max():
        raise PredictInputError(
            f"support_y must hold each class 0..{ways - 1} equally often (the model was "
            f"meta-trained on {ways}-way K-shot sets), got counts {counts.tolist()}."
        )


@functools.lru_cache(maxsize=32)
def _adapt(algo, steps):
    return jax.jit(lambda meta_params, support: algo.adapt(meta_params, support, steps=steps))


def load(workdir: str | Path, config: Config | str | None = None) -> FewShotModel:
    """Loads the latest checkpoint of a ``metajax train`` workdir.

    Args:
      workdir: the run directory (holds ``config.json`` and ``checkpoints/``).
      config: default the workdir's ``config.json``; or a :class:`Config` or a config spec
        such as ``"omniglot:5w1s_maml"``.

    Raises:
      ConfigError: no config or checkpoint, or one that does not fit the config.
    """
    workdir = Path(workdir)
    if config is None:
        config = read_config(workdir)
        if config is None:
            raise ConfigError(
                f"{workdir / 'config.json'} does not exist: is {workdir} a metajax train workdir?"
            )
    elif isinstance(config, str):
        config = load_config(config)
    exp = build(config)
    state, step = restore_checkpoint(exp, workdir)
    return FewShotModel(exp, state.meta_params, step)
