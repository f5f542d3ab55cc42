"""The ``sinusoid`` family: the MAML paper's sinusoid regression with its 1-40-40-1 MLP."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metajax.models.losses import mse_loss
from metajax.models.mlp import MLP
from metajax.run.config import Config, ConfigError, require_positive
from metajax.run.setup import Evaluator, Family, Setup
from metajax.tasks.sinusoid import Sinusoid


@dataclasses.dataclass(frozen=True)
class SinusoidTask:
    """Sinusoid regression with an MLP (MAML paper, section 5.1).

    Attributes:
      shots: K, support points per task (train and eval).
      queries: query points per task.
      hidden: the MLP's hidden widths.
    """

    shots: int = 10
    queries: int = 10
    hidden: tuple[int, ...] = (40, 40)


def build(config: Config) -> Setup:
    task: SinusoidTask = config.task
    require_positive(task, "shots", "queries")
    if not task.hidden or min(task.hidden) < 1:
        raise ConfigError(f"task.hidden={task.hidden}: give one or more widths >= 1.")
    seed = config.train.seed
    model = MLP(hidden=tuple(task.hidden))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.float32))
    train = Sinusoid(shots=task.shots, queries=task.queries, split="train", seed=seed)
    test = Sinusoid(shots=task.shots, queries=task.queries, split="test", seed=seed)

    def plot_fn(algo, meta_params, plots_dir):
        from metajax.run.plots import sinusoid_fit

        return sinusoid_fit(
            algo, meta_params, model.apply, test, plots_dir, steps=(1, config.eval.inner_steps)
        )

    return Setup(
        params=params,
        loss_fn=mse_loss(model.apply),
        metric_fn=None,
        train_source=train,
        eval_source=test,
        evaluator=Evaluator(
            model.apply, batch_fn=_column_batch, inputs_fn=_column, plot_fn=plot_fn
        ),
        head=f"Dense_{len(task.hidden)}",
    )


def _column(x) -> jnp.ndarray:
    """Points as the ``(n, 1)`` column the MLP reads; a flat ``(n,)`` array is accepted."""
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != 1:
        raise ValueError(f"sinusoid inputs must have shape (n,) or (n, 1), got {x.shape}.")
    return jnp.asarray(x)


def _column_batch(x, y):
    x, y = _column(x), _column(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} support inputs but {y.shape[0]} targets.")
    return x, y


FAMILY = Family(SinusoidTask, build)
