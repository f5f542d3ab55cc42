"""Use a trained workdir on one's own few-shot task: ``load(workdir).adapt_and_predict(...)``.

    from metajax.run import predict

    model = predict.load("runs/omniglot_5w1s_maml")
    logits = model.adapt_and_predict(support_images, support_labels, query_images)
    classes = logits.argmax(-1)

The workdir's ``config.json`` says which model and algorithm were trained and its latest
checkpoint holds the meta-learned parameters; nothing else is needed (no training data).
How a user's data becomes a batch is the task family's (``Setup.batch_fn``, ``inputs_fn``,
``outputs_fn``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax.run.build import Experiment, build
from metajax.run.config import Config, ConfigError
from metajax.run.config_files import load_config
from metajax.run.loop import restore_checkpoint
from metajax.run.workdir import read_config


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

    def support_batch(self, x: Any, y: Any = None) -> Any:
        """The family's batch format for a support set (``Setup.batch_fn``)."""
        fn = self._exp.setup.batch_fn
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
        support = self.support_batch(support_x, support_y)
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
        setup = self._exp.setup
        adapted = self.adapt(support_x, support_y, steps=steps)
        inputs = setup.inputs_fn(query_x) if setup.inputs_fn is not None else jnp.asarray(query_x)
        outputs = jax.jit(self._exp.predict_fn)(adapted, inputs)
        if setup.outputs_fn is not None:
            return setup.outputs_fn(outputs)
        return np.asarray(outputs)


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
