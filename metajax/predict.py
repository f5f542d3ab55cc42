"""Use a trained workdir on one's own few-shot task: ``load(workdir).adapt_and_predict(...)``.

    import metajax.predict as mp

    model = mp.load("runs/omniglot_5w1s_maml")
    logits = model.adapt_and_predict(support_images, support_labels, query_images)
    classes = logits.argmax(-1)

The workdir's ``config.json`` says which model and algorithm were trained and its latest
checkpoint holds the meta-learned parameters; nothing else is needed (no training data).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metajax import experiment
from metajax.checkpoint import Checkpointer
from metajax.experiment import Config, ConfigError, Experiment
from metajax.train import train_state


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen config dataclasses hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _task_classes() -> dict[str, type]:
    experiment._import_builtin_families()
    import metajax.families as fam
    import metajax.families_omniglot as fo
    import metajax.families_words as fw

    found = {}
    for module in (fam, fo, fw):
        for name, obj in vars(module).items():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj):
                found[name] = obj
    return found


def config_from_json(data: dict) -> Config:
    """Rebuilds the :class:`Config` that ``metajax train`` wrote to ``WORKDIR/config.json``."""
    task = dict(data["task"])
    kind = task.pop("type")
    classes = _task_classes()
    if kind not in classes:
        raise ConfigError(f"config.json: unknown task type {kind!r}; known: {sorted(classes)}.")

    def make(cls, fields):
        return cls(**{k: _tuples(v) for k, v in fields.items()})

    hints = typing.get_type_hints(Config)
    return Config(
        name=data["name"], family=data["family"], task=make(classes[kind], task),
        **{k: make(hints[k], data[k]) for k in ("algorithm", "optimizer", "train", "eval")})


class FewShotModel:
    """A meta-trained model ready to adapt to new tasks (see :func:`load`).

    Attributes:
      config: the run's config.
      meta_params: the meta-learned parameters (host arrays).
      step: the checkpoint's meta-training step.
    """

    def __init__(self, exp: Experiment, meta_params: Any, step: int):
        if exp.setup.predict_fn is None:
            raise ConfigError(f"task family {exp.config.family!r} defines no predict_fn.")
        self.config, self.meta_params, self.step = exp.config, meta_params, step
        self._exp = exp

    def support_batch(self, x: Any, y: Any = None) -> tuple:
        """The family's batch format: ``(x, y)``, or ``(tokens, mask)`` for language models.

        Byte-sequence families take int token arrays ``(n, L)`` (``metajax.tasks.words.encode``
        format) or lists of strings, which are encoded here.
        """
        if self.config.family.startswith("words"):
            x = self.tokens(x)
            if self.config.family == "words_lm":
                from metajax.tasks.words import target_mask

                return x, jnp.asarray(target_mask(np.asarray(x)))
        return jnp.asarray(x), jnp.asarray(y)

    def tokens(self, x: Any) -> jax.Array:
        """Int32 ``(n, max_len)`` tokens from token arrays or strings (words families only)."""
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], (str, bytes)):
            from metajax.tasks.words import encode

            x = encode(list(x), self.config.task.max_len)
        return jnp.asarray(x, jnp.int32)

    def adapt(self, support_x: Any, support_y: Any = None, *, steps: int | None = None):
        """Adapts the meta-learned parameters to one support set (no task axis).

        Args:
          support_x: inputs: sinusoid ``(n, 1)`` floats; Omniglot ``(n, 28, 28, 1)`` images
            (uint8 0..255 or float in [0, 1], ink bright); words: ``(n, L)`` tokens or strings.
          support_y: targets: sinusoid ``(n, 1)``; classification labels ``(n,)`` int in
            ``0..ways-1``; ignored for ``words_lm`` (the targets are the next bytes).
          steps: inner steps; default the algorithm's meta-training number (ProtoNets: none).

        Returns:
          What ``algo.adapt`` returns: adapted parameters (or ProtoNets' ``Prototypes``).
        """
        support = self.support_batch(support_x, support_y)
        return _adapt(self._exp.algo, steps)(self.meta_params, support)

    def adapt_and_predict(self, support_x: Any, support_y: Any, query_x: Any, *,
                          steps: int | None = None) -> np.ndarray:
        """Adapts on ``(support_x, support_y)``, then predicts ``query_x``.

        Returns:
          numpy predictions for the queries: sinusoid ``(m, 1)`` values; classification
          ``(m, ways)`` logits (``argmax(-1)`` is the class); ``words_lm`` ``(m, L, vocab)``
          next-token logits (``[:, t]`` predicts token ``t + 1``).
        """
        adapted = self.adapt(support_x, support_y, steps=steps)
        if self.config.family.startswith("words"):
            query_x = self.tokens(query_x)
        return np.asarray(jax.jit(self._exp.setup.predict_fn)(adapted, jnp.asarray(query_x)))


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
      ConfigError: no checkpoint, or one that does not fit the config.
    """
    workdir = Path(workdir)
    if config is None:
        path = workdir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: is {workdir} a metajax train workdir?")
        config = config_from_json(json.loads(path.read_text()))
    elif isinstance(config, str):
        config = experiment.load_config(config)
    exp = experiment.build(config)
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"no checkpoint in {directory}.")
    ckpt = Checkpointer(directory, config.train.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"no checkpoint in {directory}.")
        like = train_state(exp.algo, exp.setup.params, exp.optimizer)
        try:
            state = ckpt.restore(like)
        except ValueError as e:
            raise ConfigError(f"the checkpoint in {directory} does not fit the config: {e}") from e
    finally:
        ckpt.close()
    return FewShotModel(exp, jax.device_get(state.meta_params), step)
